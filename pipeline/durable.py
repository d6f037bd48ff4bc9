"""Crash safety in one place: every file the pipeline writes appears whole or not at all, a failed
write is one clear error, a stage-one store has one writer at a time, and the tests' kill -9 hook."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import LadderCacheError, OutputError

# How writers that are not Python's own file objects report an operating-system write failure (a full
# disk, a read-only folder, a file-size limit): safetensors (Rust) "I/O error: ... (os error 28)";
# torch.save (caffe2 inline_container.cc) "open file failed with strerror: ..." or, on a short write,
# "unexpected pos 576 vs 534" (both measured with RLIMIT_FSIZE and a read-only tmpfs, torch 2.13).
_WRITE_FAILURE = re.compile(r"os error \d+|strerror|unexpected pos|file write failed|failed writing")


def write_failure(path: Path, e: BaseException) -> OutputError | None:
    """`e`, raised while writing `path`, as one clear error if the file system refused the write."""
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
    elif _WRITE_FAILURE.search(str(e)):
        reason = str(e).strip().splitlines()[-1][:200]
        if "unexpected pos" in reason:  # torch's words for a short write
            reason = f"the write stopped short: a full disk or a file-size limit; torch says: {reason}"
    else:
        return None
    return OutputError(f"{path}: cannot write it ({reason}); free disk space or pick a writable location "
                       "(nothing was left half-written)")


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary sibling of `path` to write; it replaces `path` only if the block succeeds. A
    write the file system refuses becomes an OutputError naming `path`; the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except LadderCacheError:
        raise
    except Exception as e:
        err = write_failure(path, e)
        if err is None:
            raise
        raise err from e
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable(path: str | Path) -> None:
    """Refuse an output whose folder cannot be written before any work is done (the nearest existing
    folder is what the write would need; access() also reports a read-only file system for root)."""
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        why = "is not a folder" if not folder.is_dir() else "is not writable (read-only or no permission)"
        raise OutputError(f"{path}: cannot write it, {folder} {why}; pick a writable location")


def atomic_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def _lock_owner_alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process (a shared file system): it cannot be checked from here
    started = _process_start(int(owner.get("pid", -1)))
    # a pid the kernel reused for another process is not the owner: its start time differs
    return started is not None and abs(started - float(owner.get("started", 0))) < 1.0


@contextmanager
def owner_lock(path: str | Path, what: str):
    """Hold the lock file `path` (owner pid, host and process start time) while writing `what`. A second
    writer gets an OutputError naming the owner's pid; a lock left by a dead process (kill -9, power
    loss) is recognized by its pid and start time and taken over."""
    path = Path(path)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid())}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, ValueError):
                owner = {}  # half-written by a writer that died while creating it
            if owner and _lock_owner_alive(owner):
                raise OutputError(f"{what} is in use by pid {owner['pid']} on {owner['host']} (lock file {path}); "
                                  f"wait for that run to finish, or delete {path} if no such process exists") from None
            # stale: remove and retry. Two writers taking over the same stale lock at the same instant
            # could both succeed; that needs a crash and two restarts within microseconds.
            path.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise write_failure(path, e) from e
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise OutputError(f"{path}: could not take the lock file; delete it if no stage one is running")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def crash_point(env: str, count: int) -> None:
    """Test hook: SIGKILL this process (as `kill -9` would) when the variable `env` equals `count`."""
    if os.environ.get(env) == str(count):
        os.kill(os.getpid(), signal.SIGKILL)


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 4 MiB blocks (stores, weights and downloaded archives are hashed with it)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def crash_once(env: str) -> None:
    """Test hook: SIGKILL this process if the variable `env` names a file that does not exist yet, creating it
    first, so that exactly one process of many (a cluster's workers, a worker restarted after the kill) dies."""
    marker = os.environ.get(env)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
