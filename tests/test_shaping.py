"""copiamail/scheduling/shaping.py: which jobs a scheduler leaves in their
folder for now. Here: a job whose transaction was interrupted before waits
until the node has run SUSPECT_SETTLE seconds (not in a drain), so a node
killed soon after each start does not interrupt the same jobs again and again."""

from __future__ import annotations

from copiamail.config import Config
from copiamail.jobfile import records
from copiamail.jobfile.fsfile import CommandFile
from copiamail.jobfile.job import parse_job
from copiamail.scheduling.shaping import SUSPECT_SETTLE, Shaping
from copiamail.spool.queue import Spool

START = 1_800_000_000.0


def _job(interrupted: bool):
    cf = CommandFile.parse(b"$email_address a@copia.com\n$email_text hi\n")
    if interrupted:
        cf = records.interrupted(cf, "N1", 66, "Z", "attempt interrupted", START - 60, records.Where(0))
    return parse_job(cf, "J.FS")


def test_an_interrupted_job_waits_until_the_node_has_settled_and_others_do_not(tmp_path):
    now = [START]
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    shaping = Shaping(Config(), spool, "N1", 0, 1, lambda key: None, clock=lambda: now[0])
    assert shaping.job_held_until(_job(False), "TOSEND") is None
    assert shaping.job_held_until(_job(True), "TOSEND") == START + SUSPECT_SETTLE
    now[0] += SUSPECT_SETTLE
    assert shaping.job_held_until(_job(True), "TOSEND") is None


def test_a_drain_sends_an_interrupted_job_at_once(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    shaping = Shaping(Config(), spool, "N1", 0, 1, lambda key: None, clock=lambda: START)
    shaping.settle_suspects = False
    assert shaping.job_held_until(_job(True), "TOSEND") is None
