"""The spool: folders, scan order, and the moves of a job between them
(:class:`Spool`). The names of the folders and of a job's places are in
:mod:`copiamail.spool.layout`; results are written through spare files by
:mod:`copiamail.spool.results`; a node's recovery is
:mod:`copiamail.spool.recovery`.

Layout under the root::

    TOSEND, TOSEND1 ... TOSENDn   jobs waiting, TOSEND first; by name inside a folder
    ACTIVE/<node>/<queue>/NAME.FS a job <node> has claimed from TOSEND<queue>
    ACTIVE/<node>/.spare/         spare files: no job, only inodes to write results into
    ACTIVE/<node>.lock            held while node <node> runs (filelock)
    SENT, FAIL                    jobs done
    TEMP                          scratch files (submit writes here first)

A job is a file whose name ends in ``.FS`` (any case). Every move is a rename;
nothing is rewritten in place. The states of one job ``X.FS`` claimed by node N
from queue Q, and what a crash in each leaves behind (the qmail INTERNALS way):

1. **waiting**: ``Q/X.FS`` (found by :meth:`Spool.scan`). Safe: it is in
   exactly one place, complete (the submitter or the engine made it visible
   by a rename).
2. **claimed**: ``rename(Q/X.FS, ACTIVE/N/Q/X.FS)`` (:meth:`Spool.claim`).
   Atomic: if two nodes race, one rename fails with ENOENT and that node skips
   the job. While a job of the same name from ``Q`` is still in
   ``ACTIVE/N/Q`` under any of its names, the claim waits (the node's filter
   of held names, :mod:`copiamail.spool.held`, spares it the look-ups on
   disk for names no job of the node holds). The job is in progress; it is
   not rewritten to say so. Crash here:
   recovery (node N restarting, or ``copiamail recover --node N``) finds
   ``ACTIVE/N/Q/X.FS`` alone and returns it to ``Q`` unchanged, as a
   hand-back at shutdown: nothing was sent, so nothing counts.
2a. **sending**: just before its SMTP transaction starts (MAIL FROM) the
   claimed job is renamed to ``ACTIVE/N/Q/X.FS.SENDING``
   (:meth:`Spool.mark_sending`). Crash from here: recovery adds an attempt
   record of outcome 66 and returns it to ``Q``; the third such interruption
   sends it to FAIL (outcome 67): a job that kills the node as it is sent
   must not kill it forever. Only this mark counts, so jobs that were merely
   claimed when a node died never reach FAIL for it. A job handed, as it is
   claimed, to an open connection that starts it at once (greeted, owing no
   RSET, neither reopening nor waiting for a message rate first; not behind
   a message in flight, which may yet be refused) is claimed
   straight under this name instead (``rename(Q/X.FS,
   ACTIVE/N/Q/X.FS.SENDING)``, one rename for two). Only where the node's
   filter of held names rules out a job of its name in ``ACTIVE/N/Q``;
   elsewhere it is claimed as above. Should its file prove to have changed
   since it was read (a writer in place), it is handed back at once and read
   again by a later scan. What lies between such a claim and its MAIL FROM
   is building the message and the connection's next turn of the event
   loop; a crash there counts as one in its transaction. (So would one in
   the rare case where the connection is lost in that turn and reopened.)
   The connection chosen before the claim is the one the job is handed to:
   nothing chooses again in between.
2b. **delivered**: right after the server's 250 a spare file is renamed to
   ``ACTIVE/N/Q/X.FS.SENT`` beside ``X.FS.SENDING`` (:meth:`Spool.mark_delivered`;
   one rename, no data written yet): the job's result file, whose name alone
   marks the job delivered. Where no spare can be had, the claimed job is
   renamed ``X.FS.DELIVERED`` instead (a rename needs no disk space). A crash
   from here on never sends the job again: recovery takes ``X.FS.SENDING``
   with a ``X.FS.SENT`` beside it (whatever that file holds: it was not known
   to be synced) as ``X.FS.DELIVERED``, renames it so, drops the result, and
   writes the job to SENT (with an attempt record saying the server's reply
   was lost). The window in which a crash sends a message twice is therefore
   only the wait for the server's reply to the end of DATA, plus this one
   rename.
3. **result written**: the engine writes the job's next version into a spare
   file ``ACTIVE/N/.spare/S`` and fsyncs it (a crash meanwhile leaves only a
   spare: no job), then renames it to ``ACTIVE/N/Q/X.FS.<DEST>`` (``.SENT``,
   ``.FAIL`` or ``.BACK`` for the queue): :meth:`Spool.write_results` and
   :meth:`Spares.write <copiamail.spool.results.Spares.write>`, then the
   batch's ``sync`` and ``commit``
   (:class:`~copiamail.spool.results.ResultBatch`). A delivered job's result
   is written into its mark instead, at once (:meth:`Spool.write_delivered`),
   and only fsynced with the batch; if that write fails, its result is written
   as any other's and renamed over the mark. While ``ACTIVE/N/Q/X.FS`` (or
   ``X.FS.SENDING``, ``X.FS.DELIVERED``) exists the result is not committed:
   a crash here leaves both files; recovery deletes the result and treats the
   job as in state 2 (or 2a, 2b; 2b for a ``.SENT`` beside ``.SENDING``).
4. **committed**: ``rename(ACTIVE/N/Q/X.FS, ACTIVE/N/.spare/S2)``
   (:meth:`Spool.commit_result` and :meth:`Spares.retire
   <copiamail.spool.results.Spares.retire>`). The one step that commits the
   result: from now on ``X.FS.<DEST>`` is the job, and the claimed copy's
   inode is a spare for a later result. A crash here leaves the result alone
   in ACTIVE; recovery finishes the move (step 5).
5. **published**: ``X.FS.<DEST>`` is renamed to ``SENT/X.FS``, ``FAIL/X.FS`` or
   ``Q/X.FS`` (:meth:`Spool.commit_result`; at recovery
   :meth:`Spool.finish_committed`) without replacing anything there
   (``renameat2`` with ``RENAME_NOREPLACE``, one atomic step). If a different
   job took the name meanwhile, the job is published as ``X~1.FS`` (then
   ``~2`` ...) instead: a write-back never replaces another job.

   Where the file system lacks RENAME_NOREPLACE (NFS, older kernels) the move
   is ``link`` then ``unlink``, and recovery treats a result file whose link
   count is above 1 as already published. Known gap of that fallback only: a
   crash between the two calls, followed by another node taking the published
   copy and replacing it before this node recovers, drops the link count back
   to 1 and the old version is published again (one extra send).

A job handed back unchanged (at shutdown) goes straight from state 2 (or 2a)
to 1 by one no-replace rename (:meth:`Spool.hand_back`).

Results are written in batches
(:class:`~copiamail.spool.results.ResultBatch`, the results of one turn of the
node's event loop): each into its spare, then the disk is asked to write them
all (``sync_file_range``), then each is fsynced (on a journaling ext4 or xfs:
each waited for, then one fsync commits the journal for all), and only then is each
committed and published in turn, as above. A node has them made by its
syncer process (:mod:`copiamail.spool.syncer`, handed the open descriptors) while
its event loop goes on, and commits each result only after the answer.

Spare files: creating a file costs far more than rewriting an existing one
where the file system has many recently deleted inodes to step over (ext4
measured here: 0.2 to 0.45 ms against 10 to 30 µs), and a busy spool deletes
one file per job. So the claimed copy is not deleted at the commit but kept
as a spare, and the next result is written over it (then cut to its
length: truncating synced blocks first would cost sixteen times the write;
:class:`~copiamail.spool.results.Spares`). Until its fsync, a result may hold
old bytes of the spare past what was written; a result not yet committed is
never taken for the job, so they are never read. A spare is never a job: it has no
job name, and recovery deletes spares, as does a node when it stops. Each
process of a node takes only the spares it made.

Durability: the result's data is durable before the commit step (the fsync, or
the batch's one commit), so after a power loss a committed job is complete. Folders
are not fsynced: a journal (ext4 with one, xfs) keeps each rename whole and in order
after the data, and a power loss rolls back at most the last moves (at worst a job is
sent again). With no journal (ext2, an ext4 made without one: the node warns) a power
loss can keep half a move (a job in lost+found, or in two folders), or a stale name.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from copiamail.errors import SpoolError
from copiamail.jobfile.fsfile import CommandFile
from copiamail.osutil import rename_noreplace
from copiamail.spool.claims import claim_rename, taken_beside
from copiamail.spool.crashpoints import check_disk_space, crash_point
from copiamail.spool.held import HeldNames, held_key
from copiamail.spool.layout import (
    ACTIVE,
    DELIVERED,
    FAIL,
    RESULT_SUFFIXES,
    SENDING,
    SENT,
    SPARE,
    TEMP,
    Claimed,
    Destination,
    QueuedJob,
    delivered_mark,
    is_job_name,
    is_queue_name,
    queue_names,
    queue_number,
)
from copiamail.spool.results import DeliveredMark, ResultBatch, Spares, fill


def _beside(file: str, name: str) -> str:
    """The path of ``name`` in the folder of ``file``."""
    folder, slash, _ = file.rpartition("/")
    return f"{folder}{slash}{name}"


class Spool:
    """One spool root. Methods do file-system work only; no policy."""

    def __init__(self, root: Path, queues: int = 15, fsync: bool = True) -> None:
        self.root = Path(root)
        self.queues = queue_names(queues)
        self.fsync = fsync
        self._root = os.fspath(self.root)
        self._spares = Spares(self._root)
        self._held: HeldNames | None = None

    def use_held_names(self, held: HeldNames) -> None:
        """From now on this process's claims ask ``held`` before they look
        on disk for a job of the same name (:mod:`copiamail.spool.held`);
        its claims, commits and hand-backs count names in and out of it."""
        self._held = held

    def folder(self, name: str) -> Path:
        return self.root / name

    def active_dir(self, node: str) -> Path:
        return self.root / ACTIVE / node

    def lock_path(self, node: str) -> Path:
        return self.root / ACTIVE / f"{node}.lock"

    def ensure(self) -> None:
        """Create the folders that are missing."""
        try:
            # A queue folder named in another case (tosend1) is that queue: not made again.
            present = self.queue_folders_on_disk()
            for name in [*(q for q in self.queues if q not in present), ACTIVE, SENT, FAIL, TEMP]:
                (self.root / name).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"{e.filename}: cannot create spool folder: {e.strerror}") from None

    def writable_by_others(self) -> list[Path]:
        """Spool folders any user may write into (and so drop or replace jobs in)."""
        out = []
        for name in ["", *self.queues, ACTIVE, SENT, FAIL, TEMP]:
            path = self.root / name
            try:
                if path.stat().st_mode & stat.S_IWOTH:
                    out.append(path)
            except OSError:
                continue
        return out

    def priority(self, queue: str) -> int:
        try:
            return self.queues.index(queue.upper())
        except ValueError:
            # A queue folder left from a larger `queues:` still drains, last
            # (scan() visits it after the configured ones).
            return len(self.queues) + queue_number(queue)

    # --- scanning -----------------------------------------------------------

    def scan_queue(self, queue: str) -> Iterator[QueuedJob]:
        """The job files of one TOSEND folder, in name order. The folder is
        listed at once; each QueuedJob is made as it is taken, so the first job
        of a large backlog comes without waiting for objects for all of it."""
        folder = f"{self._root}/{queue}"
        prio = self.priority(queue)
        try:
            with os.scandir(folder) as it:
                names = [e.name for e in it if is_job_name(e.name) and e.is_file()]
        except FileNotFoundError:
            return
        names.sort(key=os.fsencode)
        for n in names:
            yield QueuedJob(prio, queue, n, f"{folder}/{n}")

    def queue_folders(self) -> list[str]:
        """The TOSEND folders as they are named on disk (in any case), in
        scan order: the configured ones by number (a missing one under its
        own name, so a scan of it finds nothing), then any other
        ``TOSEND<n>`` folder found (left from a larger ``queues:``, or named by
        a recovered job), by number. Two folders of one queue in different
        cases are both scanned, in name order."""
        found = self.queue_folders_on_disk()
        folders: list[str] = []
        for queue in self.queues:
            folders += sorted(found.pop(queue, [queue]), key=os.fsencode)
        extra = sorted(found.items(), key=lambda kv: (queue_number(kv[0]), kv[0]))  # TOSEND itself is configured
        return folders + [name for _, names in extra for name in sorted(names, key=os.fsencode)]

    def queue_folder(self, queue: str) -> Path:
        """The folder of queue ``queue`` (``TOSEND3``) as it is named on disk,
        in any case; under that name when there is none."""
        return self.root / self.queue_folders_on_disk().get(queue, [queue])[0]

    def queue_folders_on_disk(self) -> dict[str, list[str]]:
        """The TOSEND folders under the root, by upper-case name (TOSEND1: [tosend1])."""
        found: dict[str, list[str]] = {}
        try:
            with os.scandir(self.root) as it:
                for e in it:
                    if is_queue_name(e.name) and e.is_dir():
                        found.setdefault(e.name.upper(), []).append(e.name)
        except FileNotFoundError:
            pass
        return found

    def scan(self) -> Iterator[QueuedJob]:
        """Every job file in every TOSEND folder, in queue order."""
        for queue in self.queue_folders():
            yield from self.scan_queue(queue)

    # --- moves ---------------------------------------------------------------

    def claim(self, job: QueuedJob, node: str, sending: bool = False) -> Claimed | None:
        """Take a waiting job (state 1 to 2); None if another node took it first.
        With ``sending`` (its transaction starts at once, over a connection
        already greeted) it is claimed straight as sending (state 1 to 2a),
        where the node's filter of held names rules out a job of its name in
        ACTIVE; elsewhere it is claimed as any job, and marked later."""
        # Paths as strings on this path: pathlib costs more than the system calls.
        dest_dir = f"{self._root}/{ACTIVE}/{node}/{job.queue}"
        dest = f"{dest_dir}/{job.name}"
        # A job of the same name still here (a name reused by a submitter),
        # marked sending or delivered, or its result not yet published, must
        # not be overwritten nor taken for this one's: this one waits its
        # turn. Only this node's processes write into its ACTIVE folder, so
        # these names are checked before the rename (and after it: another
        # worker may mark its job sending in between), where the node's
        # filter of held names cannot rule them out; the claimed name itself
        # is checked by the rename (move_unless_taken), atomic between nodes.
        held = self._held
        key = held_key(node, job.queue, job.name)
        maybe = held is None or held.may_hold(key)
        # The checks below stand between a plain claim and a job of the same
        # name marked sending meanwhile; a claim straight as sending would need
        # them the other way round, so it is made only where none can be held.
        marked = sending and not maybe
        if marked:
            dest = f"{dest}.{SENDING}"
        if maybe and taken_beside(dest):
            return None
        if held is not None:
            held.count_in(key)  # before the rename: see spool/held.py
        taken = False
        try:
            taken = claim_rename(job.file, dest_dir, dest)
        finally:
            if not taken and held is not None:
                held.count_out(key)
        if not taken:
            return None
        if maybe and taken_beside(dest):
            # The job of the name was marked sending between the look-up and
            # the rename (another worker's): this one goes back and waits.
            self.place(dest, f"{self._root}/{job.queue}", job.name)
            if held is not None:
                held.count_out(key)
            return None
        crash_point("sending" if marked else "claimed")
        return Claimed(node, job.queue, job.name, dest)

    def unchanged(self, claimed: Claimed, sig: tuple[int, int, int]) -> bool:
        """Whether the claimed file is still the one read as (inode, mtime, size)
        ``sig`` before the claim (a rename keeps all three)."""
        try:
            st = os.stat(claimed.file)
        except OSError:
            return False
        return (st.st_ino, st.st_mtime_ns, st.st_size) == sig

    def mark_sending(self, claimed: Claimed) -> Claimed:
        """State 2 to 2a: its SMTP transaction starts now (one rename; a job
        marked already, tried again on another mail host, stays as it is)."""
        if claimed.file.rpartition("/")[2] != claimed.name:
            return claimed
        path = f"{claimed.file}.{SENDING}"
        os.rename(claimed.file, path)
        crash_point("sending")
        return Claimed(claimed.node, claimed.queue, claimed.name, path)

    def mark_delivered(self, claimed: Claimed) -> tuple[Claimed, DeliveredMark | None]:
        """State 2a to 2b: the server accepted the message. The mark is the
        job's result file: a spare renamed ``X.FS.SENT`` beside
        ``X.FS.SENDING`` (one rename; the result's data is written into it
        next, by :meth:`write_delivered`). Where no spare can be had, the
        claimed job is renamed ``X.FS.DELIVERED`` instead (a rename needs no
        disk space) and there is no mark file. The job as it now is, and its
        mark file."""
        mark = None
        if claimed.file.endswith(f".{SENDING}"):
            result = delivered_mark(claimed.file)
            try:
                mark = DeliveredMark(result, self._spares.mark(result, claimed.node))
            except OSError:
                pass
        if mark is None:
            path = _beside(claimed.file, f"{claimed.name}.{DELIVERED}")
            os.rename(claimed.file, path)
            claimed = Claimed(claimed.node, claimed.queue, claimed.name, path)
        crash_point("delivered")
        return claimed, mark

    def write_delivered(self, mark: DeliveredMark, cf: CommandFile) -> DeliveredMark | None:
        """State 3, first half, for a job marked delivered: its next version
        ``cf`` written into its mark file, not yet fsynced. None if it could
        not be (the file is closed, the mark kept: the result is then written
        as any other, and replaces the mark at its commit)."""
        try:
            check_disk_space(mark.result)
            fill(mark.fd, cf.to_bytes(), mark.result)
        except OSError:
            os.close(mark.fd)
            return None
        return mark

    def read(self, claimed: Claimed) -> CommandFile:
        return CommandFile.read(claimed.file)

    def finish(self, claimed: Claimed, cf: CommandFile, dest: Destination) -> Path:
        """Write the job's next version and move it to SENT, FAIL or BACK (its
        own queue) through states 3, 4 and 5. Returns where it landed."""
        [landed] = self.finish_many([(claimed, cf, dest)])
        if isinstance(landed, OSError):
            raise landed
        return landed

    def finish_many(self, jobs: Sequence[tuple[Claimed, CommandFile, Destination]]) -> list[Path | OSError]:
        """:meth:`finish` for several jobs, their results made durable together
        (:meth:`write_results`, then the batch's ``sync`` and ``commit``). For
        each job: where it landed, or the OSError that stopped it (raised
        before its commit, the claimed job is intact; after, its result waits
        in ACTIVE)."""
        batch = self.write_results(jobs)
        batch.sync()
        return batch.commit()

    def write_results(self, jobs: Sequence[tuple[Claimed, CommandFile, Destination]],
                      marks: Sequence[DeliveredMark | None] = ()) -> ResultBatch:
        """State 3, first half, for each job: its next version (``cf``, for
        ``dest`` SENT, FAIL or back to its queue) written into a spare, not yet
        fsynced; for a job whose ``marks`` entry is a mark file, the result
        written into it already (:meth:`write_delivered`). The batch goes on
        with ``sync`` (or ``synced``) and ``commit``."""
        batch = ResultBatch([claimed for claimed, _, _ in jobs], self.fsync, self.commit_result)
        for i, (claimed, cf, dest) in enumerate(jobs):
            mark = marks[i] if i < len(marks) else None
            if mark is not None:
                batch.written.append((i, mark.result, mark.fd, mark.result))
                continue
            result = _beside(claimed.file, f"{claimed.name}.{dest.value}")
            try:
                spare, fd = self._spares.write(result, cf.to_bytes(), claimed.node)
            except OSError as e:
                batch.out[i] = e
                continue
            batch.written.append((i, spare, fd, result))
        return batch

    def hand_back(self, claimed: Claimed) -> Path:
        """Return a job unchanged to its own queue (state 2 to 1), a result of
        it left uncommitted beside it dropped first. A job marked delivered is
        never handed back: one whose result file marks it so is renamed
        ``X.FS.DELIVERED`` instead (recovery finishes it to SENT), and
        FileExistsError says it stays."""
        if claimed.marked_sending and os.access(delivered_mark(claimed.file), os.F_OK):
            delivered = _beside(claimed.file, f"{claimed.name}.{DELIVERED}")
            os.rename(claimed.file, delivered)
            raise FileExistsError(errno.EEXIST, "delivered: it stays for recovery to finish", delivered)
        # A result written beside it whose commit failed (a deferral that
        # could not be committed hands its job back) is not the job: once the
        # job had left, it would be taken for a committed result and published
        # as a second copy. It is dropped first, as recovery drops one.
        base = _beside(claimed.file, claimed.name)
        for suffix in RESULT_SUFFIXES:
            try:
                os.unlink(f"{base}.{suffix}")
            except FileNotFoundError:
                pass
        landed = self.place(claimed.file, f"{self._root}/{claimed.queue}", claimed.name)
        if self._held is not None:
            self._held.count_out(held_key(claimed.node, claimed.queue, claimed.name))
        return landed

    def commit_result(self, claimed: Claimed, result: str) -> Path:
        """States 4 and 5 for a result written (and fsynced) beside its claimed
        job: the claimed job's name is removed, which commits the result (from
        then on it is the job), and the result is published to its folder.
        Where it landed; an OSError after the commit leaves the result to be
        published by recovery."""
        self._spares.retire(claimed)
        crash_point(f"committed-{result.rsplit('.', 1)[1]}")
        landed = self._publish(result, claimed)
        if self._held is not None:
            self._held.count_out(held_key(claimed.node, claimed.queue, claimed.name))
        return landed

    def drop_spares(self) -> None:
        """Delete this process's spare files (when it stops)."""
        self._spares.drop()

    def _publish(self, result: str | Path, claimed: Claimed) -> Path:
        result = os.fspath(result)
        suffix = result.rsplit(".", 1)[1]
        folder = f"{self._root}/{suffix if suffix in (SENT, FAIL) else claimed.queue}"
        return self.place(result, folder, claimed.name)

    def place(self, src: str, folder: str, name: str) -> Path:
        """Rename ``src`` into ``folder`` (made if missing) as ``name``, or as the
        first free ``NAME~n.FS`` if a file has that name; returns where it went."""
        candidate = name
        for n in range(1, 10000):
            dest = f"{folder}/{candidate}"
            try:
                rename_noreplace(src, dest)
                return Path(dest)
            except FileExistsError:
                stem, dot, ext = name.rpartition(".")
                candidate = f"{stem}~{n}{dot}{ext}"
            except FileNotFoundError:
                if not os.path.exists(src):
                    raise
                os.makedirs(folder, exist_ok=True)
        raise SpoolError(f"{folder}/{name}: no free name to place the job")

    # --- recovery ------------------------------------------------------------

    def finish_committed(self, node: str, drop_uncommitted: bool = True) -> None:
        """Publish node ``node``'s committed results (states 4 and 5) and, with
        ``drop_uncommitted`` (at recovery, when nothing of the node runs), drop
        uncommitted ones (state 3) and stray temporary files. Safe while the
        node runs without ``drop_uncommitted``: a result another process of
        the node publishes at the same moment is skipped."""
        base = self.active_dir(node)
        if not base.is_dir():
            return
        for qdir in sorted(p for p in base.iterdir() if p.is_dir() and p.name != SPARE):
            files = sorted(os.listdir(qdir))
            names = set(files)
            for f in files:
                head, _, suffix = f.rpartition(".")
                path = qdir / f
                try:
                    if suffix in RESULT_SUFFIXES and is_job_name(head):
                        if (head in names or f"{head}.{SENDING}" in names or f"{head}.{DELIVERED}" in names
                                or path.stat().st_nlink > 1):
                            # Not committed (state 3), or already published by link().
                            if drop_uncommitted:
                                if suffix == SENT and f"{head}.{SENDING}" in names and head not in names:
                                    # The job's delivered mark, whatever it holds (it was not
                                    # known to be synced): kept as a name first, then dropped.
                                    os.rename(qdir / f"{head}.{SENDING}", qdir / f"{head}.{DELIVERED}")
                                    names.add(f"{head}.{DELIVERED}")
                                path.unlink()
                        else:
                            self._publish(path, Claimed(node, qdir.name, head, f"{qdir}/{head}"))
                    elif f.endswith(".tmp") and drop_uncommitted:
                        path.unlink()
                except FileNotFoundError:
                    if drop_uncommitted:
                        raise
                    continue  # published (or dropped) by the process that wrote it
        if drop_uncommitted:
            # Spares left by a process that stopped without cleaning up.
            spares = base / SPARE
            try:
                left = os.listdir(spares)
            except FileNotFoundError:
                left = []
            for f in left:
                try:
                    os.unlink(spares / f)
                except FileNotFoundError:
                    pass

    def claimed_jobs(self, node: str) -> tuple[list[Claimed], list[Claimed], list[Claimed]]:
        """What node ``node`` holds in ACTIVE after :meth:`finish_committed`:
        the jobs only claimed (state 2), those whose SMTP transaction was
        interrupted (2a), and those the server had accepted (2b)."""
        self.finish_committed(node)
        base = self.active_dir(node)
        claimed: list[Claimed] = []
        interrupted: list[Claimed] = []
        delivered: list[Claimed] = []
        if not base.is_dir():
            return claimed, interrupted, delivered
        for qdir in sorted(p for p in base.iterdir() if p.is_dir() and p.name != SPARE):
            for f in sorted(os.listdir(qdir), key=os.fsencode):
                head, _, suffix = f.rpartition(".")
                if is_job_name(f):
                    claimed.append(Claimed(node, qdir.name, f, f"{qdir}/{f}"))
                elif suffix == SENDING and is_job_name(head):
                    interrupted.append(Claimed(node, qdir.name, head, f"{qdir}/{f}"))
                elif suffix == DELIVERED and is_job_name(head):
                    delivered.append(Claimed(node, qdir.name, head, f"{qdir}/{f}"))
        return claimed, interrupted, delivered

    def holds_jobs(self, node: str) -> bool:
        """Whether ``ACTIVE/<node>`` holds a claimed job or a result."""
        base = self.active_dir(node)
        try:
            qdirs = [q for q in base.iterdir() if q.is_dir() and q.name != SPARE]
        except (FileNotFoundError, NotADirectoryError):
            return False
        for qdir in qdirs:
            for f in os.listdir(qdir):
                head, _, suffix = f.rpartition(".")
                if is_job_name(f) or (suffix in (*RESULT_SUFFIXES, SENDING, DELIVERED) and is_job_name(head)):
                    return True
        return False

    def counts(self) -> dict[str, int]:
        """Job files per folder (TOSEND..., SENT, FAIL) and per node in ACTIVE."""
        out: dict[str, int] = {}
        for name in [*self.queue_folders(), SENT, FAIL]:
            try:
                with os.scandir(self.root / name) as it:
                    out[name] = sum(1 for e in it if is_job_name(e.name) and e.is_file())
            except FileNotFoundError:
                out[name] = 0
        active = self.root / ACTIVE
        if active.is_dir():
            for node_dir in sorted(p for p in active.iterdir() if p.is_dir()):
                out[f"{ACTIVE}/{node_dir.name}"] = sum(
                    1 for q in node_dir.iterdir() if q.is_dir() and q.name != SPARE for f in os.listdir(q)
                    if is_job_name(f.removesuffix(f".{SENDING}").removesuffix(f".{DELIVERED}")))
        return out
