"""A node's configuration read again on SIGHUP.

The YAML file and its CFG file are read together, by the same loader the
node started with (so ``--spool``, ``--relay`` and ``--workers`` still hold).
If either has an error, the reload is refused with one line and the old pair
stays in force; a node never runs half of a new configuration. What a node
settles at start (:data:`RESTART_ONLY`) keeps its old value, with a warning
naming the keys that changed; everything else, the limits first, applies to
connections opened from then on (:meth:`Scheduler.reconfigure`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

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


def reloaded(load: ConfigLoader, current: Config, report: bool = True) -> Config | None:
    """The configuration ``load`` reads now, with :data:`RESTART_ONLY` kept
    from ``current``; None (logged in one line) if it cannot be read.
    ``report``: log what changed (a node's worker processes leave that to
    their supervisor, which read the same files just before)."""
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
    if changed and report:
        log.warning("SIGHUP: %s change only at a restart; kept as they were", ", ".join(changed))
    if changed:
        new = dataclasses.replace(new, **{name: getattr(current, name) for name in changed})
    if not report:
        return new
    for warning in new.rules.warnings:
        log.warning("%s", warning)
    log.info("SIGHUP: configuration reloaded: %s, limits %s (%d $domain_limit rule(s))",
             new.path or "defaults", new.rules.path or "none", len(new.rules.domain_limits))
    return new


def on_hangup(load: ConfigLoader | None, current: Callable[[], Config], report: bool = True) -> Config | None:
    """SIGHUP: the log file reopened (for logrotate), then the configuration
    read again (:func:`~copiamail.node.reload.reloaded`); returns it, or None
    if it is refused or cannot be reloaded."""
    reopen_log_files()
    if load is None:
        log.warning("SIGHUP: this node was started without a configuration to read again; log files reopened")
        return None
    return reloaded(load, current(), report)
