"""Commands that look at and steer the queue: ``list``, ``hold``, ``release``, ``cancel``, ``flush``, ``requeue``."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from copiamail.cli_common import common, config, open_spool
from copiamail.errors import SpoolError
from copiamail.spool.control import cancel as cancel_job
from copiamail.spool.control import finish_cancels, flush_jobs, requeue
from copiamail.spool.holds import Hold, add_hold, remove_hold
from copiamail.spool.layout import is_job_name
from copiamail.spool.listing import DEFAULT_FOLDERS, ListedJob, folder_choice, list_jobs


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _pattern(error_pattern: str | None) -> re.Pattern[str] | None:
    try:
        return re.compile(error_pattern) if error_pattern is not None else None
    except re.error as e:
        raise click.BadParameter(f"{error_pattern!r} is not a regular expression: {e}", param_hint="--error") from None


def _line(job: ListedJob) -> str:
    return f"{job.name:<16} {job.folder:<10} {_age(job.age):>6} {job.size:>8}  {job.recipient}  {job.state}"


@click.command("list")
@click.option("--folder", "folders", multiple=True, metavar="F",
              help="TOSEND (every TOSEND folder), TOSEND<n>, ACTIVE, SENT or FAIL; repeatable. "
                   "Default: the TOSEND folders, ACTIVE and FAIL.")
@click.option("--domain", help="Only jobs to this recipient domain.")
@click.option("--error", "error_pattern", metavar="REGEX", help="Only jobs whose EMAIL_ERROR this regular expression finds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of objects instead of lines.")
@common
def list_command(folders: tuple[str, ...], domain: str | None, error_pattern: str | None, as_json: bool,
                 config_file: Path | None, spool_dir: Path | None) -> None:
    """List jobs: name, folder, age, size, recipient, state, and the last
    EMAIL_ERROR (as postqueue -p does)."""
    try:
        chosen = [folder_choice(f) for f in folders] or list(DEFAULT_FOLDERS)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--folder") from None
    spool = open_spool(config(config_file, spool_dir))
    jobs = list_jobs(spool, time.time(), chosen, domain, _pattern(error_pattern))
    if as_json:
        click.echo(json.dumps([j.as_json() for j in jobs], indent=1))
        return
    count = 0
    for job in jobs:
        count += 1
        click.echo(_line(job))
        if job.error is not None:
            click.echo(f"{'':<16} {job.error}")
    click.echo(f"-- {count} job(s)")


_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


def _holds_named(domains: tuple[str, ...], queues: tuple[int, ...], files: tuple[str, ...]) -> list[Hold]:
    holds: list[Hold] = []
    for d in domains:
        if not _DOMAIN.match(d):
            raise click.BadParameter(f"{d!r} is not a domain name", param_hint="--domain")
        holds.append(Hold.domain(d))
    holds += [Hold.queue(q) for q in queues]
    for f in files:
        name = Path(f).name
        if not is_job_name(name):
            raise click.BadParameter(f"{f!r} is not a job file (NAME.FS)", param_hint="FILE")
        holds.append(Hold.job(name))
    if not holds:
        raise click.UsageError("name what to hold: --domain D, --queue N or job files")
    return holds


def _hold_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.argument("files", nargs=-1)(fn)
    fn = click.option("--queue", "queues", multiple=True, type=click.IntRange(0, 99),
                      help="Every job in TOSEND<N> (0: TOSEND); repeatable.")(fn)
    fn = click.option("--domain", "domains", multiple=True, help="Every job to this recipient domain; repeatable.")(fn)
    return common(fn)


def _change_holds(holds: list[Hold], root: Path, change: Callable[[Path, Hold], bool], verb: str,
                  done: str, not_done: str) -> None:
    for h in holds:
        try:
            changed = change(root, h)
        except OSError as e:
            raise SpoolError(f"{root}: cannot {verb} {h}: {e.strerror}") from None
        click.echo(f"{done}: {h}" if changed else f"{not_done}: {h}")


@click.command()
@_hold_options
def hold(domains: tuple[str, ...], queues: tuple[int, ...], files: tuple[str, ...], config_file: Path | None,
         spool_dir: Path | None) -> None:
    """Stop every node from taking these jobs: they stay where they are,
    untouched, until released (sends already started finish)."""
    holds = _holds_named(domains, queues, files)
    _change_holds(holds, open_spool(config(config_file, spool_dir)).root, add_hold, "hold", "held", "already held")


@click.command()
@_hold_options
def release(domains: tuple[str, ...], queues: tuple[int, ...], files: tuple[str, ...], config_file: Path | None,
            spool_dir: Path | None) -> None:
    """Lift holds made by ``hold``: the nodes take these jobs again."""
    holds = _holds_named(domains, queues, files)
    _change_holds(holds, open_spool(config(config_file, spool_dir)).root, remove_hold, "release", "released", "not held")


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@common
def cancel(files: tuple[Path, ...], config_file: Path | None, spool_dir: Path | None) -> None:
    """Move waiting jobs to FAIL as cancelled (outcome 68), as a node would
    claim them: a job a node has taken already is left alone."""
    spool = open_spool(config(config_file, spool_dir))
    for path in finish_cancels(spool, time.time()):
        click.echo(f"cancel finished (it had been interrupted): {path}")
    failed = False
    for f in files:
        try:
            where = cancel_job(spool, f, time.time())
        except (SpoolError, OSError) as e:
            failed = True
            click.echo(f"copiamail: {e if isinstance(e, SpoolError) else f'{f}: {e.strerror}'}", err=True)
            continue
        click.echo(f"cancelled: {f} -> {where}")
    if failed:
        sys.exit(2)


@click.command()
@click.option("--domain", help="Only jobs to this recipient domain.")
@common
def flush(domain: str | None, config_file: Path | None, spool_dir: Path | None) -> None:
    """Make jobs that wait for a retry time due now (held jobs are left alone)."""
    spool = open_spool(config(config_file, spool_dir))
    done = flush_jobs(spool, time.time(), domain)
    for path in done:
        click.echo(f"due now: {path}")
    click.echo(f"-- {len(done)} job(s) made due")


@click.command("requeue")
@click.option("--domain", help="Only failed jobs to this recipient domain.")
@click.option("--error", "error_pattern", metavar="REGEX",
              help="Only failed jobs whose EMAIL_ERROR this regular expression finds.")
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), metavar="YYYY-MM-DD",
              help="Only jobs that failed on or after this day (local time; the file's time in FAIL).")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@common
def requeue_command(domain: str | None, error_pattern: str | None, since: Any, files: tuple[Path, ...],
                    config_file: Path | None, spool_dir: Path | None) -> None:
    """Move failed jobs back to the TOSEND folder each came from, with a
    fresh retry budget (their attempt history stays in the file). Names
    FILEs in FAIL, or every failed job the filters select."""
    if not files and domain is None and error_pattern is None and since is None:
        raise click.UsageError("name what to requeue: FILE..., --domain, --error or --since "
                               "(--since 1970-01-01 for every failed job)")
    pattern = _pattern(error_pattern)
    spool = open_spool(config(config_file, spool_dir))
    now = time.time()
    filtered = domain is not None or pattern is not None or since is not None
    # FAIL only grows: it is read only when filters must select from it.
    selected = [j.path for j in list_jobs(spool, now, ["FAIL"], domain, pattern)
                if since is None or j.age <= now - since.timestamp()] if filtered else []
    if not files:
        chosen = selected
    elif not filtered:
        chosen = list(files)
    else:
        matching = {p.absolute() for p in selected}
        chosen = [f for f in files if f.absolute() in matching]
        for f in files:
            if f.absolute() not in matching:
                click.echo(f"copiamail: {f}: not a failed job the filters select; not requeued", err=True)
    done = 0
    for path in chosen:
        try:
            where = requeue(spool, path)
        except (SpoolError, OSError) as e:
            click.echo(f"copiamail: {e if isinstance(e, SpoolError) else f'{path}: {e.strerror}'}", err=True)
            continue
        done += 1
        click.echo(f"requeued: {path} -> {where}")
    click.echo(f"-- {done} job(s) requeued")
    if files and done < len(files):
        sys.exit(2)
