"""What every command shares: the --config and --spool options, one clear
line (never a traceback) for an error the user can cause, and opening the
config and the spool."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from copiamail.config import Config, load_config
from copiamail.errors import CopiamailError, SpoolError
from copiamail.spool.queue import Spool


def fail(message: str) -> None:
    click.echo(f"copiamail: {message}", err=True)
    sys.exit(2)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CopiamailError as e:
            fail(str(e))
        except BrokenPipeError:
            # `copiamail show X | head`: the reader has all it wanted.
            sys.stderr.close()
            sys.exit(0)
        except OSError as e:
            fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    return wrapper


def common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--spool", "spool_dir", type=click.Path(file_okay=False, path_type=Path),
                      help="Spool root (overrides spool:).")(fn)
    fn = click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                      help="copiamail.yaml to read.")(fn)
    return user_errors(fn)


def config(config_file: Path | None, spool_dir: Path | None, relay: str | None = None) -> Config:
    return load_config(config_file).with_overrides(spool=spool_dir, relay=relay)


def open_spool_folder(cfg: Config) -> Spool:
    """The config's spool, whose folder must exist: a mistyped ``--spool``
    must not start a new, empty spool. Its subfolders may be missing."""
    spool = Spool(cfg.spool, cfg.queues, cfg.fsync)
    if not spool.root.is_dir():
        raise SpoolError(f"{spool.root}: no such spool folder (copiamail init --spool {spool.root} makes one)")
    return spool


def open_spool(cfg: Config) -> Spool:
    """The config's spool, which must exist and hold a TOSEND folder."""
    spool = open_spool_folder(cfg)
    if not spool.queue_folders_on_disk():
        raise SpoolError(f"{spool.root}: not a spool (no TOSEND folder; copiamail init --spool {spool.root} makes one)")
    return spool
