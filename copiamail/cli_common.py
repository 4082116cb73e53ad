"""What every command shares: the --config and --spool options, one clear
line (never a traceback) for an error the user can cause, and opening the
config and the spool."""

from __future__ import annotations

import functools
import importlib
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


class LazyGroup(click.Group):
    """A command group some of whose commands live in modules imported only
    when they run (or are listed): every ``copiamail`` run, a node's start
    included, would otherwise import every command's module.
    ``lazy_commands``: name -> ``"module:attribute"``."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.NoSuchCommand:
            # click offers "Did you mean" among the commands it holds: the lazy ones too.
            raise click.exceptions.NoSuchCommand(args[0], possibilities=self.list_commands(ctx), ctx=ctx) from None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = self.lazy_commands.get(cmd_name)
        if where is None:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = where.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command) and command.name == cmd_name, where
        return command
