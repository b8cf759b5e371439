"""Write files so that they are either complete or absent: a hidden temporary name, then a rename."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["TMP_PREFIX", "atomic_path", "remove_temporaries"]

#: temporary files start with this; the name keeps the final file's ending, which some writers need
TMP_PREFIX = ".tmp-"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, rename it to ``path``
    (atomic on POSIX and Windows); on error or interruption, delete it.

    Example::

        with atomic_path(out / "plans.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_temporaries(folder: Path) -> int:
    """Delete files left under temporary names in ``folder`` by a run that was killed; returns how many."""
    n = 0
    for p in folder.glob(f"{TMP_PREFIX}*"):
        p.unlink(missing_ok=True)
        n += 1
    return n
