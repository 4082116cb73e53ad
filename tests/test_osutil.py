"""copiamail.osutil: each helper, and each fallback where the system call is missing."""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from copiamail import osutil
from copiamail.osutil import (
    NulRecords,
    die_with_parent,
    fsync_all,
    journal_in_order,
    move_unless_taken,
    reap_child,
    rename_noreplace,
    replace_file,
    write_all,
)


@pytest.fixture(params=["renameat2", "fallback"])
def rename_impl(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(osutil, "_RENAMEAT2", None)
    elif osutil._RENAMEAT2 is None:
        pytest.skip("renameat2 not available here")
    return request.param


# --- rename_noreplace (link then unlink where renameat2 is missing) -----------------


def test_rename_noreplace_moves_the_file(tmp_path, rename_impl):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"A")
    rename_noreplace(src, dst)
    assert not src.exists()
    assert dst.read_bytes() == b"A"
    assert dst.stat().st_nlink == 1


def test_rename_noreplace_refuses_an_existing_destination(tmp_path, rename_impl):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"A")
    dst.write_bytes(b"B")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert src.read_bytes() == b"A"
    assert dst.read_bytes() == b"B"


def test_rename_noreplace_of_a_missing_source_is_file_not_found(tmp_path, rename_impl):
    with pytest.raises(FileNotFoundError):
        rename_noreplace(tmp_path / "missing", tmp_path / "b")


def test_rename_noreplace_takes_strings_too(tmp_path, rename_impl):
    (tmp_path / "a").write_bytes(b"A")
    rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == b"A"


# --- move_unless_taken (a check, then a plain rename, where renameat2 is missing) ---


def test_move_unless_taken_moves_the_file(tmp_path, rename_impl):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"A")
    move_unless_taken(str(src), str(dst))
    assert not src.exists()
    assert dst.read_bytes() == b"A"
    assert dst.stat().st_nlink == 1


def test_move_unless_taken_refuses_an_existing_destination_naming_it(tmp_path, rename_impl):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"A")
    dst.write_bytes(b"B")
    with pytest.raises(FileExistsError) as info:
        move_unless_taken(str(src), str(dst))
    assert info.value.filename == str(dst)
    assert src.read_bytes() == b"A"
    assert dst.read_bytes() == b"B"


def test_move_unless_taken_of_a_missing_source_is_file_not_found(tmp_path, rename_impl):
    with pytest.raises(FileNotFoundError):
        move_unless_taken(str(tmp_path / "missing"), str(tmp_path / "b"))


def test_a_file_system_without_noreplace_falls_back(tmp_path, monkeypatch):
    # What NFS answers: EINVAL. The rename is then made the other way.
    def unsupported(*args):
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(osutil, "_RENAMEAT2", unsupported)
    (tmp_path / "a").write_bytes(b"A")
    rename_noreplace(tmp_path / "a", tmp_path / "b")
    move_unless_taken(str(tmp_path / "b"), str(tmp_path / "c"))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


# --- fsync_all ----------------------------------------------------------------------


@pytest.mark.parametrize("sync_file_range", [True, False])
def test_fsync_all_answers_one_errno_per_file_in_order(tmp_path, monkeypatch, sync_file_range):
    if not sync_file_range:
        monkeypatch.setattr(osutil, "_SYNC_FILE_RANGE", None)
    fds = []
    for i in range(3):
        fd = os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"data %d" % i)
        fds.append(fd)
    r, w = os.pipe()  # a pipe cannot be fsynced: EINVAL, and the others are still synced
    try:
        assert fsync_all([fds[0], r, fds[1], fds[2]]) == [0, errno.EINVAL, 0, 0]
        assert fsync_all([]) == []
    finally:
        for fd in (*fds, r, w):
            os.close(fd)
    assert [(tmp_path / f"f{i}").read_bytes() for i in range(3)] == [b"data 0", b"data 1", b"data 2"]


def written_files(folder, n):
    fds = []
    for i in range(n):
        fd = os.open(folder / f"g{i}", os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"result %d" % i)
        fds.append(fd)
    return fds


