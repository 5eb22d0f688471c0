"""One writer at a time on a cache.

`extract-features` and `verify --repair` hold a cache's writer lock for as long as they
write it. Two writers on one cache would interleave shards of two runs (or of two
networks) under one run's metadata, or delete each other's files; the second one is
refused instead, in one line naming the holder.

- Local caches: an OS lock (`filelock`: flock on Unix) on the hidden file
  `.NAME.lock` beside the cache, and the holder's record (host, pid, since, command) in
  `.NAME.writer.json` beside it, for the refusal's message. The kernel releases the lock
  of a process that dies, so a killed run's lock is taken over, with a message.
- Object stores have no locks: the record object `.NAME.writer.json` beside the cache is
  created only if absent (a conditional write where the filesystem has one: S3's
  If-None-Match). A record left by a dead process of this host is taken over; any
  other record refuses the run and names the object to delete if no run is writing.
  See storage_schema.md, "Concurrent writers".

torchrun's ranks are one writer: rank 0 takes the lock for the job.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import sys
from pathlib import Path

from ..errors import FeatreconError
from . import remote

log = logging.getLogger(__name__)
_HELD: set[str] = set()  # the lock files this process holds


def _record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


def _alive_here(holder: dict) -> bool:
    """Is the holder a live process of this host? (Unknown hosts count as alive.)"""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _paths(target) -> tuple[str, str]:
    """(lock, record) beside `target`: hidden names in the same folder or prefix."""
    if remote.is_url(target):
        parent, _, name = str(target).rstrip("/").rpartition("/")
        return f"{parent}/.{name}.lock", f"{parent}/.{name}.writer.json"
    target = Path(target).expanduser().absolute()
    return str(target.with_name(f".{target.name}.lock")), str(target.with_name(f".{target.name}.writer.json"))


def held_here(target) -> bool:
    """Does this process hold the writer lock of `target`?"""
    return _paths(target)[0] in _HELD


class WriterLock:
    """`with WriterLock(path):` holds the writer lock of the cache at `path`, or raises a
    FeatreconError naming the holder."""

    def __init__(self, target, what: str = "written"):
        self.target, self.what = target, what
        self.lock_path, self.record_path = _paths(target)
        self._lock = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _busy(self, holder: dict | None) -> FeatreconError:
        return FeatreconError(f"{self.target} is being {self.what} by another run ({_describe(holder)}); wait for it "
                              "to finish or stop it, then rerun (one writer at a time)")

    def acquire(self) -> None:
        if remote.is_url(self.target):
            self._acquire_remote()
            return
        from filelock import FileLock, Timeout

        Path(self.lock_path).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.lock_path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise self._busy(self._read_local()) from None
        except OSError as e:
            raise FeatreconError(f"{self.lock_path}: cannot take the writer lock ({e.strerror or e}); "
                                 "check that the folder is writable") from None
        self._lock = lock
        _HELD.add(self.lock_path)
        stale = self._read_local()
        if stale:  # the lock was free, so its last holder ended without releasing it
            log.warning("%s: taking over the writer lock of a run that ended without releasing it (%s)",
                        self.target, _describe(stale))
        tmp = Path(self.record_path + ".tmp")
        tmp.write_text(json.dumps(_record()))
        os.replace(tmp, self.record_path)

    def _read_local(self) -> dict | None:
        try:
            return json.loads(Path(self.record_path).read_text())
        except (OSError, ValueError):
            return None

    def _acquire_remote(self) -> None:
        fs, path = remote.filesystem(self.record_path)
        for attempt in range(2):
            try:
                with fs.open(path, "xb") as f:  # created only if absent
                    f.write(json.dumps(_record()).encode())
                self._lock = (fs, path)
                return
            except FileExistsError:
                pass
            except (NotImplementedError, ValueError):  # no exclusive create on this filesystem
                if not fs.exists(path):
                    fs.pipe_file(path, json.dumps(_record()).encode())
                    self._lock = (fs, path)
                    return
            try:
                holder = json.loads(fs.cat_file(path))
            except (OSError, ValueError):
                holder = None
            if attempt == 0 and holder is not None and not _alive_here(holder):
                log.warning("%s: taking over the writer record of a run that died (%s)", self.target, _describe(holder))
                fs.rm_file(path)
                continue
            raise FeatreconError(
                f"{self.target} is being {self.what} by another run ({_describe(holder)}); wait for it to finish, "
                f"or, if no run is writing it, delete {self.record_path} and rerun") from None

    def release(self) -> None:
        if self._lock is None:
            return
        if isinstance(self._lock, tuple):
            fs, path = self._lock
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass
        else:
            Path(self.record_path).unlink(missing_ok=True)
            self._lock.release()
            _HELD.discard(self.lock_path)
        self._lock = None
