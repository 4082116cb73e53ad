"""The ``copiamail`` command line (click).

Every error a user can cause is printed as one line, ``copiamail: <file:line:
message>``, with exit code 2; never a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from copiamail import __version__
from copiamail.cli_common import LazyGroup
from copiamail.cli_common import common as _common
from copiamail.cli_common import config as _config
from copiamail.cli_common import fail as _fail
from copiamail.cli_common import open_spool as _spool
from copiamail.cli_common import open_spool_folder as _spool_folder
from copiamail.cli_common import user_errors as _user_errors
from copiamail.config import Config, load_config, read_password
from copiamail.errors import CopiamailError, DeliveryError, JobError
from copiamail.jobfile.addresses import parse_address
from copiamail.jobfile.dkim import sign_for_job
from copiamail.jobfile.fsfile import CommandFile, format_command
from copiamail.jobfile.job import parse_job
from copiamail.jobfile.message import build_message
from copiamail.jobfile.owned import AttemptRecord
from copiamail.jobfile.rules import match, shadowed
from copiamail.logs import live_display_on, setup_logging
from copiamail.scheduling.adaptive import Learned, learned_cap, learned_in_spool, local_time
from copiamail.scheduling.limits import Scopes, bindings_for, is_cluster_key, limits_for
from copiamail.scheduling.routing import Router, Target
from copiamail.spool.holds import held_where_it_is
from copiamail.spool.jobview import (
    ENGINE_VARS,
    engine_lines,
    job_state,
    readable_commands,
    recipient_domain,
    recipient_of,
    sender_for,
)
from copiamail.spool.peers import finish_takeover, takeover_folders
from copiamail.spool.queue import Spool, is_job_name
from copiamail.spool.recovery import recover

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


# Commands whose modules a node never needs: imported when they run.
_LAZY_COMMANDS = {
    "list": "copiamail.cli_queue:list_command",
    "hold": "copiamail.cli_queue:hold",
    "release": "copiamail.cli_queue:release",
    "cancel": "copiamail.cli_queue:cancel",
    "flush": "copiamail.cli_queue:flush",
    "requeue": "copiamail.cli_queue:requeue_command",
    "web": "copiamail.cli_web:web_command",
    "status": "copiamail.cli_status:status",
}


@click.group(cls=LazyGroup, lazy_commands=_LAZY_COMMANDS)
@click.version_option(__version__)
@click.option("-v", "--verbose", count=True,
              help="More log lines on stderr (-v deliveries and deferrals, -vv debug, -vvv libraries' debug).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Log lines as text, or one JSON object a line.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Append log lines to this file instead of stderr (reopened on SIGHUP).")
def main(verbose: int, log_format: str, log_file: Path | None) -> None:
    """copiamail: file-spool batch e-mail transmission in the CopiaFacts style."""
    try:
        setup_logging(verbose, sys.stderr, log_format, log_file)
    except OSError as e:
        _fail(f"--log-file: {log_file}: {e.strerror}")
    # watchdog warns when its emitter thread stops during shutdown; not ours to report.
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)


# --- node ---------------------------------------------------------------------


class _Progress:
    """A live line while --drain runs on a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.counts: Counter[str] = Counter()
        self._progress: Any = None
        self._task: Any = None
        self._stack = ExitStack()
        self.total = total

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), transient=False,
            )
            self._progress.start()
            self._stack.callback(self._progress.stop)
            self._stack.enter_context(live_display_on(sys.stdout))
            self._task = self._progress.add_task("sending", total=self.total or None, detail="")
        return self

    def event(self, kind: str, name: str) -> None:
        self.counts[kind] += 1
        if self._progress is not None:
            done = self.counts["sent"] + self.counts["failed"]
            detail = (f"sent {self.counts['sent']} failed {self.counts['failed']} retry {self.counts['retried']} "
                      f"deferred {self.counts['deferred']}")
            self._progress.update(self._task, completed=done, detail=detail)

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


