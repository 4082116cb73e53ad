"""copiamail.osutil: each helper, and each fallback where the system call is missing."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from copiamail import osutil
from copiamail.osutil import (
    fsync_all,
    journal_in_order,
    move_unless_taken,
    rename_noreplace,
    unordered_metadata,
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


def mount_line(path, fstype: str, source: str = "/dev/vda") -> str:
    dev = os.stat(path).st_dev
    return f"29 1 {os.major(dev)}:{os.minor(dev)} / /spool rw,relatime shared:1 - {fstype} {source} rw\n"


def block_device(tmp_path, path, journal: bool) -> dict[str, str]:
    """Stand-ins for /sys/dev/block and /proc/fs/jbd2: ``path``'s device is
    ``vdz``, with a journal or not."""
    dev = os.stat(path).st_dev
    sys_block, jbd2 = tmp_path / "sys-dev-block", tmp_path / "jbd2"
    sys_block.mkdir()
    jbd2.mkdir()
    (sys_block / f"{os.major(dev)}:{os.minor(dev)}").symlink_to("../../devices/virtio1/block/vdz")
    (jbd2 / "vdzz-8").mkdir()  # another device's journal
    if journal:
        (jbd2 / "vdz-8").mkdir()
    return {"sys_block": str(sys_block), "jbd2": str(jbd2)}


@pytest.mark.parametrize(("fstype", "in_order"), [
    ("ext4", True), ("ext3", True), ("xfs", True),
    ("ext2", False), ("tmpfs", False), ("nfs4", False), ("overlay", False), ("btrfs", False), ("fuse.sshfs", False),
])
def test_only_a_journal_that_commits_in_order_allows_one_commit(tmp_path, fstype, in_order):
    other = "30 1 254:77 / /other rw - ext4 /dev/vdb rw\n"
    device = block_device(tmp_path, tmp_path, journal=True)
    assert journal_in_order(tmp_path, other + mount_line(tmp_path, fstype), **device) is in_order


@pytest.mark.parametrize("fstype", ["ext4", "ext3"])
def test_an_ext4_made_without_a_journal_gets_an_fsync_per_file(tmp_path, fstype):
    device = block_device(tmp_path, tmp_path, journal=False)
    assert not journal_in_order(tmp_path, mount_line(tmp_path, fstype), **device)


def test_a_file_system_that_cannot_be_told_gets_an_fsync_per_file(tmp_path):
    device = block_device(tmp_path, tmp_path, journal=True)
    assert not journal_in_order(tmp_path, "30 1 254:77 / /other rw - ext4 /dev/vdb rw\n", **device)  # not listed
    assert not journal_in_order(tmp_path, mount_line(tmp_path, "ext4") + mount_line(tmp_path, "nfs4"), **device)
    assert not journal_in_order(tmp_path / "missing", mount_line(tmp_path, "ext4"), **device)
    assert not journal_in_order(tmp_path, "garbage\n", **device)
    assert not journal_in_order(tmp_path, mount_line(tmp_path, "ext4"), jbd2=str(tmp_path / "none"),
                                sys_block=device["sys_block"])  # no jbd2 to look at


@pytest.mark.parametrize(("fstype", "journal", "said"), [
    ("ext2", False, "ext2"), ("ext4", False, "ext4 without a journal"), ("ext3", False, "ext3 without a journal"),
    ("ext4", True, None), ("xfs", False, None), ("btrfs", False, None), ("tmpfs", False, None), ("nfs4", False, None),
])
def test_a_file_system_that_writes_metadata_back_in_no_order_is_named(tmp_path, fstype, journal, said):
    device = block_device(tmp_path, tmp_path, journal=journal)
    assert unordered_metadata(tmp_path, mount_line(tmp_path, fstype), **device) == said


@pytest.mark.parametrize(("journal_task", "said"), [("1234\n", None), ("<none>\n", "ext4 without a journal")])
def test_the_kernels_word_on_the_journal_outweighs_the_journal_list(tmp_path, journal_task, said):
    # An external journal has a thread but no entry named after the disk in
    # /proc/fs/jbd2 (its entry is named after the journal's own device).
    device = block_device(tmp_path, tmp_path, journal=False)
    ext4 = tmp_path / "sys-fs-ext4"
    (ext4 / "vdz").mkdir(parents=True)
    (ext4 / "vdz" / "journal_task").write_text(journal_task)
    assert unordered_metadata(tmp_path, mount_line(tmp_path, "ext4"), sys_ext4=str(ext4), **device) == said
    assert journal_in_order(tmp_path, mount_line(tmp_path, "ext4"), sys_ext4=str(ext4), **device) is (said is None)


def test_a_file_system_that_cannot_be_told_is_not_called_unordered(tmp_path):
    device = block_device(tmp_path, tmp_path, journal=False)
    assert unordered_metadata(tmp_path / "missing", mount_line(tmp_path, "ext4"), **device) is None
    assert unordered_metadata(tmp_path, "garbage\n", **device) is None
    assert unordered_metadata(tmp_path, mount_line(tmp_path, "ext4"), jbd2=str(tmp_path / "none"),
                              sys_block=device["sys_block"]) is None


def refused_sync_file_range(*args):
    ctypes.set_errno(errno.EPERM)  # what a sandbox's filter answers
    return -1


@pytest.mark.parametrize("sync_file_range", [None, refused_sync_file_range])
def test_without_a_usable_sync_file_range_one_commit_is_an_fsync_per_file(tmp_path, monkeypatch, sync_file_range):
    monkeypatch.setattr(osutil, "_SYNC_FILE_RANGE", sync_file_range)
    fds = written_files(tmp_path, 3)
    calls = counting_fsyncs(monkeypatch)
    try:
        assert fsync_all(fds, one_commit=True) == [0, 0, 0]
        assert calls == fds
    finally:
        for fd in fds:
            os.close(fd)
