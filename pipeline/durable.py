"""Crash safety in one place: every file the pipeline writes appears whole or not at all, and the
tests' kill -9 hook that proves it."""
from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary sibling of `path` to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())


def crash_point(env: str, count: int) -> None:
    """Test hook: SIGKILL this process (as `kill -9` would) when the variable `env` equals `count`."""
    if os.environ.get(env) == str(count):
        os.kill(os.getpid(), signal.SIGKILL)
