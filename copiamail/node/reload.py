"""A node's configuration read again on SIGHUP.

The YAML file and its CFG file are read together, by the same loader the
node started with (so ``--spool``, ``--relay`` and ``--workers`` still hold).
If either has an error, the reload is refused with one line and the old pair
stays in force; a node never runs half of a new configuration. What a node
settles at start (:data:`RESTART_ONLY`) keeps its old value, with a warning
naming the keys that changed; everything else, the limits first, applies to
connections opened from then on (:meth:`Scheduler.reconfigure`).

A node's worker processes do not read the files themselves: the supervisor
hands them the configuration it read (:class:`HandedConfig`, :func:`taken_over`),
so every worker runs the same one, even when a file changes between two reads
or one read fails (workers holding different caps for one shared key could
together go over the cap in force)."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from collections.abc import Callable
from types import MappingProxyType

from copiamail.config import Config
from copiamail.errors import CopiamailError
from copiamail.logs import reopen_log_files

log = logging.getLogger("copiamail")

ConfigLoader = Callable[[], Config]

# Config fields a running node cannot change: its spool and processes, its
# relays and their passwords, DNS, the EHLO name, the SMTP timeout, the
# watcher, how peers are judged, and the web server's address.
RESTART_ONLY = ("spool", "queues", "fsync", "workers", "relay", "retry_relay", "dns", "mx_tls_verify", "helo_name",
                "smtp_timeout", "watcher", "node_stale_after", "cluster")


def reloaded(load: ConfigLoader, current: Config) -> Config | None:
    """The configuration ``load`` reads now, with :data:`RESTART_ONLY` kept
    from ``current``; None (logged in one line) if it cannot be read. What
    changed is logged."""
    try:
        new = load()
    except CopiamailError as e:
        log.error("SIGHUP: %s; the configuration in force stays", e)
        return None
    except OSError as e:
        log.error("SIGHUP: %s%s; the configuration in force stays", f"{e.filename}: " if e.filename else "",
                  e.strerror or e)
        return None
    changed = [name for name in RESTART_ONLY if getattr(new, name) != getattr(current, name)]
    if changed:
        log.warning("SIGHUP: %s change only at a restart; kept as they were", ", ".join(changed))
        new = dataclasses.replace(new, **{name: getattr(current, name) for name in changed})
    for warning in new.rules.warnings:
        log.warning("%s", warning)
    log.info("SIGHUP: configuration reloaded: %s, limits %s (%d $domain_limit rule(s))",
             new.path or "defaults", new.rules.path or "none", len(new.rules.domain_limits))
    return new


def on_hangup(load: ConfigLoader | None, current: Callable[[], Config]) -> Config | None:
    """SIGHUP: the log file reopened (for logrotate), then the configuration
    read again (:func:`~copiamail.node.reload.reloaded`); returns it, or None
    if it is refused or cannot be reloaded."""
    reopen_log_files()
    if load is None:
        log.warning("SIGHUP: this node was started without a configuration to read again; log files reopened")
        return None
    return reloaded(load, current())


class HandedConfig:
    """A configuration the node's supervisor hands to its workers: written
    into an anonymous file in memory (``memfd``) that only the supervisor
    holds open, which a worker opens through ``/proc/<supervisor>/fd/<n>``
    (:func:`taken_over`). Nothing is written to a folder another user could
    write into, nothing outlives the node, and the private keys of ``dkim:``
    never reach a disk. Raises OSError."""

    def __init__(self, config: Config) -> None:
        self._fd = os.memfd_create("copiamail-config", os.MFD_CLOEXEC)
        try:
            with open(self._fd, "wb", closefd=False) as f:
                # A read-only mapping cannot be pickled: its dictionary goes instead.
                pickle.dump(dataclasses.replace(config, dkim=dict(config.dkim)), f)
        except BaseException:
            os.close(self._fd)
            raise
        self.path = f"/proc/{os.getpid()}/fd/{self._fd}"

    def close(self) -> None:
        """Let the file go (a newer one was handed over, or the node stops)."""
        os.close(self._fd)


def taken_over(path: str) -> Config | None:
    """The configuration the node's supervisor handed over at ``path`` (a
    :class:`HandedConfig`); None (logged in one line) if it cannot be read
    -- gone, or not a configuration -- and the one in force stays."""
    try:
        with open(path, "rb") as f:
            config = pickle.load(f)
        if not isinstance(config, Config):
            raise TypeError(f"not a configuration: {type(config).__name__}")
        return dataclasses.replace(config, dkim=MappingProxyType(dict(config.dkim)))
    except Exception as e:  # whatever the file holds, the worker goes on with the configuration in force
        log.error("SIGHUP: the configuration the node read cannot be taken over from %s (%s); the one in force stays",
                  path, e)
        return None
