"""One writer per asset partition: a lock in the store itself, so it works across processes and pods.

On a local store it is an flock on the lock file: the kernel releases it when the holder dies,
however it dies; the holder removes the file when done. S3 has no locks, so there it is an object created only if absent
(`If-None-Match: *`), kept alive by a heartbeat that rewrites it only if unchanged (`If-Match`),
and deleted the same way. A holder that stops beating (killed, frozen) is taken over after
STALE_SECONDS, or at once when it ran on this host and its process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from lora_pipeline.errors import LoraPipelineError

HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0


class ConcurrentWriteError(LoraPipelineError):
    """Another run is writing the same asset partition."""


def process_alive(pid: int) -> bool:
    """Whether a process of this machine exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(run_id: str) -> dict:
    """Who holds a lock: written into it, and shown to whoever finds it taken."""
    now = time.time()
    return {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": now, "heartbeat": now}


def _taken(what: str, owner: dict) -> ConcurrentWriteError:
    since = datetime.fromtimestamp(owner.get("since", 0), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return ConcurrentWriteError(
        f"{what} is being written by run {owner.get('run_id', '?')} (pid {owner.get('pid', '?')} on host "
        f"{owner.get('host', '?')}, since {since}); this run stops instead of interleaving with it. "
        "Launch again when that run has finished, or stop it"
    )


def _abandoned(owner: dict, now: float) -> bool:
    """A holder that no longer beats, or that ran on this host and whose process is gone."""
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        if not process_alive(owner["pid"]):
            return True
    return now - float(owner.get("heartbeat", 0)) > STALE_SECONDS


@contextlib.contextmanager
def local_writer_lock(path: Path, what: str, run_id: str) -> Iterator[None]:
    """Hold the flock of the file at path, or raise ConcurrentWriteError naming its holder."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(os.pread(descriptor, 1 << 16, 0) or b"{}")
            except ValueError:  # the holder is writing its name this instant
                owner = {}
            os.close(descriptor)
            raise _taken(what, owner) from None
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)  # we locked a file its holder removed as it finished: lock the new one
    try:
        os.ftruncate(descriptor, 0)  # a holder that was killed left its name
        os.pwrite(descriptor, json.dumps(holder(run_id)).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it, so nobody locks a file about to vanish
        os.close(descriptor)


@contextlib.contextmanager
def s3_writer_lock(fs, path: str, what: str, run_id: str) -> Iterator[None]:
    """Hold the lock object at path on an s3fs filesystem, or raise ConcurrentWriteError naming its holder."""
    bucket, key, _ = fs.split_path(path)

    def put(body: dict, **condition) -> str:
        return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=json.dumps(body).encode(), **condition)["ETag"]

    mine = holder(run_id)
    try:
        etag = put(mine, IfNoneMatch="*")
    except OSError:  # s3fs reports a failed precondition as an OSError
        fs.invalidate_cache(path)
        if not fs.exists(path):
            raise
        found_etag = fs.info(path)["ETag"]
        owner = json.loads(fs.cat_file(path) or b"{}")
        if not _abandoned(owner, time.time()):
            raise _taken(what, owner) from None
        try:  # take it over only if nobody else did since we read it
            etag = put(mine, IfMatch=found_etag)
        except OSError:
            raise _taken(what, owner) from None
    beating = _Heartbeat(put, mine, etag)
    beating.start()
    try:
        yield
    finally:
        beating.stop()
        with contextlib.suppress(OSError):  # someone who took it over owns it now
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=beating.etag)


class _Heartbeat(threading.Thread):
    """Rewrites the lock object every HEARTBEAT_SECONDS while its holder works, if nobody took it over."""

    def __init__(self, put, mine: dict, etag: str):
        super().__init__(daemon=True, name="lora-pipeline-lock-heartbeat")
        self._put, self._mine, self.etag = put, mine, etag
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            try:
                self.etag = self._put({**self._mine, "heartbeat": time.time()}, IfMatch=self.etag)
            except OSError:
                return  # taken over (we were silent too long) or the network is down: stop beating

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=HEARTBEAT_SECONDS)