def counting_fsyncs(monkeypatch, fail: int = 0):
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(fd)
        if fail:
            raise OSError(fail, os.strerror(fail))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_fsync_all_in_one_commit_answers_one_errno_per_file_and_keeps_every_file(tmp_path):
    fds = written_files(tmp_path, 3)
    r, w = os.pipe()  # no write-back for a pipe: ESPIPE for it alone
    try:
        assert fsync_all([fds[0], r, fds[1], fds[2]], one_commit=True) == [0, errno.ESPIPE, 0, 0]
        assert fsync_all([], one_commit=True) == []
    finally:
        for fd in (*fds, r, w):
            os.close(fd)
    assert [(tmp_path / f"g{i}").read_bytes() for i in range(3)] == [b"result 0", b"result 1", b"result 2"]


def test_one_commit_makes_one_fsync_for_a_group_and_the_default_one_a_file(tmp_path, monkeypatch):
    fds = written_files(tmp_path, 4)
    calls = counting_fsyncs(monkeypatch)
    try:
        fsync_all(fds, one_commit=True)
        assert calls == [fds[-1]]
        calls.clear()
        fsync_all(fds)
        assert calls == fds
    finally:
        for fd in fds:
            os.close(fd)


def test_a_failed_commit_leaves_no_file_of_its_group_taken_for_durable(tmp_path, monkeypatch):
    fds = written_files(tmp_path, 3)
    r, w = os.pipe()
    counting_fsyncs(monkeypatch, fail=errno.EIO)
    try:
        assert fsync_all([fds[0], fds[1], r, fds[2]], one_commit=True) == [errno.EIO, errno.EIO, errno.ESPIPE, errno.EIO]
    finally:
        for fd in (*fds, r, w):
            os.close(fd)


def test_without_sync_file_range_one_commit_is_an_fsync_per_file(tmp_path, monkeypatch):
    monkeypatch.setattr(osutil, "_SYNC_FILE_RANGE", None)
    fds = written_files(tmp_path, 3)
    calls = counting_fsyncs(monkeypatch)
    try:
        assert fsync_all(fds, one_commit=True) == [0, 0, 0]
        assert calls == fds
    finally:
        for fd in fds:
            os.close(fd)


def mount_line(path, fstype: str, source: str = "/dev/vda") -> str:
    dev = os.stat(path).st_dev
    return f"29 1 {os.major(dev)}:{os.minor(dev)} / /spool rw,relatime shared:1 - {fstype} {source} rw\n"


@pytest.mark.parametrize(("fstype", "in_order"), [
    ("ext4", True), ("ext3", True), ("xfs", True),
    ("ext2", False), ("tmpfs", False), ("nfs4", False), ("overlay", False), ("btrfs", False), ("fuse.sshfs", False),
])
def test_only_a_journal_that_commits_in_order_allows_one_commit(tmp_path, fstype, in_order):
    other = "30 1 254:77 / /other rw - ext4 /dev/vdb rw\n"
    assert journal_in_order(tmp_path, other + mount_line(tmp_path, fstype)) is in_order


def test_a_file_system_that_cannot_be_told_gets_an_fsync_per_file(tmp_path):
    assert not journal_in_order(tmp_path, "30 1 254:77 / /other rw - ext4 /dev/vdb rw\n")  # not listed
    assert not journal_in_order(tmp_path, mount_line(tmp_path, "ext4") + mount_line(tmp_path, "nfs4"))  # two answers
    assert not journal_in_order(tmp_path / "missing", mount_line(tmp_path, "ext4"))
    assert not journal_in_order(tmp_path, "garbage\n")


# --- die_with_parent ----------------------------------------------------------------


_CHILD = textwrap.dedent("""\
    import os, sys, time
    from copiamail.osutil import die_with_parent
    print(die_with_parent(int(sys.argv[1])), flush=True)
    time.sleep(60)
""")


def test_die_with_parent_is_false_when_the_parent_is_not_the_given_one():
    assert die_with_parent(os.getppid()) is True
    assert die_with_parent(os.getppid() + 1) is False


