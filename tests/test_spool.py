"""copiamail.spool: folders, scan order, claims and the crash states of its docstring."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

import copiamail.spool.queue as spool_mod
from copiamail import osutil
from copiamail.jobfile.fsfile import CommandFile
from copiamail.scheduling.results import Result, ResultWriter, Tally
from copiamail.spool.queue import Claimed, Destination, QueuedJob, Spool, queue_names
from copiamail.spool.results import Spares

JOB = b"$email_address a@example.com\n"


def make_spool(tmp_path: Path, queues: int = 15) -> Spool:
    sp = Spool(tmp_path / "spool", queues=queues, fsync=False)
    sp.ensure()
    return sp


def put(sp: Spool, queue: str, name: str, data: bytes = JOB) -> Path:
    path = sp.folder(queue) / name
    path.write_bytes(data)
    return path


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def active_files(sp: Spool) -> list[str]:
    """Files in ACTIVE other than spares (which hold no job)."""
    base = sp.root / spool_mod.ACTIVE
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and p.parent.name != spool_mod.SPARE)


def spares(sp: Spool, node: str = "N1") -> list[Path]:
    folder = sp.active_dir(node) / spool_mod.SPARE
    return sorted(folder.iterdir()) if folder.is_dir() else []


# --- ensure ------------------------------------------------------------------


def test_ensure_creates_every_tosend_folder_and_active_sent_fail_temp(tmp_path):
    sp = Spool(tmp_path / "root", queues=15)
    sp.ensure()
    expected = {"TOSEND", *(f"TOSEND{i}" for i in range(1, 16)), "ACTIVE", "SENT", "FAIL", "TEMP"}
    assert {p.name for p in (tmp_path / "root").iterdir() if p.is_dir()} == expected


def test_ensure_honours_the_number_of_queues(tmp_path):
    sp = Spool(tmp_path / "root", queues=3)
    sp.ensure()
    names = {p.name for p in (tmp_path / "root").iterdir()}
    assert names == {"TOSEND", "TOSEND1", "TOSEND2", "TOSEND3", "ACTIVE", "SENT", "FAIL", "TEMP"}


def test_ensure_keeps_existing_folders_and_their_jobs(tmp_path):
    sp = make_spool(tmp_path)
    put(sp, "TOSEND", "A.FS")
    sp.ensure()
    assert listing(sp.folder("TOSEND")) == ["A.FS"]


def test_queue_names_are_tosend_then_numbered_in_priority_order():
    assert queue_names(3) == ["TOSEND", "TOSEND1", "TOSEND2", "TOSEND3"]


# --- scan --------------------------------------------------------------------


def test_scan_offers_tosend_before_tosend1_before_tosend2(tmp_path):
    sp = make_spool(tmp_path)
    put(sp, "TOSEND2", "A.FS")
    put(sp, "TOSEND1", "Z.FS")
    put(sp, "TOSEND", "M.FS")
    assert [(w.queue, w.name) for w in sp.scan()] == [("TOSEND", "M.FS"), ("TOSEND1", "Z.FS"), ("TOSEND2", "A.FS")]


def test_scan_orders_queues_by_priority_number_not_string_so_tosend10_after_tosend9(tmp_path):
    sp = make_spool(tmp_path)
    for q in ("TOSEND10", "TOSEND9", "TOSEND2", "TOSEND15", "TOSEND1"):
        put(sp, q, "J.FS")
    assert [w.queue for w in sp.scan()] == ["TOSEND1", "TOSEND2", "TOSEND9", "TOSEND10", "TOSEND15"]
    prios = [w.priority for w in sp.scan()]
    assert prios == sorted(prios)


def test_scan_orders_a_folder_by_file_name_in_byte_order(tmp_path):
    sp = make_spool(tmp_path)
    names = ["b.FS", "B.FS", "a.FS", "A.FS", "10.FS", "9.FS", "_x.FS", "\u00e9.FS", "~.FS"]
    for n in names:
        put(sp, "TOSEND", n)
    got = [w.name for w in sp.scan()]
    assert got == sorted(names, key=lambda n: n.encode("utf-8"))
    # byte order: upper case before lower case, '10' before '9'
    assert got.index("B.FS") < got.index("a.FS")
    assert got.index("10.FS") < got.index("9.FS")


def test_waiting_order_key_is_priority_then_name_bytes(tmp_path):
    sp = make_spool(tmp_path)
    put(sp, "TOSEND3", "A.FS")
    put(sp, "TOSEND", "Z.FS")
    waiting = list(sp.scan())
    assert sorted(waiting, key=lambda w: w.order) == waiting
    assert waiting[0].order == (0, b"Z.FS")


def test_scan_counts_only_fs_files_in_any_case(tmp_path):
    sp = make_spool(tmp_path)
    for n in ("A.FS", "b.fs", "C.Fs", "D.TFS", "E.tmp", "F.FS.BACK", "G.FS.tmp", "H.FSX", ".FS", "I.txt"):
        put(sp, "TOSEND", n)
    (sp.folder("TOSEND") / "DIR.FS").mkdir()
    assert [w.name for w in sp.scan()] == ["A.FS", "C.Fs", "b.fs"]


def test_scan_of_a_missing_queue_folder_is_empty(tmp_path):
    sp = Spool(tmp_path / "nothing", queues=2, fsync=False)
    assert list(sp.scan()) == []


def test_a_leftover_queue_folder_sorts_after_every_configured_queue(tmp_path):
    sp = make_spool(tmp_path, queues=2)
    assert sp.priority("TOSEND") == 0 and sp.priority("TOSEND2") == 2
    assert sp.priority("TOSEND5") > sp.priority("TOSEND2")
    assert sp.priority("TOSEND10") > sp.priority("TOSEND9")


# --- claim -------------------------------------------------------------------


def test_claim_moves_the_job_to_active_node_queue_name(tmp_path):
    sp = make_spool(tmp_path)
    put(sp, "TOSEND2", "X.FS", b"data\n")
    [w] = sp.scan()
    c = sp.claim(w, "N1")
    assert c == Claimed("N1", "TOSEND2", "X.FS", str(sp.root / "ACTIVE" / "N1" / "TOSEND2" / "X.FS"))
    assert c.path.read_bytes() == b"data\n"
    assert listing(sp.folder("TOSEND2")) == []
    assert list(sp.scan()) == []


def signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def test_a_claimed_job_is_unchanged_when_the_claim_kept_the_file_read_before_it(tmp_path):
    sp = make_spool(tmp_path)
    path = put(sp, "TOSEND", "X.FS")
    sig = signature(path)
    [w] = sp.scan()
    assert sp.unchanged(sp.claim(w, "N1"), sig)


def test_a_job_rewritten_after_it_was_read_is_not_unchanged_once_claimed(tmp_path):
    sp = make_spool(tmp_path)
    path = put(sp, "TOSEND", "X.FS")
    sig = signature(path)
    path.write_bytes(JOB + b"$email_subject changed\n")
    [w] = sp.scan()
    assert not sp.unchanged(sp.claim(w, "N1"), sig)


def test_a_second_claim_of_the_same_waiting_job_returns_none(tmp_path):
    sp = make_spool(tmp_path)
    put(sp, "TOSEND", "X.FS")
    [w] = sp.scan()
    first = sp.claim(w, "N1")
    second = sp.claim(w, "N2")
    assert first is not None
    assert second is None
    assert active_files(sp) == ["N1/TOSEND/X.FS"]


def test_a_second_claim_by_the_same_node_returns_none(tmp_path):
    sp = make_spool(tmp_path)
    put(sp, "TOSEND", "X.FS")
    [w] = sp.scan()
    assert sp.claim(w, "N1") is not None
    assert sp.claim(w, "N1") is None


def test_claim_of_a_job_that_vanished_returns_none(tmp_path):
    sp = make_spool(tmp_path)
    w = QueuedJob(0, "TOSEND", "GONE.FS", str(sp.folder("TOSEND") / "GONE.FS"))
    assert sp.claim(w, "N1") is None


def test_read_returns_the_claimed_job_as_a_command_file(tmp_path):
    sp = make_spool(tmp_path)
    put(sp, "TOSEND", "X.FS", JOB)
    c = sp.claim(next(sp.scan()), "N1")
    assert sp.read(c).to_bytes() == JOB


# --- finish / hand_back ------------------------------------------------------


def _claim(sp: Spool, queue: str = "TOSEND3", name: str = "X.FS", data: bytes = JOB) -> Claimed:
    put(sp, queue, name, data)
    w = next(w for w in sp.scan() if w.name == name and w.queue == queue)
    c = sp.claim(w, "N1")
    assert c is not None
    return c


@pytest.mark.parametrize("dest", [Destination.SENT, Destination.FAIL])
def test_finish_writes_the_new_bytes_to_sent_or_fail_and_leaves_nothing_in_active(tmp_path, dest):
    sp = make_spool(tmp_path)
    c = _claim(sp)
    new = CommandFile.parse(JOB + b"$fax_status1 6\n")
    where = sp.finish(c, new, dest)
    assert where == sp.folder(dest) / "X.FS"
    assert where.read_bytes() == JOB + b"$fax_status1 6\n"
    assert active_files(sp) == []
    assert listing(sp.folder("TOSEND3")) == []


@pytest.mark.parametrize("dest", [Destination.BACK])
def test_finish_back_returns_the_new_bytes_to_the_jobs_own_queue(tmp_path, dest):
    sp = make_spool(tmp_path)
    c = _claim(sp, "TOSEND3")
    new = CommandFile.parse(JOB + b"$var_def DOMAINBUSY_COUNT 1\n")
    where = sp.finish(c, new, dest)
    assert where == sp.folder("TOSEND3") / "X.FS"
    assert where.read_bytes() == JOB + b"$var_def DOMAINBUSY_COUNT 1\n"
    assert active_files(sp) == []
    assert [w.name for w in sp.scan()] == ["X.FS"]


def test_finish_with_fsync_on_works(tmp_path):
    sp = Spool(tmp_path / "s", fsync=True)
    sp.ensure()
    c = _claim(sp)
    assert sp.finish(c, CommandFile.parse(b"new\n"), Destination.SENT).read_bytes() == b"new\n"


@pytest.mark.parametrize("dest,folder", [(Destination.BACK, "TOSEND3"), (Destination.SENT, "SENT"), (Destination.FAIL, "FAIL")])
def test_a_write_back_never_replaces_a_different_job_that_took_the_same_name(tmp_path, dest, folder):
    sp = make_spool(tmp_path)
    c = _claim(sp, "TOSEND3")
    other = put(sp, folder, "X.FS", b"another job\n")
    where = sp.finish(c, CommandFile.parse(b"mine\n"), dest)
    assert where == sp.folder(folder) / "X~1.FS"
    assert where.read_bytes() == b"mine\n"
    assert other.read_bytes() == b"another job\n"
    assert active_files(sp) == []


def test_a_write_back_takes_the_next_free_tilde_number(tmp_path):
    sp = make_spool(tmp_path)
    c = _claim(sp, "TOSEND3", "X.fs")
    put(sp, "SENT", "X.fs", b"0")
    put(sp, "SENT", "X~1.fs", b"1")
    where = sp.finish(c, CommandFile.parse(b"mine\n"), Destination.SENT)
    assert where.name == "X~2.fs"
    assert (sp.folder("SENT") / "X.fs").read_bytes() == b"0"
    assert (sp.folder("SENT") / "X~1.fs").read_bytes() == b"1"


def test_finish_recreates_a_missing_destination_folder(tmp_path):
    sp = make_spool(tmp_path)
    c = _claim(sp)
    os.rmdir(sp.folder("SENT"))
    where = sp.finish(c, CommandFile.parse(b"x\n"), Destination.SENT)
    assert where == sp.folder("SENT") / "X.FS"


def test_hand_back_returns_the_unchanged_file_to_its_queue(tmp_path):
    sp = make_spool(tmp_path)
    data = b"; comment\r\n$email_address a@b.c\r\n\x00junk"
    c = _claim(sp, "TOSEND7", "X.FS", data)
    where = sp.hand_back(c)
    assert where == sp.folder("TOSEND7") / "X.FS"
    assert where.read_bytes() == data
    assert active_files(sp) == []


def test_hand_back_never_replaces_a_different_job_with_the_same_name(tmp_path):
    sp = make_spool(tmp_path)
    c = _claim(sp, "TOSEND", "X.FS", b"mine")
    put(sp, "TOSEND", "X.FS", b"theirs")
    where = sp.hand_back(c)
    assert where.name == "X~1.FS"
    assert where.read_bytes() == b"mine"
    assert (sp.folder("TOSEND") / "X.FS").read_bytes() == b"theirs"


def test_finish_and_collision_work_with_the_link_unlink_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(osutil, "_RENAMEAT2", None)
    sp = make_spool(tmp_path)
    c = _claim(sp, "TOSEND1")
    put(sp, "TOSEND1", "X.FS", b"theirs")
    where = sp.finish(c, CommandFile.parse(b"mine\n"), Destination.BACK)
    assert where == sp.folder("TOSEND1") / "X~1.FS"
    assert where.read_bytes() == b"mine\n"
    assert where.stat().st_nlink == 1
    assert active_files(sp) == []


# --- crash states (claimed_jobs) -----------------------------------------------


def qdir(sp: Spool, node: str = "N1", queue: str = "TOSEND4") -> Path:
    d = sp.active_dir(node) / queue
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_claimed_jobs_of_a_node_without_active_folder_is_empty(tmp_path):
    sp = make_spool(tmp_path)
    assert sp.claimed_jobs("N1")[0] == []


def test_crash_in_state_2_the_claimed_job_is_returned_as_claimed(tmp_path):
    sp = make_spool(tmp_path)
    d = qdir(sp)
    (d / "X.FS").write_bytes(b"orig")
    assert sp.claimed_jobs("N1")[0] == [Claimed("N1", "TOSEND4", "X.FS", str(d / "X.FS"))]
    assert (d / "X.FS").read_bytes() == b"orig"


@pytest.mark.parametrize("suffix", ["SENT", "FAIL", "BACK"])
def test_crash_in_state_3_the_uncommitted_result_is_deleted_and_the_job_is_claimed(tmp_path, suffix):
    sp = make_spool(tmp_path)
    d = qdir(sp)
    (d / "X.FS").write_bytes(b"orig")
    (d / f"X.FS.{suffix}").write_bytes(b"result")
    assert sp.claimed_jobs("N1")[0] == [Claimed("N1", "TOSEND4", "X.FS", str(d / "X.FS"))]
    assert listing(d) == ["X.FS"]
    assert (d / "X.FS").read_bytes() == b"orig"
    for folder in ("SENT", "FAIL", "TOSEND4"):
        assert listing(sp.folder(folder)) == []


@pytest.mark.parametrize("suffix", ["SENT", "FAIL"])
def test_crash_in_state_4_a_committed_result_is_published_and_nothing_is_claimed(tmp_path, suffix):
    sp = make_spool(tmp_path)
    d = qdir(sp)
    (d / f"X.FS.{suffix}").write_bytes(b"result")
    assert sp.claimed_jobs("N1")[0] == []
    assert (sp.folder(suffix) / "X.FS").read_bytes() == b"result"
    assert listing(d) == []
    assert listing(sp.folder("TOSEND4")) == []


def test_crash_in_state_4_a_committed_back_result_is_published_to_its_own_queue(tmp_path):
    sp = make_spool(tmp_path)
    d = qdir(sp, queue="TOSEND11")
    (d / "X.FS.BACK").write_bytes(b"result")
    assert sp.claimed_jobs("N1")[0] == []
    assert (sp.folder("TOSEND11") / "X.FS").read_bytes() == b"result"
    assert listing(d) == []


def test_crash_in_state_4_publishing_never_replaces_a_job_with_the_same_name(tmp_path):
    sp = make_spool(tmp_path)
    d = qdir(sp)
    (d / "X.FS.SENT").write_bytes(b"result")
    put(sp, "SENT", "X.FS", b"another")
    assert sp.claimed_jobs("N1")[0] == []
    assert (sp.folder("SENT") / "X.FS").read_bytes() == b"another"
    assert (sp.folder("SENT") / "X~1.FS").read_bytes() == b"result"


@pytest.mark.parametrize("suffix,folder", [("SENT", "SENT"), ("FAIL", "FAIL"), ("BACK", "TOSEND4")])
def test_a_result_already_linked_into_its_folder_is_deleted_not_published_twice(tmp_path, suffix, folder):
    sp = make_spool(tmp_path)
    d = qdir(sp)
    result = d / f"X.FS.{suffix}"
    result.write_bytes(b"result")
    os.link(result, sp.folder(folder) / "X.FS")  # link() done, crash before unlink()
    assert sp.claimed_jobs("N1")[0] == []
    assert listing(d) == []
    assert listing(sp.folder(folder)) == ["X.FS"]
    assert (sp.folder(folder) / "X.FS").read_bytes() == b"result"
    assert (sp.folder(folder) / "X.FS").stat().st_nlink == 1


def test_stray_tmp_files_in_active_are_deleted(tmp_path):
    sp = make_spool(tmp_path)
    d = qdir(sp)
    (d / "X.FS.tmp").write_bytes(b"half")
    (d / "Y.FS").write_bytes(b"job")
    assert [c.name for c in sp.claimed_jobs("N1")[0]] == ["Y.FS"]
    assert listing(d) == ["Y.FS"]


def test_claimed_jobs_mixes_states_across_queues_and_leaves_other_nodes_alone(tmp_path):
    sp = make_spool(tmp_path)
    d1 = qdir(sp, queue="TOSEND")
    d2 = qdir(sp, queue="TOSEND2")
    other = qdir(sp, node="N2", queue="TOSEND")
    (d1 / "B.FS").write_bytes(b"b")
    (d1 / "A.FS").write_bytes(b"a")
    (d1 / "A.FS.SENT").write_bytes(b"a2")
    (d2 / "C.FS.FAIL").write_bytes(b"c2")
    (d2 / "D.fs").write_bytes(b"d")
    (other / "Z.FS").write_bytes(b"z")
    (other / "Y.FS.SENT").write_bytes(b"y")
    got = sp.claimed_jobs("N1")[0]
    assert [(c.queue, c.name) for c in got] == [("TOSEND", "A.FS"), ("TOSEND", "B.FS"), ("TOSEND2", "D.fs")]
    assert (sp.folder("FAIL") / "C.FS").read_bytes() == b"c2"
    assert listing(sp.folder("SENT")) == []
    assert listing(other) == ["Y.FS.SENT", "Z.FS"]


def test_a_real_claim_then_claimed_jobs_returns_it(tmp_path):
    sp = make_spool(tmp_path)
    c = _claim(sp, "TOSEND9")
    assert sp.claimed_jobs("N1")[0] == [c]


# --- counts --------------------------------------------------------------------


def test_counts_per_folder_and_per_node_in_active(tmp_path):
    sp = make_spool(tmp_path, queues=2)
    put(sp, "TOSEND", "A.FS")
    put(sp, "TOSEND", "B.fs")
    put(sp, "TOSEND", "C.TFS")
    put(sp, "TOSEND2", "D.FS")
    put(sp, "SENT", "E.FS")
    put(sp, "FAIL", "F.FS")
    put(sp, "FAIL", "G.FS")
    (qdir(sp, "N1", "TOSEND") / "H.FS").write_bytes(b"")
    (qdir(sp, "N1", "TOSEND1") / "I.FS").write_bytes(b"")
    (qdir(sp, "N1", "TOSEND1") / "I.FS.SENT").write_bytes(b"")
    (qdir(sp, "N2", "TOSEND") / "J.FS").write_bytes(b"")
    sp.lock_path("N1").write_bytes(b"")
    assert sp.counts() == {
        "TOSEND": 2, "TOSEND1": 0, "TOSEND2": 1, "SENT": 1, "FAIL": 2,
        "ACTIVE/N1": 2, "ACTIVE/N2": 1,
    }


def test_counts_of_an_empty_or_missing_spool_are_zero(tmp_path):
    sp = Spool(tmp_path / "none", queues=1)
    assert sp.counts() == {"TOSEND": 0, "TOSEND1": 0, "SENT": 0, "FAIL": 0}


def test_a_tosend_folder_beyond_queues_still_drains_after_the_configured_ones(tmp_path):
    from copiamail.spool.queue import Spool

    spool = Spool(tmp_path, queues=2)
    spool.ensure()
    (tmp_path / "TOSEND16").mkdir()
    (tmp_path / "TOSEND16" / "A.FS").write_text("$email_address a@b.c\n")
    (tmp_path / "TOSEND2" / "B.FS").write_text("$email_address a@b.c\n")
    assert [(w.queue, w.name) for w in spool.scan()] == [("TOSEND2", "B.FS"), ("TOSEND16", "A.FS")]
    assert spool.counts()["TOSEND16"] == 1


def test_a_delivered_job_is_listed_apart_and_its_uncommitted_result_dropped(tmp_path):
    from copiamail.spool.queue import Claimed, Spool

    sp = Spool(tmp_path)
    sp.ensure()
    d = tmp_path / "ACTIVE" / "N1" / "TOSEND"
    d.mkdir(parents=True)
    (d / "X.FS.DELIVERED").write_text("$email_address a@b.test\n")
    (d / "X.FS.SENT").write_text("partial")  # written but not committed: the marker still exists
    claimed, interrupted, delivered = sp.claimed_jobs("N1")
    assert claimed == interrupted == [] and delivered == [Claimed("N1", "TOSEND", "X.FS", str(d / "X.FS.DELIVERED"))]
    assert not (d / "X.FS.SENT").exists() and not (tmp_path / "SENT" / "X.FS").exists()


def test_a_job_being_sent_is_listed_apart_from_one_only_claimed_and_its_uncommitted_result_dropped(tmp_path):
    from copiamail.spool.queue import Claimed, Spool

    sp = Spool(tmp_path)
    sp.ensure()
    (tmp_path / "TOSEND" / "A.FS").write_text("$email_address a@b.test\n")
    (tmp_path / "TOSEND" / "B.FS").write_text("$email_address b@b.test\n")
    [a, b] = sorted(sp.scan(), key=lambda w: w.name)
    a_claimed, b_claimed = sp.claim(a, "N1"), sp.claim(b, "N1")
    sending = sp.mark_sending(b_claimed)
    assert sp.mark_sending(sending) == sending  # marked once: tried again on another host, it stays
    d = tmp_path / "ACTIVE" / "N1" / "TOSEND"
    assert sending.path == d / "B.FS.SENDING" and sorted(os.listdir(d)) == ["A.FS", "B.FS.SENDING"]
    (d / "B.FS.BACK").write_text("partial")  # written but not committed: the mark still exists
    assert sp.claimed_jobs("N1") == ([a_claimed], [Claimed("N1", "TOSEND", "B.FS", str(d / "B.FS.SENDING"))], [])
    assert not (d / "B.FS.BACK").exists()
    assert sp.counts()["ACTIVE/N1"] == 2
    (tmp_path / "TOSEND" / "B.FS").write_text("a new job of the same name\n")
    assert sp.claim(next(w for w in sp.scan() if w.name == "B.FS"), "N1") is None  # waits its turn


def test_a_claim_never_replaces_a_job_of_the_same_name_still_claimed(tmp_path):
    from copiamail.spool.queue import Spool

    sp = Spool(tmp_path)
    sp.ensure()
    (tmp_path / "TOSEND" / "X.FS").write_text("first\n")
    [w] = list(sp.scan())
    first = sp.claim(w, "N1")
    (tmp_path / "TOSEND" / "X.FS").write_text("second\n")  # the name reused while the first is in flight
    [w2] = list(sp.scan())
    assert sp.claim(w2, "N1") is None
    assert first.path.read_text() == "first\n" and (tmp_path / "TOSEND" / "X.FS").read_text() == "second\n"


@pytest.mark.parametrize("renameat2", [True, False])
def test_a_claim_never_replaces_a_job_of_the_same_name_claimed_or_delivered(tmp_path, monkeypatch, renameat2):
    # Without RENAME_NOREPLACE (NFS, old kernels) the check is made before a
    # plain rename: never link-then-unlink, which two nodes could both win.
    if not renameat2:
        monkeypatch.setattr(osutil, "_RENAMEAT2", None)
    sp = make_spool(tmp_path)
    first = _claim(sp, "TOSEND", "X.FS")
    put(sp, "TOSEND", "X.FS", b"$email_address second@b.c\n")
    [w] = sp.scan()
    assert sp.claim(w, "N1") is None
    sp.mark_delivered(first)
    assert sp.claim(w, "N1") is None
    assert active_files(sp) == ["N1/TOSEND/X.FS.DELIVERED"]
    assert (sp.folder("TOSEND") / "X.FS").read_bytes() == b"$email_address second@b.c\n"


def test_a_delivered_mark_is_the_result_file_named_beside_the_sending_job(tmp_path):
    sp = make_spool(tmp_path)
    sp.finish(_claim(sp, "TOSEND", "A.FS"), CommandFile.parse(b"a done\n"), Destination.SENT)  # leaves a spare
    [spare] = spares(sp)
    inode = spare.stat().st_ino
    x = sp.mark_sending(_claim(sp, "TOSEND", "X.FS"))
    marked, mark = sp.mark_delivered(x)
    assert marked == x and mark is not None and mark.result == x.file.removesuffix(".SENDING") + ".SENT"
    assert os.fstat(mark.fd).st_ino == inode and spares(sp) == []  # one rename, the spare's
    assert active_files(sp) == ["N1/TOSEND/X.FS.SENDING", "N1/TOSEND/X.FS.SENT"]
    put(sp, "TOSEND", "X.FS", b"$email_address second@b.c\n")  # the name reused meanwhile: not claimed
    assert sp.claim(next(iter(sp.scan())), "N1") is None
    assert sp.write_delivered(mark, CommandFile.parse(b"x done\n")) == mark
    [landed] = sp.write_results([(marked, CommandFile.parse(b"x done\n"), Destination.SENT)], [mark]).commit()
    assert landed == sp.folder("SENT") / "X.FS" and landed.read_bytes() == b"x done\n"
    assert active_files(sp) == []


def test_without_a_spare_to_rename_the_claimed_job_is_renamed_delivered(tmp_path):
    sp = make_spool(tmp_path)
    x = sp.mark_sending(_claim(sp, "TOSEND", "X.FS"))
    (sp.active_dir("N1") / spool_mod.SPARE).write_bytes(b"")  # no spare folder can be made
    marked, mark = sp.mark_delivered(x)
    assert mark is None and marked.path.read_bytes() == JOB
    assert os.listdir(sp.active_dir("N1") / "TOSEND") == ["X.FS.DELIVERED"]


def test_a_delivered_result_not_synced_keeps_its_mark_and_is_written_again_over_it(tmp_path):
    sp = make_spool(tmp_path)
    x, mark = sp.mark_delivered(sp.mark_sending(_claim(sp, "TOSEND", "X.FS")))
    assert mark is not None
    sp.write_delivered(mark, CommandFile.parse(b"x done\n"))
    batch = sp.write_results([(x, CommandFile.parse(b"x done\n"), Destination.SENT)], [mark])
    batch.synced([errno.EIO])
    [out] = batch.commit()
    assert isinstance(out, OSError) and out.errno == errno.EIO
    assert active_files(sp) == ["N1/TOSEND/X.FS.SENDING", "N1/TOSEND/X.FS.SENT"]  # still marked delivered
    assert sp.finish(x, CommandFile.parse(b"x done, again\n"), Destination.SENT) == sp.folder("SENT") / "X.FS"
    assert (sp.folder("SENT") / "X.FS").read_bytes() == b"x done, again\n" and active_files(sp) == []


@pytest.mark.parametrize("left", ["X.FS.SENT", "X.FS.FAIL", "X.FS.BACK"])
def test_a_name_whose_result_waits_in_active_is_not_claimed_again(tmp_path, left):
    # A result committed but not yet published (its folder could not take it)
    # is the old job: a new job of the same name must neither replace it nor,
    # marked sending beside it, be taken for delivered after a crash.
    sp = make_spool(tmp_path)
    d = sp.active_dir("N1") / "TOSEND"
    d.mkdir(parents=True)
    (d / left).write_bytes(b"the old job, done\n")
    put(sp, "TOSEND", "X.FS", b"$email_address second@b.c\n")
    assert sp.claim(next(iter(sp.scan())), "N1") is None
    assert (sp.folder("TOSEND") / "X.FS").exists() and os.listdir(d) == [left]


def test_a_job_marked_delivered_is_never_handed_back(tmp_path):
    sp = make_spool(tmp_path)
    x, mark = sp.mark_delivered(sp.mark_sending(_claim(sp, "TOSEND", "X.FS")))
    assert mark is not None
    os.close(mark.fd)
    with pytest.raises(FileExistsError):
        sp.hand_back(x)
    assert listing(sp.folder("TOSEND")) == []
    assert active_files(sp) == ["N1/TOSEND/X.FS.DELIVERED", "N1/TOSEND/X.FS.SENT"]
    claimed, interrupted, delivered = sp.claimed_jobs("N1")  # at recovery: finished to SENT, not sent again
    assert claimed == interrupted == [] and [c.name for c in delivered] == ["X.FS"]


# --- spare files -------------------------------------------------------------------


def test_the_claimed_copy_becomes_a_spare_and_the_next_result_is_written_into_it(tmp_path):
    sp = make_spool(tmp_path)
    a = _claim(sp, "TOSEND", "A.FS")
    sp.finish(a, CommandFile.parse(b"a done\n"), Destination.SENT)
    [spare] = spares(sp)
    inode = spare.stat().st_ino
    assert spare.read_bytes() == JOB  # the old copy: no job name, never scanned
    b = _claim(sp, "TOSEND", "B.FS")
    sp.finish(b, CommandFile.parse(b"b done\n"), Destination.SENT)
    assert (sp.folder("SENT") / "B.FS").stat().st_ino == inode  # written into the spare
    assert (sp.folder("SENT") / "B.FS").read_bytes() == b"b done\n"
    assert len(spares(sp)) == 1
    # Written over the spare: a shorter result is cut to its length, a longer one grows it.
    assert len(b"b done\n") < len(JOB)
    c = _claim(sp, "TOSEND", "C.FS")
    sp.finish(c, CommandFile.parse(JOB + b"$var_def MORE " + b"x" * 300 + b"\n"), Destination.SENT)
    assert (sp.folder("SENT") / "C.FS").read_bytes() == JOB + b"$var_def MORE " + b"x" * 300 + b"\n"


def test_a_stopping_node_deletes_its_spares_and_recovery_deletes_any_left(tmp_path):
    sp = make_spool(tmp_path)
    sp.finish(_claim(sp, "TOSEND", "A.FS"), CommandFile.parse(b"x\n"), Destination.SENT)
    assert len(spares(sp)) == 1
    sp.drop_spares()
    assert spares(sp) == []
    (sp.active_dir("N1") / spool_mod.SPARE / "999-1").write_bytes(b"left by a crash")
    assert sp.claimed_jobs("N1") == ([], [], [])
    assert spares(sp) == []


def test_a_spare_removed_by_hand_is_replaced_by_a_new_file(tmp_path):
    sp = make_spool(tmp_path)
    sp.finish(_claim(sp, "TOSEND", "A.FS"), CommandFile.parse(b"a\n"), Destination.SENT)
    for f in spares(sp):
        f.unlink()
    sp.finish(_claim(sp, "TOSEND", "B.FS"), CommandFile.parse(b"b\n"), Destination.FAIL)
    assert (sp.folder("FAIL") / "B.FS").read_bytes() == b"b\n"
    assert active_files(sp) == []


def test_finish_many_lands_every_job_and_reports_a_failure_for_its_own_job_only(tmp_path):
    sp = make_spool(tmp_path)
    a, b, c = (_claim(sp, "TOSEND", n) for n in ("A.FS", "B.FS", "C.FS"))
    b.path.unlink()  # B's claimed copy is gone: its commit cannot happen
    landed = sp.finish_many([(a, CommandFile.parse(b"a\n"), Destination.SENT), (b, CommandFile.parse(b"b\n"), Destination.FAIL),
                             (c, CommandFile.parse(b"c\n"), Destination.BACK)])
    assert landed[0] == sp.folder("SENT") / "A.FS" and landed[2] == sp.folder("TOSEND") / "C.FS"
    assert isinstance(landed[1], FileNotFoundError)
    assert (sp.folder("SENT") / "A.FS").read_bytes() == b"a\n"
    assert (sp.folder("TOSEND") / "C.FS").read_bytes() == b"c\n"
    assert not (sp.folder("FAIL") / "B.FS").exists()
    # B's result is the only copy left: recovery publishes it (as state 4).
    assert active_files(sp) == ["N1/TOSEND/B.FS.FAIL"]
    assert sp.claimed_jobs("N1") == ([], [], [])
    assert active_files(sp) == []
    assert (sp.folder("FAIL") / "B.FS").read_bytes() == b"b\n"


def test_finish_many_of_nothing_does_nothing(tmp_path):
    assert make_spool(tmp_path).finish_many([]) == []


def test_a_result_whose_fsync_failed_elsewhere_is_dropped_and_its_job_stays_claimed(tmp_path):
    sp = make_spool(tmp_path)
    a, b = (_claim(sp, "TOSEND", n) for n in ("A.FS", "B.FS"))
    batch = sp.write_results([(a, CommandFile.parse(b"a\n"), Destination.SENT), (b, CommandFile.parse(b"b\n"), Destination.SENT)])
    assert len(batch.fds) == 2
    batch.synced([0, errno.EIO])  # the syncer's answer: B's file is not durable
    landed = batch.commit()
    assert landed[0] == sp.folder("SENT") / "A.FS"
    assert isinstance(landed[1], OSError) and landed[1].errno == errno.EIO
    assert b.path.exists() and sorted(os.listdir(sp.folder("SENT"))) == ["A.FS"]
    assert active_files(sp) == ["N1/TOSEND/B.FS"]


def test_a_deferral_whose_commit_failed_goes_back_once_and_leaves_nothing_to_publish(tmp_path, monkeypatch):
    # Its result is named X.FS.BACK, then the commit's rename of the claimed
    # copy fails (a full disk): the job is handed back, and its uncommitted
    # result must not be published later as a second copy of it.
    sp = make_spool(tmp_path)
    claimed = _claim(sp, "TOSEND", "X.FS")

    def full(self, claimed):
        raise OSError(errno.ENOSPC, "No space left on device", claimed.file)

    monkeypatch.setattr(Spares, "retire", full)

    async def defer() -> list[Path | None]:
        writer = ResultWriter(sp, "N1", start_syncer=lambda: None)
        landed: list[Path | None] = []
        await writer.write(Result(claimed, CommandFile.parse(JOB + b"$var_def DOMAINBUSY_COUNT 1\n"),
                                  Destination.BACK, Tally.DEFERRED, landed.append))
        return landed

    assert asyncio.run(defer()) == [sp.folder("TOSEND") / "X.FS"]
    monkeypatch.undo()
    assert active_files(sp) == [] and listing(sp.folder("TOSEND")) == ["X.FS"]
    sp.finish_committed("N1")
    assert listing(sp.folder("TOSEND")) == ["X.FS"] and (sp.folder("TOSEND") / "X.FS").read_bytes() == JOB


def test_a_claim_goes_back_when_the_job_of_its_name_was_marked_sending_during_it(tmp_path, monkeypatch):
    # The claim looks for the other names first and renames next: another
    # worker marking its job of the same name sending in between must not
    # leave two jobs of one name in ACTIVE (the second's own mark would
    # replace the first's).
    sp = make_spool(tmp_path)
    first = _claim(sp, "TOSEND", "X.FS")
    put(sp, "TOSEND", "X.FS", b"$email_address second@b.c\n")
    rename = spool_mod.claim_rename
    marked: list[Claimed] = []

    def marked_meanwhile(src: str, dest_dir: str, dest: str) -> bool:
        marked.append(sp.mark_sending(first))
        return rename(src, dest_dir, dest)

    monkeypatch.setattr(spool_mod, "claim_rename", marked_meanwhile)
    assert sp.claim(next(iter(sp.scan())), "N1") is None
    assert active_files(sp) == ["N1/TOSEND/X.FS.SENDING"] and marked[0].path.read_bytes() == JOB
    assert (sp.folder("TOSEND") / "X.FS").read_bytes() == b"$email_address second@b.c\n"