@main.command()
@click.option("--name", required=True, help="This node's name (N1, N2 ...).")
@click.option("--relay", help="Send through this SMTP relay, HOST[:PORT].")
@click.option("--relay-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Verify the relay's certificate against this CA file (overrides relay.ca_file).")
@click.option("--relay-no-verify", is_flag=True, help="Do not verify the relay's certificate (relay.tls_verify: false).")
@click.option("--drain", is_flag=True, help="Exit once no job is due and none is in flight.")
@click.option("--workers", type=click.IntRange(1, 64), help="Worker processes (overrides workers:).")
@_common
def node(name: str, relay: str | None, relay_ca: Path | None, relay_no_verify: bool, drain: bool, workers: int | None,
         config_file: Path | None, spool_dir: Path | None) -> None:
    """Run a node: take jobs from the TOSEND folders and send them."""
    from copiamail.node.node import run_node

    def load() -> Config:
        # Called again on SIGHUP: the same files, with the same options over them.
        cfg = _config(config_file, spool_dir, relay).with_overrides(
            relay_ca_file=relay_ca, relay_tls_verify=False if relay_no_verify else None)
        if workers is not None:
            cfg = dataclasses.replace(cfg, workers=workers)
        return cfg

    cfg = load()
    for warning in cfg.rules.warnings:
        click.echo(f"copiamail: warning: {warning}", err=True)
    live = drain and sys.stdout.isatty()
    spool = _spool_folder(cfg)
    # Counted only for the live line: on a large backlog the count delays the first message.
    total = sum(n for k, n in spool.counts().items() if k.upper().startswith("TOSEND")) if live else 0
    with _Progress(total, live) as progress:
        # Without a live line nothing reads the events (and workers would send
        # each one to this process).
        result = run_node(cfg, name, drain=drain, on_event=progress.event if progress.enabled else None, load=load)
    if drain:
        s = result.stats
        click.echo(
            f"{name}: sent {s.sent}, failed {s.failed}, retry later {s.retried}, deferred {s.deferred}, "
            f"recovered {len(result.recovered.returned) + len(result.recovered.failed) + len(result.recovered.handed_back)} "
            f"in {result.seconds:.1f} s{_rate(s.sent, result.seconds)}; spool {cfg.spool}"
        )
    if result.failed_workers:
        sys.exit(1)


def _rate(sent: int, seconds: float) -> str:
    """`` (N msgs/s)`` for a drain's summary; nothing when there is nothing
    to measure (no message sent, or a run too short for its clock)."""
    if sent == 0 or seconds < 0.05:
        return ""
    rate = sent / seconds
    return f" ({rate:.0f} msgs/s)" if rate >= 10 else f" ({rate:.2g} msgs/s)"


# --- submit -------------------------------------------------------------------


def _new_job_name(folder: Path) -> tuple[Path, Path]:
    for _ in range(1000):
        stem = f"{time.time_ns():020d}{os.getpid() % 100000:05d}"
        tmp, final = folder / f"{stem}.TFS", folder / f"{stem}.FS"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        os.close(fd)
        if final.exists():
            os.unlink(tmp)
            continue
        return tmp, final
    raise CopiamailError(f"{folder}: no free job name")


@main.command()
@click.option("--to", "to", required=True, help="Recipient address.")
@click.option("--subject", help="Subject line.")
@click.option("--text", multiple=True, help="A body line (repeatable).")
@click.option("--attach", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file to attach (repeatable; it must lie inside attachment_roots).")
@click.option("--queue", type=click.IntRange(0, 99), default=0, show_default=True, help="0 for TOSEND, N for TOSENDN.")
@_common
def submit(to: str, subject: str | None, text: tuple[str, ...], attach: tuple[Path, ...], queue: int,
           config_file: Path | None, spool_dir: Path | None) -> None:
    """Write a job atomically (NAME.TFS, then rename to NAME.FS) and print its path."""
    cfg = _config(config_file, spool_dir)
    if parse_address(to) is None:
        raise CopiamailError(f"--to: not an e-mail address: {to!r}")
    if not subject and not text and not attach:
        raise CopiamailError("nothing to send: give --subject, --text or --attach")
    spool = _spool(cfg)
    if queue > cfg.queues:
        raise CopiamailError(f"--queue {queue}: this spool has TOSEND1 to TOSEND{cfg.queues}")
    spool.ensure()
    lines = [format_command("email_address", to)]
    if subject is not None:
        lines.append(format_command("email_subject", subject))
    lines += [format_command("email_text", t) for t in text]
    roots = [r.resolve() for r in cfg.roots]
    for a in attach:
        real = a.resolve()
        if not any(real == r or r in real.parents for r in roots):
            raise CopiamailError(f"--attach {a}: outside attachment_roots ({', '.join(map(str, roots))})")
    lines += [format_command("email_attach", str(a.resolve())) for a in attach]
    folder = spool.queue_folder(spool.queues[queue])
    tmp, final = _new_job_name(folder)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)
    click.echo(str(final))


