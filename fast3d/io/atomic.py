"""Writing a file atomically: to a hidden temporary file beside it, renamed over it when complete.

A crash or an exception never leaves a half-written file under the final name: readers see the
old file or the new one. The temporary name is ``.<name>.tmp<pid>`` in the same directory (a
rename is atomic only within one file system), so concurrent writers do not collide and a resumed
job can find and delete what a killed one left (``glob(".<name>.tmp*")``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager


def temp_path(path: str) -> str:
    """The temporary name :func:`atomic_path` writes ``path`` under."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path to write ``path``'s content to; on a clean exit it is renamed to
    ``path``, on an exception it is deleted. The directory must exist."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    """``open(path, mode)`` for writing, made atomic by :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_atomic(path: str | os.PathLike, *parts: bytes) -> None:
    """Write the byte strings ``parts``, in order, to ``path`` atomically."""
    with atomic_open(os.fspath(path), "wb") as f:
        for part in parts:
            f.write(part)