def _alive(pid: int) -> bool:
    """Running: neither gone nor a zombie its new parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(osutil._PRCTL is None, reason="no prctl here (not Linux)")
def test_a_process_that_dies_with_its_parent_is_killed_when_the_parent_ends(tmp_path):
    # A middle process starts the child and ends; the child must die with it.
    middle = textwrap.dedent(f"""\
        import subprocess, sys, os
        child = subprocess.Popen([sys.executable, "-c", {_CHILD!r}, str(os.getpid())], stdout=subprocess.PIPE)
        print(child.pid, child.stdout.readline().decode().strip(), flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", middle], capture_output=True, text=True, timeout=60, check=True)
    pid, armed = out.stdout.split()
    assert armed == "True"
    for _ in range(500):
        if not _alive(int(pid)):
            return
        time.sleep(0.01)
    os.kill(int(pid), signal.SIGKILL)
    pytest.fail("the child outlived its parent")


# --- reap_child ---------------------------------------------------------------------


@pytest.fixture(params=["pidfd", "refused", "missing"])
def reap_impl(request, monkeypatch):
    if request.param == "refused":  # an old kernel, or a seccomp filter
        def no_pidfd(pid):
            raise OSError(errno.ENOSYS, "no pidfd here")
        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    elif request.param == "missing":  # Python or system without it
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    elif not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd_open here")
    else:
        def no_polling(seconds):
            raise AssertionError("polled, though the pidfd says when the child ends")
        monkeypatch.setattr(osutil.time, "sleep", no_polling)
    return request.param


def _child_ending_after(seconds: float) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            select.select([], [], [], seconds)  # not time.sleep: a test may have replaced it
        finally:
            os._exit(0)
    return pid


def test_reap_child_returns_as_soon_as_the_child_ends_and_reaps_it(reap_impl):
    pid = _child_ending_after(0.05)
    assert reap_child(pid, 30.0) is True
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left


def test_reap_child_gives_up_after_its_timeout_leaving_the_child_running(reap_impl):
    pid = _child_ending_after(30.0)
    try:
        started = time.monotonic()
        assert reap_child(pid, 0.05) is False
        assert time.monotonic() - started < 10
        assert _alive(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfd_open here")
def test_reap_child_waits_on_a_pidfd_numbered_past_selects_limit(monkeypatch):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip("too few file descriptors allowed here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    real = os.pidfd_open

    try:
        os.fstat(2000)
        pytest.skip("descriptor 2000 is in use here")
    except OSError:
        pass

    def high_pidfd(pid):
        fd = real(pid)
        try:
            return os.dup2(fd, 2000)  # past FD_SETSIZE: select() refuses it
        finally:
            os.close(fd)

    monkeypatch.setattr(os, "pidfd_open", high_pidfd)
    try:
        pid = _child_ending_after(0.05)
        assert reap_child(pid, 30.0) is True
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_reap_child_of_a_child_reaped_before_is_true(reap_impl):
    pid = _child_ending_after(0.0)
    os.waitpid(pid, 0)
    assert reap_child(pid, 1.0) is True


# --- write_all ----------------------------------------------------------------------


def test_write_all_writes_every_byte_through_partial_writes(monkeypatch):
    written = bytearray()

    def partial_write(fd, data):
        n = min(3, len(data))
        written.extend(bytes(data[:n]))
        return n

    monkeypatch.setattr(osutil.os, "write", partial_write)
    write_all(99, b"0123456789")
    write_all(99, b"")
    assert bytes(written) == b"0123456789"


# --- NulRecords ---------------------------------------------------------------------


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_records_come_whole_however_the_pipe_cuts_them(pipe):
    r, w = pipe
    records = NulRecords(r)
    assert records.fd == r
    assert records.read() == []  # nothing written yet: not the end
    os.write(w, b"one\0tw")
    assert records.read() == [b"one"]
    os.write(w, b"o\0\0three\0")
    assert records.read() == [b"two", b"", b"three"]
    os.write(w, b"four")
    assert records.read() == []
    os.write(w, b"\0")
    assert records.read() == [b"four"]


def test_the_end_of_the_pipe_is_none_and_an_unfinished_record_is_dropped(pipe):
    r, w = pipe
    records = NulRecords(r)
    os.write(w, b"last\0cut")
    os.close(w)
    assert records.read() == [b"last"]
    assert records.read() is None


def test_replace_file_swaps_in_the_whole_new_content_with_the_mode_asked(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    replace_file(target, b"new content", 0o640)
    assert target.read_bytes() == b"new content" and target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_replace_file_that_cannot_rename_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "a-folder"
    target.mkdir()
    with pytest.raises(OSError):
        replace_file(target, b"data", 0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["a-folder"]