# --- status, show -------------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--message", "as_message", is_flag=True, help="Print the MIME message as it would be sent.")
@_common
def show(file: Path, as_message: bool, config_file: Path | None, spool_dir: Path | None) -> None:
    """A job's state, then what its file says: recipient, attempts, engine
    variables. A job that does not parse shows its parse error (exit 2) and
    the engine's lines that can be read."""
    # show reads a job wherever it lies; the config (where one is found)
    # gives the variables a job may use, and --message needs it.
    if as_message or spool_dir is not None:
        cfg: Config | None = _config(config_file, spool_dir)
    else:
        try:
            cfg = _config(config_file, None)
        except CopiamailError:
            cfg = None  # a bad config must not hide the job: read it alone
    if cfg is not None and spool_dir is not None:
        _spool_folder(cfg)
    cf = CommandFile.read(file)
    if cfg is not None and as_message:
        job = parse_job(cf, file.name, cfg.job_env)
        data = build_message(job, spool_root=cfg.spool, attachment_roots=cfg.roots, sender=sender_for(job, cfg),
                             path_map=cfg.path_map)
        data = sign_for_job(data, job, cfg, cfg.spool)
        sys.stdout.buffer.write(data)
        return
    try:
        job = parse_job(cf, file.name, cfg.job_env if cfg is not None else None)
    except JobError as e:
        variables, attempts, next_attempt = engine_lines(readable_commands(cf))
        held = held_where_it_is(file, recipient_domain(recipient_of(cf)))
        click.echo(f"job        {job_state(file, next_attempt, time.time(), held)}: {file}")
        sys.stdout.flush()
        click.echo(f"copiamail: {e}", err=True)
        click.echo(f"recipient  {recipient_of(cf)}")
        _show_engine_lines(variables, attempts)
        sys.exit(2)
    click.echo(f"job        {job_state(file, job.next_attempt, time.time(), held_where_it_is(file, job.domain))}: {file}")
    click.echo(f"recipient  {job.address} (domain {job.domain})")
    if job.subject is not None:
        click.echo(f"subject    {job.subject}")
    if job.esender:
        click.echo(f"esender    {job.esender}")
    click.echo(f"body       {len(job.body)} item(s), {len(job.alt)} alternative, {len(job.attachments)} attachment(s)")
    _show_engine_lines(job.variables, job.attempts)


def _show_engine_lines(variables: Mapping[str, str], attempts: Iterable[AttemptRecord]) -> None:
    for key in (*ENGINE_VARS, "EMAIL_BINDING", "EMAIL_BINDING_GROUP"):
        if key in variables:
            click.echo(f"{key:<18} {variables[key]}")
    for a in attempts:
        click.echo(f"attempt    {a.date} {a.time} {a.node} {a.outcome} {a.klass} {a.text}")


@main.command()
@_common
def init(config_file: Path | None, spool_dir: Path | None) -> None:
    """Make a spool: its folder (--spool, or spool:) and every folder in it."""
    cfg = _config(config_file, spool_dir)
    existed = cfg.spool.is_dir()
    Spool(cfg.spool, cfg.queues, cfg.fsync).ensure()
    click.echo(f"spool {cfg.spool}: {'missing folders made' if existed else 'made'}")


# --- explain, check-config ----------------------------------------------------


