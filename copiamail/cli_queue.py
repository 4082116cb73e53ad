"""Commands that look at the queue as a whole: ``list``."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click

from copiamail.cli_common import common, config, open_spool
from copiamail.spool.listing import DEFAULT_FOLDERS, ListedJob, folder_choice, list_jobs


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


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
    try:
        pattern = re.compile(error_pattern) if error_pattern is not None else None
    except re.error as e:
        raise click.BadParameter(f"{error_pattern!r} is not a regular expression: {e}", param_hint="--error") from None
    spool = open_spool(config(config_file, spool_dir))
    jobs = list_jobs(spool, time.time(), chosen, domain, pattern)
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
