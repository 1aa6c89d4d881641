"""Atomic checkpoints: write to a temporary file in the same directory, fsync, then rename.

Also the run-directory helpers of the command line: :class:`DirLock` (one command per
output directory at a time) and :func:`run_dir_kind` (what a directory already holds).
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from .errors import LocosnnError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sigmask(how: int, signals: Any) -> Any:
    """``signal.pthread_sigmask`` for this thread; returns the previous mask (None where unsupported)."""
    try:
        return signal.pthread_sigmask(how, signals)
    except (AttributeError, ValueError, OSError):
        return None


def atomic_write_bytes(path: str | Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    # a signal between creating the temporary file and knowing its name would leak it: block SIGINT and
    # SIGTERM until mkstemp has returned
    mask = _sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        if mask is not None:  # a pending Ctrl-C / SIGTERM is delivered here, where the handler below sees tmp
            _sigmask(signal.SIG_SETMASK, mask)
            mask = None
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the file a normal file's mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        if mask is not None:
            _sigmask(signal.SIG_SETMASK, mask)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, expect: Iterable[str] = ()) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`. A missing, truncated or corrupt file, or one
    without the keys in ``expect``, is a :class:`LocosnnError` (one line), never a traceback."""
    path = Path(path)
    if not path.is_file():
        raise LocosnnError(f"checkpoint {path} not found")
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - unpickling garbage raises anything from EOFError to RuntimeError
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:120]
        raise LocosnnError(f"checkpoint {path} cannot be read; it is truncated or corrupt "
                           f"({type(e).__name__}: {first})") from None
    missing = [k for k in expect if not isinstance(st, dict) or k not in st]
    if missing:
        raise LocosnnError(f"checkpoint {path} is not a locosnn checkpoint of this kind (no {', '.join(missing)})")
    return st


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


# -- run directories -------------------------------------------------------------------------------------
LOCK_NAME = ".lock"


class DirLock:
    """An exclusive lock on an output directory: ``flock`` on ``DIR/.lock``, which holds the owner's pid and
    command. A second command on the same directory fails at once with a :class:`LocosnnError`. Released
    (and the file removed) on :meth:`release`, on exit from a ``with`` block, or by the kernel when the
    process dies."""

    def __init__(self, directory: str | Path, command: str) -> None:
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self.command = command
        self.fd: Optional[int] = None
        self.created = False

    def acquire(self) -> "DirLock":
        self.created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                pid = owner[0] if owner else "unknown"
                what = owner[1] if len(owner) > 1 else self.command
                self._remove_if_created()
                raise LocosnnError(f"{self.dir} is in use by another locosnn {what} (pid {pid}); wait for it "
                                   "to finish or choose another --out") from None
            try:  # the holder before us may have removed the file after we opened it: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.command}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the lock (see acquire)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        """A directory made only to hold the lock (the command failed before writing) is removed again."""
        if self.created:
            try:
                self.dir.rmdir()
            except OSError:  # not empty (the run wrote files) or gone
                pass

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


#: files a ``locosnn train`` run directory holds
TRAIN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt")
#: files that mark a ``locosnn continual`` run directory
CONTINUAL_FILES = ("matrix.json", "results.csv")


def run_dir_kind(path: str | Path) -> str:
    """What a would-be output directory holds: ``"missing"``, ``"file"`` (not a directory), ``"empty"``,
    ``"train"``, ``"continual"`` or ``"other"`` (files of neither). Lock files and stray ``*.tmp`` files of
    an interrupted atomic write are ignored."""
    p = Path(path)
    if not p.exists():
        return "missing"
    if not p.is_dir():
        return "file"
    names = {q.name for q in p.iterdir() if q.name != LOCK_NAME and not q.name.endswith(".tmp")}
    if not names:
        return "empty"
    kind = None
    if (p / "config.json").is_file():
        try:
            meta = json.loads((p / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        if isinstance(meta, dict) and "settings" in meta:
            kind = "continual"
        elif isinstance(meta, dict) and "config" in meta:
            kind = "train"
    if kind is None and any(n in names for n in CONTINUAL_FILES):
        kind = "continual"
    if kind is None and ("metrics.jsonl" in names or "checkpoint.pt" in names):
        kind = "train"
    if kind == "train" and any(n in names for n in CONTINUAL_FILES):
        kind = "continual"
    return kind or "other"
