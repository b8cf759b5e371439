"""One process at a time per job: an exclusive lock file that the operating system releases when its holder
dies, holding who took it, so that a second ``autoseg train`` of the same fold (or ``preprocess`` of the same run)
is refused by name and a lock left by a killed process is taken over with a line saying so."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["JobLock", "LockedError", "fold_lock_path"]

log = logging.getLogger(__name__)


class LockedError(ValueError):
    """Another live process holds the lock (the message says which process, on which host, since when)."""


def fold_lock_path(fold_dir: Path) -> Path:
    """The lock of a fold: beside its folder, so that ``--restart``, which deletes the folder, keeps it."""
    return fold_dir.with_name(f".{fold_dir.name}.lock")


def _try_lock(fd: int) -> bool:
    """Take the OS lock on the open file ``fd`` without waiting; False when another process holds it."""
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(fd: int) -> dict:
    """What the lock file says about the process that took it (empty when it says nothing readable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        value = json.loads(raw.decode()) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (since {when}: {holder.get('command', '?')})"


class JobLock:
    """An exclusive lock on ``path`` for one job, described as ``what`` in messages.

    Use as a context manager or with :meth:`acquire` / :meth:`release`. The lock is the operating system's
    (``flock``), so a process killed with SIGKILL or a power cut releases it; its file remains, with the dead
    holder's details, and the next process takes it over and says so. On a filesystem without locks (some FUSE
    mounts) the job runs unlocked after a warning.
    """

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            LockedError: a live process holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _try_lock(fd)
            except OSError as e:  # ENOLCK, EOPNOTSUPP: this filesystem has no locks
                os.close(fd)
                log.warning("%s: cannot lock on this filesystem (%s); make sure no other process runs %s",
                            self.path, e.strerror, self.what)
                return
            if not locked:
                holder = _holder(fd)
                os.close(fd)
                raise LockedError(f"{self.what} is already running: {_describe(holder)}; wait for it to finish or "
                                  f"stop it (lock: {self.path})")
            if self._same_file(fd):
                break
            os.close(fd)  # the holder released and deleted the file between our open and our lock: try again
        stale = _holder(fd)
        if stale:
            log.warning("%s: taking over the lock of %s, which ended without releasing it", self.what, _describe(stale))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self._fd = fd

    def _same_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Delete the lock file and let go (a no-op when not held)."""
        if self._fd is None:
            return
        if os.name == "nt":  # Windows deletes no open file; a process waiting in between finds no holder
            os.close(self._fd)
            self.path.unlink(missing_ok=True)
        else:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting process then retries on a new file
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
