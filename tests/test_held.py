"""copiamail.spool.held: the node's filter of the job names it holds in ACTIVE,
and the claims that trust it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from copiamail.jobfile.fsfile import CommandFile
from copiamail.spool.held import SLOTS, HeldNames, held_key, keys_in
from copiamail.spool.queue import Claimed, Destination, Spool

JOB = b"$email_address a@example.com\n"


def filtered_spool(tmp_path: Path, processes: int = 1) -> tuple[Spool, HeldNames]:
    sp = Spool(tmp_path / "spool", fsync=False)
    sp.ensure()
    held = HeldNames.create(processes)
    sp.use_held_names(held.for_process(0))
    return sp, held


def put(sp: Spool, name: str, data: bytes = JOB) -> None:
    (sp.folder("TOSEND") / name).write_bytes(data)


def waiting(sp: Spool, name: str):
    return next(w for w in sp.scan() if w.name == name)


def claimed_x(tmp_path: Path) -> tuple[Spool, HeldNames, Claimed]:
    """A filtered spool whose node N1 has claimed TOSEND/X.FS."""
    sp, held = filtered_spool(tmp_path)
    put(sp, "X.FS")
    claimed = sp.claim(waiting(sp, "X.FS"), "N1")
    assert claimed is not None
    return sp, held, claimed


X = held_key("N1", "TOSEND", "X.FS")


def test_a_name_counted_in_is_held_for_every_process_until_counted_out():
    held = HeldNames.create(2)
    one, two = held.for_process(0), held.for_process(1)
    assert not two.may_hold("TOSEND/X.FS")
    one.count_in("TOSEND/X.FS")
    assert two.may_hold("TOSEND/X.FS") and one.may_hold("TOSEND/X.FS") and held.may_hold("TOSEND/X.FS")
    one.count_out("TOSEND/X.FS")
    assert not two.may_hold("TOSEND/X.FS")


def test_a_name_counted_in_twice_stays_held_until_counted_out_twice():
    one = HeldNames.create(1).for_process(0)
    one.count_in("TOSEND/X.FS")
    one.count_in("TOSEND/X.FS")
    one.count_out("TOSEND/X.FS")
    assert one.may_hold("TOSEND/X.FS")
    one.count_out("TOSEND/X.FS")
    assert not one.may_hold("TOSEND/X.FS")


def test_a_process_cannot_count_out_a_name_another_counted_in():
    held = HeldNames.create(2)
    held.count_all_in(["TOSEND/X.FS"])  # found at the start
    one, two = held.for_process(0), held.for_process(1)
    one.count_in("TOSEND/Y.FS")
    two.count_out("TOSEND/Y.FS")
    one.count_out("TOSEND/X.FS")
    assert one.may_hold("TOSEND/Y.FS") and one.may_hold("TOSEND/X.FS")


def test_names_that_share_a_counter_keep_each_other_held():
    one = HeldNames.create(1).for_process(0)
    names = [f"TOSEND/{i:08d}.FS" for i in range(SLOTS + 1)]  # more names than counters: two share one
    for name in names:
        one.count_in(name)
    for name in names[1:]:
        one.count_out(name)
    assert one.may_hold(names[0])


def test_a_forked_process_counts_into_the_memory_its_parent_reads():
    held = HeldNames.create(2)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        held.for_process(1).count_in("TOSEND1/X.FS")
        os.write(w, b"x")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    os.waitpid(pid, 0)
    assert held.for_process(0).may_hold("TOSEND1/X.FS") and not held.may_hold("TOSEND/X.FS")


def test_there_is_no_row_for_a_process_past_the_count():
    with pytest.raises(ValueError):
        HeldNames.create(2).for_process(2)


# --- claims that trust it ---------------------------------------------------------


def test_a_claim_counts_its_name_in_and_the_published_result_counts_it_out(tmp_path):
    sp, held, claimed = claimed_x(tmp_path)
    assert held.may_hold(X)
    sp.finish(claimed, CommandFile.parse(b"done\n"), Destination.SENT)
    assert not held.may_hold(X)


def test_a_handed_back_job_is_counted_out(tmp_path):
    sp, held, claimed = claimed_x(tmp_path)
    sp.hand_back(claimed)
    assert not held.may_hold(X)


def test_a_job_handed_back_drops_a_result_of_it_left_uncommitted(tmp_path):
    # A deferral whose commit failed leaves its result (X.FS.BACK) in ACTIVE
    # and hands the job back: the result must not outlive the job there, or
    # it would later be published as a second copy of it.
    sp, held, claimed = claimed_x(tmp_path)
    (Path(claimed.file).parent / "X.FS.BACK").write_bytes(b"a result not committed\n")
    sp.hand_back(claimed)
    assert os.listdir(Path(claimed.file).parent) == [] and os.listdir(sp.folder("TOSEND")) == ["X.FS"]
    assert not held.may_hold(X)
    sp.finish_committed("N1", drop_uncommitted=False)
    assert os.listdir(sp.folder("TOSEND")) == ["X.FS"]


def test_keys_ignore_case_and_name_the_node():
    assert held_key("N1", "tosend1", "x.fs") == held_key("n1", "TOSEND1", "X.FS")
    assert held_key("N1", "TOSEND", "X.FS") != held_key("N2", "TOSEND", "X.FS")


def test_a_claim_that_lost_the_race_counts_nothing_in(tmp_path):
    sp, held = filtered_spool(tmp_path)
    put(sp, "X.FS")
    w = waiting(sp, "X.FS")
    (sp.folder("TOSEND") / "X.FS").unlink()  # another node took it
    assert sp.claim(w, "N1") is None
    assert not held.may_hold(X)


def test_a_job_claimed_to_send_at_once_is_named_sending_by_the_claim_and_recovered_as_begun(tmp_path):
    sp, held = filtered_spool(tmp_path)
    put(sp, "X.FS")
    claimed = sp.claim(waiting(sp, "X.FS"), "N1", sending=True)
    assert claimed is not None and claimed.marked_sending and held.may_hold(X)
    assert os.listdir(sp.active_dir("N1") / "TOSEND") == ["X.FS.SENDING"]
    assert Path(claimed.file).read_bytes() == JOB
    assert sp.mark_sending(claimed) == claimed  # no second rename
    only_claimed, begun, delivered = sp.claimed_jobs("N1")
    assert (only_claimed, begun, delivered) == ([], [claimed], [])


def test_a_claim_to_send_at_once_is_a_plain_claim_where_no_filter_rules_the_name_out(tmp_path):
    sp = Spool(tmp_path / "spool", fsync=False)
    sp.ensure()
    put(sp, "X.FS")
    claimed = sp.claim(waiting(sp, "X.FS"), "N1", sending=True)
    assert claimed is not None and not claimed.marked_sending
    assert os.listdir(sp.active_dir("N1") / "TOSEND") == ["X.FS"]


@pytest.mark.parametrize("step", ["claimed", "sending"])
def test_a_claim_to_send_at_once_never_replaces_a_job_of_its_name_still_in_active(tmp_path, step):
    sp, _ = filtered_spool(tmp_path)
    put(sp, "X.FS")
    first = sp.claim(waiting(sp, "X.FS"), "N1", sending=step == "sending")
    assert first is not None and first.marked_sending == (step == "sending")
    put(sp, "X.FS", b"$email_address second@b.c\n")
    assert sp.claim(waiting(sp, "X.FS"), "N1", sending=True) is None
    assert Path(first.file).read_bytes() == JOB and len(os.listdir(sp.active_dir("N1") / "TOSEND")) == 1
    assert (sp.folder("TOSEND") / "X.FS").read_bytes() == b"$email_address second@b.c\n"


@pytest.mark.parametrize("step", ["claimed", "sending", "delivered"])
def test_a_reused_name_waits_while_the_first_job_of_it_is_in_active(tmp_path, step):
    sp, _ = filtered_spool(tmp_path)
    put(sp, "X.FS")
    first = sp.claim(waiting(sp, "X.FS"), "N1")
    assert first is not None
    if step != "claimed":
        first = sp.mark_sending(first)
    if step == "delivered":
        first, mark = sp.mark_delivered(first)
        assert mark is not None
        os.close(mark.fd)
    put(sp, "X.FS", b"$email_address second@b.c\n")
    assert sp.claim(waiting(sp, "X.FS"), "N1") is None
    assert (sp.folder("TOSEND") / "X.FS").read_bytes() == b"$email_address second@b.c\n"


def test_a_reused_name_is_claimed_once_the_first_job_is_published(tmp_path):
    sp, _ = filtered_spool(tmp_path)
    put(sp, "X.FS")
    first = sp.claim(waiting(sp, "X.FS"), "N1")
    assert first is not None
    sp.finish(first, CommandFile.parse(b"done\n"), Destination.SENT)
    put(sp, "X.FS", b"$email_address second@b.c\n")
    assert sp.claim(waiting(sp, "X.FS"), "N1") is not None


@pytest.mark.parametrize("left", ["X.FS.SENT", "X.FS.FAIL", "X.FS.BACK", "X.FS.DELIVERED"])
def test_names_left_in_active_at_the_start_keep_a_reused_name_waiting(tmp_path, left):
    sp = Spool(tmp_path / "spool", fsync=False)
    sp.ensure()
    folder = sp.active_dir("N1") / "TOSEND"
    folder.mkdir(parents=True)
    (folder / left).write_bytes(b"the old job\n")
    held = HeldNames.create(1)
    held.count_all_in(keys_in(sp.active_dir("N1"), "N1"))
    sp.use_held_names(held.for_process(0))
    put(sp, "X.FS", b"$email_address second@b.c\n")
    assert sp.claim(waiting(sp, "X.FS"), "N1") is None
    assert os.listdir(folder) == [left]


def test_a_claim_trusts_the_filter_where_it_rules_a_name_out(tmp_path):
    # What the filter is for: a name it has never seen is not looked up on
    # disk. A stray file the filter was not told of shows that it was not.
    sp, _ = filtered_spool(tmp_path)
    folder = sp.active_dir("N1") / "TOSEND"
    folder.mkdir(parents=True)
    (folder / "X.FS.BACK").write_bytes(b"put there behind the filter's back\n")
    put(sp, "X.FS")
    assert sp.claim(waiting(sp, "X.FS"), "N1") is not None
