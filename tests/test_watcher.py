"""copiamail.watcher: job file events, reported from a child process."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from copiamail.spool.watcher import SpoolWatcher


async def watch_while(folders: list[Path], act, seconds: float = 5.0, polling: bool = False,
                      kinds: list[tuple[str, bool]] | None = None) -> tuple[list[str], SpoolWatcher]:
    """Start a watcher, run ``act`` once it is up, and collect the paths it
    reports until ``seconds`` pass or the expected count arrives (each with
    whether it was written in place, into ``kinds``)."""
    seen: list[str] = []
    kinds = [] if kinds is None else kinds

    def on_path(path: str, written: bool) -> None:
        seen.append(path)
        kinds.append((path, written))

    watcher = SpoolWatcher(folders, on_path, polling=polling)
    watcher.start(asyncio.get_running_loop())
    try:
        await asyncio.sleep(1.0)  # the child has started watching
        expected = act()
        deadline = asyncio.get_running_loop().time() + seconds
        while len(seen) < expected and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # anything more would show now
    finally:
        watcher.stop()
    return seen, watcher


@pytest.mark.parametrize("polling", [False, True])
def test_a_job_renamed_into_a_watched_folder_is_reported_with_its_new_path(tmp_path, polling):
    folder = tmp_path / "TOSEND"
    folder.mkdir()
    (tmp_path / "X.TFS").write_bytes(b"$email_address a@b.c\n")

    def act() -> int:
        os.rename(tmp_path / "X.TFS", folder / "X.FS")
        return 1

    seen, _ = asyncio.run(watch_while([folder], act, polling=polling))
    assert str(folder / "X.FS") in seen


def test_reading_or_removing_a_job_and_writing_other_files_are_not_reported(tmp_path):
    folder = tmp_path / "TOSEND"
    folder.mkdir()
    job = folder / "X.FS"
    job.write_bytes(b"$email_address a@b.c\n")

    def act() -> int:
        job.read_bytes()
        (folder / "NOTES.TXT").write_text("not a job")
        os.rename(job, tmp_path / "X.FS")  # a claim: the job leaves the folder
        return 0

    seen, _ = asyncio.run(watch_while([folder], act, seconds=1.0))
    assert seen == []


def test_the_watcher_process_is_killed_when_the_node_stops_it_even_while_it_starts(tmp_path):
    folder = tmp_path / "TOSEND"
    folder.mkdir()

    async def run() -> None:
        watcher = SpoolWatcher([folder], lambda p, written: None)
        watcher.start(asyncio.get_running_loop())
        proc = watcher._proc
        assert proc is not None and proc.poll() is None
        watcher.stop()  # at once: the child is still importing, and is not waited for
        assert proc.returncode == -signal.SIGKILL

    asyncio.run(run())


def test_a_job_renamed_inside_a_watched_folder_is_reported_with_its_new_name(tmp_path):
    folder = tmp_path / "TOSEND"
    folder.mkdir()
    (folder / "X.FS").write_bytes(b"$email_address a@b.c\n")

    def act() -> int:
        os.rename(folder / "X.FS", folder / "Y.FS")
        return 1

    seen, _ = asyncio.run(watch_while([folder], act))
    assert seen == [str(folder / "Y.FS")]


def test_the_watcher_does_not_ask_inotify_for_files_leaving_a_folder():
    # Every claim is a rename out of TOSEND: asking for those events cost the
    # watcher 80 µs of CPU per job.
    from watchdog.observers.inotify_c import InotifyConstants

    from copiamail.spool.watcher import ARRIVALS

    assert not ARRIVALS & InotifyConstants.IN_MOVED_FROM
    assert ARRIVALS & InotifyConstants.IN_MOVED_TO and ARRIVALS & InotifyConstants.IN_CREATE
    assert ARRIVALS & InotifyConstants.IN_CLOSE_WRITE


def test_a_burst_of_jobs_renamed_in_is_reported_whole_each_as_renamed_in(tmp_path):
    folder = tmp_path / "TOSEND"
    folder.mkdir()
    stage = tmp_path / "stage"
    stage.mkdir()
    for i in range(2000):
        (stage / f"{i:08d}.FS").write_bytes(b"$email_address a@b.c\n")
    (stage / "sub").mkdir()

    def act() -> int:
        for i in range(2000):
            os.rename(stage / f"{i:08d}.FS", folder / f"{i:08d}.FS")
        os.rename(stage / "sub", folder / "SUB.FS")  # a folder named like a job is no job
        return 2000

    kinds: list[tuple[str, bool]] = []
    seen, _ = asyncio.run(watch_while([folder], act, kinds=kinds))
    assert sorted(seen) == [str(folder / f"{i:08d}.FS") for i in range(2000)]
    assert {written for _, written in kinds} == {False}


def test_jobs_in_every_watched_folder_are_reported_with_their_folder(tmp_path):
    folders = [tmp_path / "TOSEND", tmp_path / "TOSEND1", tmp_path / "TOSEND15"]
    for f in folders:
        f.mkdir()

    def act() -> int:
        for i, f in enumerate(folders):
            (f / f"J{i}.fs").write_bytes(b"$email_address a@b.c\n")  # the suffix in any case
        return len(folders)

    seen, _ = asyncio.run(watch_while(folders, act))
    assert set(seen) == {str(f / f"J{i}.fs") for i, f in enumerate(folders)}


@pytest.mark.parametrize("polling", [False, True])
def test_a_renamed_job_is_reported_as_complete_and_one_written_in_place_as_written(tmp_path, polling):
    folder = tmp_path / "TOSEND"
    folder.mkdir()
    (tmp_path / "R.TFS").write_bytes(b"$email_address a@b.c\n")

    def act() -> int:
        os.rename(tmp_path / "R.TFS", folder / "R.FS")
        (folder / "W.FS").write_bytes(b"$email_address a@b.c\n")
        return 2

    kinds: list[tuple[str, bool]] = []
    asyncio.run(watch_while([folder], act, polling=polling, kinds=kinds))
    assert {written for path, written in kinds if path.endswith("W.FS")} == {True}
    # The polling watcher cannot tell a rename from a write.
    assert {written for path, written in kinds if path.endswith("R.FS")} == {polling}


def test_a_watcher_that_can_no_longer_report_ends_so_the_node_sees_it(monkeypatch, capsys):
    from copiamail.spool import watcher

    class Failing:
        def pump(self, write) -> None:
            raise OSError(28, "No space left on device")

    def exit_(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(watcher.os, "_exit", exit_)
    with pytest.raises(SystemExit) as ended:
        watcher.pump_or_exit(Failing(), 1)  # type: ignore[arg-type]
    assert ended.value.code == 1
    assert "copiamail watcher: [Errno 28] No space left on device" in capsys.readouterr().err


@pytest.mark.parametrize("polling", [False, True])
def test_jobs_that_came_after_the_node_started_but_before_its_watches_are_reported_as_renamed_in(tmp_path, polling):
    # The node's first scan has listed the folder; its watcher is still
    # starting. A job renamed in now has no event: the watcher lists it once
    # it watches, or it would wait for a full scan and then write_settle.
    folder = tmp_path / "TOSEND"
    folder.mkdir()
    (folder / "OLD.FS").write_bytes(b"$email_address a@b.c\n")
    os.utime(folder / "OLD.FS")
    old = (folder / "OLD.FS").stat().st_ctime
    started = old + 1.0
    (tmp_path / "NEW.TFS").write_bytes(b"$email_address a@b.c\n")
    while time.time() < started + 0.2:
        time.sleep(0.05)
    os.rename(tmp_path / "NEW.TFS", folder / "NEW.FS")
    (folder / "NOTES.TXT").write_text("not a job")
    seen: list[tuple[str, bool]] = []

    async def run() -> None:
        watcher = SpoolWatcher([folder], lambda p, written: seen.append((p, written)), polling=polling, since=started)
        watcher.start(asyncio.get_running_loop())
        try:
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # anything more would show now
        finally:
            watcher.stop()

    asyncio.run(run())
    # Written before the node started, renamed in after: complete (the
    # polling observer calls every file written in place, and so does its listing).
    assert seen == [(str(folder / "NEW.FS"), polling)]


def test_without_a_start_time_the_watcher_reports_only_what_comes_after_it(tmp_path):
    folder = tmp_path / "TOSEND"
    folder.mkdir()
    (folder / "X.FS").write_bytes(b"$email_address a@b.c\n")
    seen, _ = asyncio.run(watch_while([folder], lambda: 0, seconds=0.5))
    assert seen == []


def test_the_start_time_listing_skips_folders_unchanged_since_and_lists_changed_ones(tmp_path):
    from copiamail.spool.watcher import arrived_since

    quiet, busy = tmp_path / "TOSEND1", tmp_path / "TOSEND"
    quiet.mkdir()
    busy.mkdir()
    since = time.time_ns() - 10**9
    (quiet / "A.FS").write_bytes(b"")
    (busy / "B.FS").write_bytes(b"")
    os.utime(busy / "B.FS", ns=(10**9, 10**9))  # written long ago, renamed in now (its ctime moves)
    os.utime(quiet, ns=(10**9, 10**9))  # the folder has not changed since long ago
    assert arrived_since([quiet, busy], since, polling=False) == b"M" + os.fsencode(busy / "B.FS") + b"\0"
    assert arrived_since([quiet, busy], time.time_ns() + 10**9, polling=False) == b""


def test_the_start_time_listing_reports_a_file_whose_last_change_was_a_write_as_written_in_place(tmp_path):
    # Still being written, perhaps: it must wait write_settle, not be taken half-written.
    from copiamail.spool.watcher import arrived_since

    folder = tmp_path / "TOSEND"
    folder.mkdir()
    since = time.time_ns() - 10**9
    with open(folder / "SLOW.FS", "w") as f:
        f.write("$email_address a@b.c\n")
        f.flush()
        st = os.stat(folder / "SLOW.FS")
        assert st.st_ctime_ns == st.st_mtime_ns  # a write moves both
        assert arrived_since([folder], since, polling=False) == b"W" + os.fsencode(folder / "SLOW.FS") + b"\0"
    os.utime(folder / "SLOW.FS", ns=(since - 10**9, since - 10**9))
    assert arrived_since([folder], since, polling=False)[:1] == b"M"
    assert arrived_since([folder], since, polling=True)[:1] == b"W"  # as the polling observer reports every file
