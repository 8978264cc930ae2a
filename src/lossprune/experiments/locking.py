"""One writer per results file: an exclusive ``fcntl.flock`` on ``<results>.lock``.

Two sweeps appending to the same ``results.jsonl`` would each run every missing configuration
and record it twice. The lock is taken before the results are read and held until the last
record is written, so the second writer fails at once instead. ``flock`` locks belong to the open
file: the kernel releases them when the holder exits, even on SIGKILL, so a stale lock file never
blocks anyone. The holder's pid is written into the file only to name it in the error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ResultsBusyError", "writer_lock"]


class ResultsBusyError(RuntimeError):
    """Another process holds the writer lock of the results file."""


@contextmanager
def writer_lock(results: str | Path) -> Iterator[None]:
    """Hold the exclusive writer lock of ``results`` (the file ``<results>.lock``) inside.

    Raises:
        ResultsBusyError: another process holds it; names that process.
    """
    import fcntl  # POSIX only: the command line's sweeps run on Linux and macOS.

    path = Path(f"{results}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            raise ResultsBusyError(
                f"{results} is being written by another lossprune process (pid {holder}); "
                "wait for it to finish or pass another --out"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        try:
            yield
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
