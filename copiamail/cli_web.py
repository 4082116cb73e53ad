"""``copiamail web``: serve the spool's live page, ``/metrics`` and ``/api/status``."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from copiamail.cli_common import common, config, open_spool

log = logging.getLogger("copiamail")


@click.command("web")
@click.option("--listen", metavar="HOST:PORT", help="Where to listen (overrides web.listen; default 127.0.0.1:8025).")
@common
def web_command(listen: str | None, config_file: Path | None, spool_dir: Path | None) -> None:
    """Serve a live page of the spool and every node on it, /metrics for
    Prometheus and /api/status as JSON, until SIGTERM or SIGINT."""
    from aiohttp import web

    from copiamail.web.app import check_listen, make_app, read_token

    cfg = config(config_file, spool_dir)
    spool = open_spool(cfg)
    token = read_token(cfg.web.token_file)
    host, port = check_listen(listen or cfg.web.listen, token)
    shown = f"[{host}]" if ":" in host else host
    log.info("web: serving spool %s on http://%s:%d/%s", spool.root, shown, port,
                " (a bearer token is required)" if token else "")
    web.run_app(make_app(spool, token, config=cfg), host=host, port=port, print=None, access_log=None)