@main.command()
@click.argument("address")
@click.option("--node", "node_name", default="N1", show_default=True, help="The node to explain for.")
@click.option("--binding", help="The binding the job would use.")
@_common
def explain(address: str, node_name: str, binding: str | None, config_file: Path | None, spool_dir: Path | None) -> None:
    """The $domain_limit rule and every scoped limit that applies to ADDRESS."""
    cfg = _config(config_file, spool_dir)
    if spool_dir is not None:
        _spool_folder(cfg)  # explain does not use the spool, but a --spool given must exist
    parsed = parse_address(address)
    if parsed is None:
        raise CopiamailError(f"not an e-mail address: {address!r}")
    address, domain = parsed
    try:
        candidates = bindings_for(cfg, binding, None)
    except KeyError:
        raise CopiamailError(f"--binding: no binding named {binding!r}") from None
    learned = learned_in_spool(cfg.spool, node_name) if cfg.spool.is_dir() else {}

    def cap_of(key: str, ceiling: int) -> int:
        return learned_cap(learned[key][1] if key in learned else None, ceiling)

    leases: dict[str, Any] | None = None  # the cluster's, read from Redis once, when a cluster key is shown
    dl = match(cfg.rules.domain_limits, node_name, address)
    if dl is None:
        click.echo(f"$domain_limit: no rule applies to {address} on node {node_name}")
    else:
        click.echo(f"$domain_limit: {dl.rule} at {dl.rule.where()}")
        click.echo(f"  limits domain {dl.domain} to {dl.count} connection(s) from node {node_name}")
    for b in candidates:
        where = f"binding {b.name} ({b.bind_address or 'no source address'})" if b else "the default binding (no source address)"
        if len(candidates) > 1:
            where += f", one of group {b.group}" if b else ""
        for host, ips, names in _mail_hosts(cfg, domain):
            click.echo(f"limits that apply over {where} to {host} (key, cap, scope):")
            for limit in limits_for(cfg, node_name, address, domain, b, ips, names, learned=cap_of):
                click.echo(f"  {limit.key:<40} {limit.cap:>5}  {limit.scope}")
                if limit.ceiling is not None:
                    _echo_learned(limit.key, learned)
                if is_cluster_key(limit.key):
                    from copiamail.cluster_report import cluster_leases

                    leases = leases if leases is not None else cluster_leases(cfg)
                    _echo_leases(limit.key, leases)
            for pace in Scopes(cfg, node_name).paces(domain, b, ips, names):
                click.echo(f"  message rate {pace.key:<27} {pace.scope}: a message every {pace.spacing:g} s at most")


def _echo_leases(key: str, leases: dict[str, Any] | None) -> None:
    """How many leases of cluster key ``key`` Redis holds now, and whose."""
    if leases is None:
        return
    if leases["error"]:
        click.echo(f"    cluster: Redis at {leases['redis']} cannot be read ({leases['error']}); "
                   "connections under this limit wait for it")
        return
    found = next((k for k in leases["keys"] if k["key"] == key), None)
    held = ", ".join(f"{n} {c}" for n, c in sorted(found["nodes"].items())) if found else ""
    click.echo(f"    cluster: {found['leases'] if found else 0} lease(s) held now" + (f" ({held})" if held else ""))


def _echo_learned(key: str, learned: dict[str, tuple[str, Learned]]) -> None:
    """What the key learned from throttle replies (adaptive), in words."""
    found = learned.get(key)
    if found is None:
        click.echo("    adaptive: nothing learned (the configured cap holds)")
        return
    node, what = found
    click.echo(f"    adaptive: {what.describe() or 'as configured'}, learned by {node} at {local_time(what.at)} "
               f"from a {what.kind} reply: "
               f"{what.reply}")


def _mail_hosts(cfg: Config, domain: str) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """``(label, addresses, names)`` of each place a connection for ``domain``
    may go, as the node's router works them out (the same code)."""
    router = Router(cfg)

    async def look_up() -> list[tuple[str, Target]]:
        await router.learn_host_names()  # as a node does at its start
        try:
            return await router.places(domain)
        except DeliveryError as e:
            raise CopiamailError(f"cannot look up the mail hosts of {domain}: {e.text}") from None

    return [(label, target.ips, target.names) for label, target in asyncio.run(look_up())]


@main.command("check-config")
@_common
def check_config(config_file: Path | None, spool_dir: Path | None) -> None:
    """Validate the config and CFG; warn about rules that can never apply."""
    cfg = _config(config_file, spool_dir)
    _spool_folder(cfg)
    read_password(cfg)
    read_password(cfg, "retry_relay")
    read_password(cfg, "cluster")
    for warning in cfg.rules.warnings:
        click.echo(f"warning: {warning}")
    for rule, earlier in shadowed(cfg.rules.domain_limits):
        click.echo(f"warning: {rule.where()}: {rule} can never apply: {earlier} at {earlier.where()} matches first")
    click.echo(f"ok: {cfg.path or 'built-in defaults'}; {len(cfg.rules.domain_limits)} $domain_limit rule(s); spool {cfg.spool}")


@main.command()
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), help="Only attempts on this day (YYYY-MM-DD) or later.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--write", "write_cfg", is_flag=True, help="Insert the proposed lines into the CFG file.")
@_common
def advise(since: datetime | None, fmt: str, write_cfg: bool, config_file: Path | None, spool_dir: Path | None) -> None:
    """Propose $domain_limit lines from the throttle replies the spool's jobs record."""
    from copiamail import advice
    from copiamail.advice import report

    cfg = _config(config_file, spool_dir)
    spool = _spool_folder(cfg)
    found = advice.advise(cfg, since.date() if since is not None else None)
    for warning in found.warnings:
        click.echo(f"copiamail: warning: {warning}", err=True)
    written = advice.write(cfg, found) if write_cfg else 0
    items = list(found.items)
    if fmt == "json":
        click.echo(report.as_json(items, write_cfg))
    else:
        click.echo(report.as_text(items, found.files, str(spool.root), str(cfg.cfg_path) if written else None))


