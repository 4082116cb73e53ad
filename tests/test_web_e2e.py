"""`copiamail web` against a running node and a real SMTP server: the page in
headless Chromium shows the connections the server counts and renders what
job files hold as text; /metrics parses with prometheus_client's parser and
agrees with the spool; /api/status too; the token rules."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from smtpserver import Rule
from spoolkit import CLI, REPO, SpoolKit, cli_env, stop, wait_until

# Kept after the run (a test artifact): what the browser showed.
ARTIFACTS = Path(os.environ.get("COPIAMAIL_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INJECTION = ("<script>document.body.setAttribute('data-pwned','script')</script>"
             "<img src=x onerror=document.body.setAttribute('data-pwned','img')>")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Web:
    """A `copiamail web` process of a SpoolKit's config."""

    def __init__(self, kit: SpoolKit, listen: str) -> None:
        self.url = f"http://127.0.0.1:{listen.rsplit(':', 1)[1]}"
        self.proc = subprocess.Popen([*CLI, "web", "--listen", listen], cwd=kit.base, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path)))

    def wait_ready(self, token: str | None = None) -> None:
        def answers() -> bool:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                _get(self.url + "/api/status", token)
                return True
            except OSError:
                return False
        wait_until(answers, timeout=20, interval=0.1)

    def status(self) -> dict:
        code, body = _get(self.url + "/api/status")
        assert code == 200, body
        return json.loads(body)

    def stop(self) -> None:
        code, _, err = stop(self.proc)
        assert code == 0 and "Traceback" not in err, err


def _metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.timeout(120)
def test_metrics_and_api_status_agree_with_the_spool_after_a_drain(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="RCPT", code=550, text="5.1.1 no such user", match="@bad.test"))
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @ 3"])
    for i in range(30):
        kit.job("TOSEND2", f"J{i:02d}.FS", to=f"u{i}@{'bad.test' if i % 4 == 0 else 'copia.com'}")
    web = Web(kit, f"127.0.0.1:{_free_port()}")
    proc = kit.start("N1")
    try:
        web.wait_ready()
        wait_until(lambda: len(kit.names("SENT")) + len(kit.names("FAIL")) == 30, timeout=60)
        sent, failed = len(kit.names("SENT")), len(kit.names("FAIL"))
        assert (sent, failed) == (22, 8)

        def agrees() -> bool:  # the node publishes about once a second
            code, body = _get(web.url + "/metrics")
            assert code == 200
            samples = _metric_samples(body.decode())
            return (samples.get(("copiamail_messages_total", (("node", "N1"), ("outcome", "sent")))) == sent
                    and samples.get(("copiamail_messages_total", (("node", "N1"), ("outcome", "failed")))) == failed)
        wait_until(agrees, timeout=5, interval=0.2)
        samples = _metric_samples(_get(web.url + "/metrics")[1].decode())
        assert samples[("copiamail_queue_jobs", (("folder", "SENT"),))] == sent
        assert samples[("copiamail_queue_jobs", (("folder", "FAIL"),))] == failed
        assert samples[("copiamail_queue_jobs", (("folder", "TOSEND2"),))] == 0
        assert samples[("copiamail_smtp_transaction_seconds_count", (("node", "N1"),))] == sent + failed
        assert samples[("copiamail_node_up", (("node", "N1"),))] == 1
        doc = web.status()
        folders = {f["folder"]: f["jobs"] for f in doc["folders"]}
        assert folders["SENT"] == sent and folders["FAIL"] == failed and folders["TOSEND2"] == 0
        assert {"folders", "domains", "nodes", "failures"} <= set(doc)
        [node] = doc["nodes"]
        assert node["name"] == "N1" and node["alive"] and node["counters"]["sent"] == sent
        assert len(doc["failures"]) == 8 and all("no such user" in f["error"] for f in doc["failures"])
    finally:
        code, _, err = stop(proc)
        web.stop()
    assert code == 0, err


def test_web_refuses_a_non_loopback_address_without_a_token_in_one_line(tmp_path):
    kit = SpoolKit(tmp_path)
    result = kit.cli("web", "--listen", f"0.0.0.0:{_free_port()}", timeout=20)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("copiamail: ") and "web.token_file" in line and "0.0.0.0" in line


