"""One writer per output: the lease a run holds on a store or checkpoint folder while it writes it."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from padim_ray.files import Location, StorageError, storage_errors

log = logging.getLogger(__name__)

WRITING_MARKER = ".padim-writing"  # holds the token of the run writing a store on object storage
LEASE_HEARTBEAT = 30.0  # seconds between refreshes of a lease marker on object storage
LEASE_STALE = 180.0  # a marker not refreshed for this long belongs to a dead run: it is taken over


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: written into its lock file or marker."""

    token: str
    host: str
    pid: int
    started: float  # time.time() when the lease was taken
    heartbeat: float  # last refresh (object storage)

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder a lock file or marker names; None for an empty file, and a long-dead holder
        for a marker written before leases had holders (a bare token)."""
        text = data.decode(errors="replace").strip()
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return cls(token=text, host="?", pid=0, started=0.0, heartbeat=0.0)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}"

    def is_dead(self) -> bool:
        """Whether the holder is gone: its heartbeat is stale, or it was a process of this host that has exited."""
        if time.time() - self.heartbeat > LEASE_STALE:
            return True
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # another user's live process
        return False


class Lease:
    """The right to write one output (a store or a checkpoint folder), held by one run at a time.

    Locally: an exclusive flock on `.NAME.lock` beside the output, naming the holder; the kernel
    drops it when the holder dies, so a dead run's lease is simply taken. On object storage: the
    `.padim-writing` marker inside the output, naming the holder and refreshed by a thread every
    LEASE_HEARTBEAT seconds; a marker older than LEASE_STALE, or of a process gone from this
    host, is taken over. `option` names the output in messages (--out, --checkpoint-dir).
    """

    def __init__(self, where: Location, option: str, token: str | None = None):
        self.where, self.option = where, option
        now = time.time()
        self.holder = Holder(token or uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now)
        self.file = where / WRITING_MARKER if where.is_remote else where.parent / f".{where.name}.lock"
        self._fd: int | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # a refresh never rewrites the marker after release removed it
        with storage_errors(self.file):
            if where.is_remote:
                self._take_marker()
            else:
                self._take_lock()

    def _busy(self, holder: Holder | None) -> StorageError:
        who = holder.describe() if holder else "another run"
        return StorageError(
            f"{self.option} {self.where} is being written by {who}; wait for it, or remove {self.file} if that run is dead"
        )

    def _taken_over(self, holder: Holder | None) -> None:
        if holder:
            log.warning("%s %s: taking over the lease of %s, which is gone", self.option, self.where, holder.describe())

    def _take_lock(self) -> None:
        for _ in range(3):  # the holder may remove the file between our open and our flock
            try:
                fd = os.open(self.file.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:  # e.g. a read-only file system, where root's os.access still says yes
                raise StorageError(f"output folder {self.file.parent} is not writable ({err.strerror}); choose another {self.option}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = Holder.parse(os.pread(fd, 4096, 0))
                os.close(fd)
                raise self._busy(holder) from None
            if os.path.exists(self.file.path) and os.path.samestat(os.fstat(fd), os.stat(self.file.path)):
                self._taken_over(Holder.parse(os.pread(fd, 4096, 0)))
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(self.holder.__dict__).encode(), 0)
                self._fd = fd
                return
            os.close(fd)
        raise self._busy(None)

    def _take_marker(self) -> None:
        holder = Holder.parse(self.file.read_bytes()) if self.file.exists() else None
        if holder and not holder.is_dead():
            raise self._busy(holder)
        self._taken_over(holder)
        self.file.write_bytes(json.dumps(self.holder.__dict__).encode())  # also proves the bucket is writable
        threading.Thread(target=self._refresh, name=f"lease {self.where}", daemon=True).start()

    def _refresh(self) -> None:
        while not self._stopped.wait(LEASE_HEARTBEAT):
            with self._lock:
                try:
                    if not self._stopped.is_set() and self.holds():
                        heartbeat = {**self.holder.__dict__, "heartbeat": time.time()}
                        self.file.write_bytes(json.dumps(heartbeat).encode())
                except StorageError as err:
                    log.warning("%s %s: cannot refresh the lease (%s); retrying", self.option, self.where, err)

    def holds(self) -> bool:
        """Whether this run still holds the lease (on object storage another run may have taken it over)."""
        if not self.where.is_remote:
            return self._fd is not None
        holder = Holder.parse(self.file.read_bytes()) if self.file.exists() else None
        return holder is not None and holder.token == self.holder.token

    def release(self) -> None:
        """Give the lease up, removing its file if it is still ours (idempotent)."""
        with self._lock:
            self._stopped.set()
            if self._fd is not None:
                os.unlink(self.file.path)
                os.close(self._fd)
                self._fd = None
            elif self.where.is_remote and self.holds():
                self.file.remove()
