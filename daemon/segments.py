"""What a kvstored keeps in /dev/shm, named for its owner, and reclaiming what dead ones left.

A daemon with a shared DRAM pool holds three entries while it runs:

    /dev/shm/kvstored-<pid>-<start>-<boot>-<pidns>-<random>             the pool
    /dev/shm/kvstored-<pid>-<start>-<boot>-<pidns>-<random>-dir         where blocks lie
    /dev/shm/kvstored-<pid>-<start>-<boot>-<pidns>-<random>-doorbell/   the commit socket

The owner is named by four numbers: its pid; its start time (clock ticks after boot,
field 22 of /proc/PID/stat), so that a process that got the pid later is not taken for it;
the first 8 hex digits of the kernel's boot id; the inode of its pid namespace, since a pid
means nothing in another one (containers that share /dev/shm but not pids).

A clean stop removes all three; a SIGKILL or the OOM killer cannot, and the memory stays
taken until someone removes them. So each daemon, as it starts, removes those whose owner
is certainly gone (`reclaim_dead`): another boot, or this pid namespace with no process
of that pid and start time, or, for an owner in another pid namespace (a container
restarted beside the same /dev/shm: the daemon that died there can never be looked up
from here), a pool nobody holds locked: its daemon takes a shared flock on it as it
creates it and holds it while it lives, and the kernel drops that lock when the process
dies. The -dir and -doorbell entries go with their pool (alone, after a minute). Never
touched: entries of another user, names of another form, and owners that are alive or
cannot be judged (a /proc entry that cannot be read, a pool locked or created moments ago).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass

from kvstore.shm.directory import directory_name
from kvstore.shm.mapping import SHM_DIR, boot_id
from kvstore.units import format_bytes

log = logging.getLogger(__name__)

DOORBELL_SUFFIX = "-doorbell"
_NAME = re.compile(r"^kvstored-(\d+)-(\d+)-([0-9a-f]{8})-(\d+)-[0-9a-f]{8}"
                   rf"({re.escape(directory_name(''))}|{DOORBELL_SUFFIX})?$")


@dataclass(frozen=True, slots=True)
class Owner:
    """The process a segment belongs to."""

    pid: int
    start_ticks: int
    boot: str  # 8 hex digits of the boot id
    pidns: int

    @classmethod
    def this_process(cls) -> Owner:
        pid = os.getpid()
        start_ticks = _start_ticks(pid)
        assert start_ticks is not None, "/proc/self/stat cannot be read"
        return cls(pid, start_ticks, _boot(), _pid_namespace())

    @property
    def prefix(self) -> str:
        """How the names of this owner's segments begin."""
        return f"kvstored-{self.pid}-{self.start_ticks}-{self.boot}-{self.pidns}-"

    def is_gone(self, me: Owner) -> bool:
        """True only when this owner has certainly exited (as seen by ``me``)."""
        if self.boot != me.boot:
            return True  # it ran under another kernel
        if self.pidns != me.pidns:
            return False  # its pids are not ours to look up
        try:
            return _start_ticks(self.pid) != self.start_ticks
        except PermissionError:
            return False


def new_pool_name() -> str:
    """A name for this process's shared pool (its directory and doorbell add suffixes)."""
    return Owner.this_process().prefix + secrets.token_hex(4)


def doorbell_directory(pool_name: str) -> str:
    """The directory of the pool's doorbell socket, beside the pool."""
    return os.path.join(SHM_DIR, pool_name + DOORBELL_SUFFIX)


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """What `reclaim_dead` removed."""

    num_entries: int
    num_bytes: int
    pids: tuple[int, ...]


def reclaim_dead(shm_dir: str = SHM_DIR) -> Reclaimed:
    """Remove the entries of kvstored processes that are gone; one log line if any."""
    me, uid = Owner.this_process(), os.geteuid()
    num_entries = num_bytes = 0
    pids: set[int] = set()
    for name in os.listdir(shm_dir):
        match = _NAME.match(name)
        if match is None:
            continue
        pid, start, boot, pidns = match.groups()[:4]
        owner = Owner(int(pid), int(start), boot, int(pidns))
        if not owner.is_gone(me) and not (owner.pidns != me.pidns
                                          and _is_orphaned(shm_dir, name, match)):
            continue
        nbytes = _remove(os.path.join(shm_dir, name), uid)
        if nbytes is not None:
            num_entries += 1
            num_bytes += nbytes
            pids.add(owner.pid)
    reclaimed = Reclaimed(num_entries, num_bytes, tuple(sorted(pids)))
    if num_entries:
        log.info("reclaimed %d shared-memory entries (%s) left in %s by %d dead kvstored "
                 "processes (pids %s)", num_entries, format_bytes(num_bytes), shm_dir,
                 len(pids), ", ".join(map(str, reclaimed.pids)))
    return reclaimed


def remove_own(shm_dir: str = SHM_DIR) -> int:
    """Remove every entry of this process (at exit, whatever else went wrong); how many."""
    prefix, uid, removed = Owner.this_process().prefix, os.geteuid(), 0
    for name in os.listdir(shm_dir):
        if name.startswith(prefix) and _remove(os.path.join(shm_dir, name), uid) is not None:
            removed += 1
    return removed


def _remove(path: str, uid: int) -> int | None:
    """Remove a segment file or a doorbell directory owned by ``uid``: the bytes it held,
    or None if it was not ours to remove (or already gone)."""
    try:
        st = os.lstat(path)
        if st.st_uid != uid:
            return None
        if stat.S_ISREG(st.st_mode):
            os.unlink(path)
            return st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode) and path.endswith(DOORBELL_SUFFIX):
            shutil.rmtree(path)
            return 0
    except FileNotFoundError:  # its owner or another daemon removed it meanwhile
        pass
    return None


_ORPHAN_AGE_S = 60.0  # an entry without its pool, or a pool this new, may be mid-creation


def _is_orphaned(shm_dir: str, name: str, match: re.Match[str]) -> bool:
    """Whether the entry ``name`` (of an owner in another pid namespace) belongs to a pool
    no process holds: its daemon locks the pool from its creation until it closes it."""
    suffix = match.group(5) or ""
    pool = os.path.join(shm_dir, name[:len(name) - len(suffix)] if suffix else name)
    try:
        fd = os.open(pool, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:  # a -dir or -doorbell left alone
        return _age_s(os.path.join(shm_dir, name)) > _ORPHAN_AGE_S
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its daemon lives
    else:
        return _age_s(pool) > 1.0  # (not one being created, locked a moment from now)
    finally:
        os.close(fd)


def _age_s(path: str) -> float:
    try:
        return time.time() - os.lstat(path).st_ctime
    except OSError:
        return 0.0


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot); None if there is none, or
    only a zombie (it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    state, start_ticks = fields[0], int(fields[19])  # fields 3 and 22 of stat(5)
    return None if state in ("Z", "X") else start_ticks


def _boot() -> str:
    booted = boot_id()
    digits = booted.replace("-", "")[:8].lower()
    if re.fullmatch(r"[0-9a-f]{8}", digits):
        return digits
    import hashlib  # no boot id here: boot_id() gave the host name

    return hashlib.blake2b(booted.encode(), digest_size=4).hexdigest()


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0