@pytest.mark.timeout(60)
def test_with_a_token_every_request_without_it_gets_401(tmp_path):
    (tmp_path / "token").write_text("s3cret-token\n")
    port = _free_port()
    kit = SpoolKit(tmp_path, yaml=f"web: {{listen: '0.0.0.0:{port}', token_file: ./token}}\n")
    proc = subprocess.Popen([*CLI, "web"], cwd=kit.base, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=cli_env(COPIAMAIL_CONFIG=str(kit.config_path)))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _reachable(url), timeout=20, interval=0.1)
        for path in ("/", "/page.js", "/api/status", "/metrics"):
            assert _get(url + path)[0] == 401
            assert _get(url + path, "wrong")[0] == 401
            assert _get(url + path, "s3cret-token")[0] == 200
    finally:
        code, _, err = stop(proc)
    assert code == 0, err


def _reachable(url: str) -> bool:
    try:
        _get(url + "/")
        return True
    except OSError:
        return False


# --- the page in a browser -------------------------------------------------------


class _Cells(HTMLParser):
    """The text of every element with a data-field attribute, and whether the DOM holds an img or data-pwned."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[dict[str, str | None], str]] = []
        self._open: list[tuple[dict[str, str | None], list[str]]] = []
        self.images = 0
        self.pwned: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images += 1
        if "data-pwned" in a:
            self.pwned = a["data-pwned"]
        if tag == "td":
            self._open.append((a, []))

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1][1].append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._open:
            a, text = self._open.pop()
            self.cells.append((a, "".join(text)))


def _chromium(url: str, *args: str, profile: Path) -> str:
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             f"--user-data-dir={profile}", "--virtual-time-budget=4000", *args, url],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (.ci/run installs it)")
@pytest.mark.timeout(180)
def test_the_page_in_chromium_shows_the_connections_the_server_counts_and_job_text_as_text(tmp_path, smtp_server):
    server = smtp_server()
    server.add_rule(Rule(stage="EOD", delay=1.5))  # slow: every connection stays busy
    kit = SpoolKit(tmp_path, server.port, ["$domain_limit * @slow.test 3", "$domain_limit * @ 2"])
    for i in range(60):
        kit.job("TOSEND", f"S{i:02d}.FS", to=f"u{i}@slow.test")
    for i in range(30):
        kit.job("TOSEND1", f"O{i:02d}.FS", to=f"v{i}@other.test")
    (kit.root / "FAIL").mkdir()
    (kit.root / "FAIL" / "X.FS").write_text(f"$email_address x@evil.test\n$var_def EMAIL_ERROR {INJECTION}\n"
                                            "$fax_status1 6\n", encoding="utf-8")
    web = Web(kit, f"127.0.0.1:{_free_port()}")
    proc = kit.start("N1")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        web.wait_ready()
        wait_until(lambda: server.current_by_domain.get("slow.test") == 3
                   and server.current_by_domain.get("other.test") == 2, timeout=20)
        time.sleep(2.5)  # what the node does reaches the page within 2 s
        before = dict(server.current_by_domain)
        dom = _chromium(web.url + "/", "--dump-dom", profile=tmp_path / "chromium")
        after = dict(server.current_by_domain)
        _chromium(web.url + "/", "--window-size=1280,1800", f"--screenshot={ARTIFACTS / 'web-page.png'}",
                  profile=tmp_path / "chromium")
    finally:
        code, _, err = stop(proc)
        web.stop()
    assert code == 0, err
    page = _Cells()
    page.feed(dom)
    shown = {a.get("data-domain"): int(text) for a, text in page.cells if a.get("data-field") == "connections"}
    for domain in ("slow.test", "other.test"):
        assert abs(shown[domain] - before[domain]) <= 1 and abs(shown[domain] - after[domain]) <= 1, (shown, before, after)
    errors = [text for a, text in page.cells if a.get("data-field") == "error"]
    assert INJECTION in errors  # shown as the text it is
    assert page.images == 0 and page.pwned is None and "&lt;script&gt;" in dom
    assert (ARTIFACTS / "web-page.png").stat().st_size > 10_000

    # The control: a page that puts the same text in as markup is caught by
    # the same checks, so the checks above would catch an injection.
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><html><body><div id=d></div><script>"
                       f"document.getElementById('d').innerHTML = {json.dumps(INJECTION)};</script></body></html>")
    caught = _Cells()
    caught.feed(_chromium(control.as_uri(), "--dump-dom", profile=tmp_path / "chromium"))
    assert caught.images == 1 and caught.pwned == "img"