# --- recover ------------------------------------------------------------------


@main.command("recover")
@click.option("--node", "node_name", required=True, help="The node whose ACTIVE jobs to put back.")
@_common
def recover_cmd(node_name: str, config_file: Path | None, spool_dir: Path | None) -> None:
    """Put a stopped node's ACTIVE jobs back into their folders (those it
    was sending with outcome 66)."""
    from copiamail.node.node import check_node_name, node_lock

    check_node_name(node_name)
    spool = _spool(_config(config_file, spool_dir))
    spool.ensure()
    with node_lock(spool, node_name):
        reports = [recover(spool, node_name)]
        # Folders this node had taken over from dead peers, if it died midway.
        reports += [finish_takeover(spool, folder, node_name) for folder in takeover_folders(spool, node_name)]
    interrupted = sum(len(r.returned) for r in reports)
    returned = interrupted + sum(len(r.handed_back) for r in reports)
    failed = sum(len(r.failed) for r in reports)
    sent = sum(len(r.sent) for r in reports)
    click.echo(f"{node_name}: returned {returned} job(s) to their folders ({interrupted} interrupted while being sent), "
               f"{failed} to FAIL, {sent} accepted before the stop to SENT")


# --- demo ---------------------------------------------------------------------


@main.command()
@click.option("--dir", "demo_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-spool"),
              show_default=True, help="Where the demo spool goes (replaced if it holds an earlier demo).")
@_user_errors
def demo(demo_dir: Path) -> None:
    """Send the shipped samples through a node into an embedded SMTP sink."""
    from copiamail.node.node import run_node
    from copiamail.smtp.sink import SmtpSink

    if not (SAMPLES / "copiamail.yaml").is_file():
        raise CopiamailError(f"{SAMPLES}: the samples are missing (install from a checkout: pip install -e .)")
    marker = demo_dir / ".copiamail-demo"
    if demo_dir.exists():
        if not marker.exists():
            given = click.get_current_context().get_parameter_source("demo_dir") is not click.core.ParameterSource.DEFAULT
            fix = "choose a folder that does not exist yet" if given else "pass --dir with a folder that does not exist yet"
            raise CopiamailError(f"{demo_dir}: exists and is not an earlier demo spool; {fix}")
        shutil.rmtree(demo_dir)
    shutil.copytree(SAMPLES / "spool", demo_dir)
    marker.write_text("made by copiamail demo\n")
    cfg = load_config(SAMPLES / "copiamail.yaml")
    with SmtpSink(delay=0.05) as sink:
        cfg = cfg.with_overrides(spool=demo_dir, relay=f"{sink.host}:{sink.port}")
        click.echo(f"embedded SMTP sink on {sink.host}:{sink.port}; node N1 draining {cfg.spool}")
        total = sum(n for k, n in Spool(cfg.spool, cfg.queues).counts().items() if k.upper().startswith("TOSEND"))
        with _Progress(total, sys.stdout.isatty()) as progress:
            result = run_node(cfg, "N1", drain=True, on_event=progress.event)
    s = result.stats
    click.echo(f"sent {s.sent}, failed {s.failed}, deferred {s.deferred} (DOMAINBUSY_COUNT), retry later {s.retried}")
    for folder in ("SENT", "FAIL"):
        names = sorted(p.name for p in (cfg.spool / folder).iterdir() if is_job_name(p.name))
        click.echo(f"  {cfg.spool / folder}: {', '.join(names) or '(none)'}")
    failed = sorted((cfg.spool / "FAIL").glob("*.FS"))
    if failed:
        click.echo(f"see why one failed:  python3 -m copiamail show {failed[0]}")


def run() -> None:
    """The console entry point: click's own usage errors become one line too."""
    try:
        code = main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("copiamail: aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        _fail(e.format_message().replace("\n", " "))
    _exit_now(code if isinstance(code, int) else 0)


def _exit_now(code: int) -> NoReturn:
    """End the process once a command is done, without the interpreter's
    teardown (freeing every module and object: 30 to 40 ms at the end of
    every command, a node's drain included). Logs and output are flushed
    first; no command leaves work for exit handlers (the event loop's
    threads end with it)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can go there
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
