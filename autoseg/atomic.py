"""Write files so that they are either complete or absent: a hidden temporary name, synced to the disk, then a
rename (itself synced); a write that fails says in one line what could not be written and that the previous
file is intact."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import resource
except ImportError:  # Windows: no file-size limits to name
    resource = None  # type: ignore[assignment]

__all__ = ["TMP_PREFIX", "WriteError", "atomic_path", "copy_file", "remove_temporaries", "sync_path"]

#: temporary files start with this; the name keeps the final file's ending, which some writers need
TMP_PREFIX = ".tmp-"
#: below this much free space a failed write is put down to a full disk
_NEARLY_FULL_BYTES = 64 * 2**20


class WriteError(OSError):
    """A file could not be written (full disk, quota, file-size limit, permissions, a writer's own failure).
    The message names the file and says that whatever was there before is untouched."""


def _reason(exc: BaseException, folder: Path) -> str:
    """Why a write failed, in words: the libraries we write with (torch, blosc2) hide ``ENOSPC`` behind their
    own messages, so a failure next to a nearly full disk or under a file-size limit is named as such."""
    code = getattr(exc, "errno", None)
    free = shutil.disk_usage(folder).free if folder.is_dir() else None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else -1
    if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < _NEARLY_FULL_BYTES):
        return f"the disk is full ({free / 2**20:.0f} MiB free)" if free is not None else "the disk is full"
    unlimited = resource is None or limit in (-1, resource.RLIM_INFINITY)
    if code == errno.EFBIG or (not unlimited and code not in (errno.EACCES, errno.EPERM)):
        return f"over the file-size limit of this process (ulimit -f: {limit} bytes)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def sync_path(path: Path) -> None:
    """Flush ``path`` (a file, or every file under a folder) to the disk. A no-op where a file cannot be opened
    for it."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: fsync of the folder; Windows has no such call)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some network filesystems refuse fsync of a folder: the rename is still atomic
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, flush it to the disk and
    rename it to ``path`` (atomic on POSIX and Windows), then flush the folder, so that even after a power cut
    ``path`` is the old file or the whole new one. On error or interruption, delete the temporary.

    Raises:
        WriteError: the block or the flush failed with an ``OSError`` or a writer's ``RuntimeError`` (torch and
            blosc2 raise those for a full disk); the message names ``path`` and the reason.

    Example::

        with atomic_path(out / "plans.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}-{path.name}")
    try:
        try:
            yield tmp
            sync_path(tmp)
            os.replace(tmp, path)
            _sync_folder(path.parent)
        except (OSError, RuntimeError) as e:
            if isinstance(e, WriteError):
                raise
            before = "the previous file is intact" if path.exists() else "nothing was written in its place"
            raise WriteError(f"{path}: could not be written: {_reason(e, path.parent)}; {before}") from e
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically (see :func:`atomic_path`)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that is writing ``tmp`` (its id is in the name) still runs on this machine."""
    pid = tmp.name[len(TMP_PREFIX):].split("-", 1)[0]
    if not pid.isdigit() or os.name == "nt":  # an older name without the id; Windows has no signal 0
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_temporaries(folder: Path) -> int:
    """Delete files left under temporary names in ``folder`` by a process that was killed; returns how many.
    Those of a process still running (another command writing into the same folder) are left alone; a folder
    that does not exist has none."""
    n = 0
    for p in folder.glob(f"{TMP_PREFIX}*"):
        if _writer_alive(p):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n
