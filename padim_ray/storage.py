"""Where bytes live: one layer for local paths and s3://, gs://, file:// URIs.

Built on fsspec. s3fs and gcsfs follow their ecosystems' credential conventions: the standard AWS_*
variables (AWS_ENDPOINT_URL for S3-compatible servers such as MinIO or Ceph, read by botocore),
config files and instance profiles for S3; Google application default credentials for GCS.
zarr v3 reads and writes through `Location.zarr_store`, pyarrow through `Location.fs` and `.path`.

Object stores have no rename, so a zarr store there is published by writing its root `zarr.json`
last (`begin_store` / `commit_store`): readers see either no group or a complete one.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import posixpath
import shutil
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import zarr

from padim_ray.errors import PadimError, first_line

log = logging.getLogger(__name__)

SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs", "file": "file"}  # accepted URI schemes -> fsspec protocol
ROOT_METADATA = "zarr.json"
WRITING_MARKER = ".padim-writing"  # holds the token of the run writing a store on object storage
RESUME_FILE = ".padim-resume.json"  # identity of a resumable run, in its staging store (see begin_store)
PROGRESS_FOLDER = ".padim-progress"  # the finished work a resumable run keeps in its staging store if it stops
REMOTE_OPTIONS = {"use_listings_cache": False}  # other processes (Ray workers) write: never trust a cached listing


class StorageError(PadimError):
    """A location that cannot be read or written; the message names the URI and the fix."""


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err` and the exceptions it was raised from or during (s3fs keeps botocore's as __cause__)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _reason(err: BaseException, protocol: str) -> str | None:
    """What went wrong and how to fix it, or None for an error that is not about storage."""
    chain = list(_chain(err))
    codes = {getattr(e, "response", {}).get("Error", {}).get("Code") for e in chain if isinstance(getattr(e, "response", None), dict)}
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    text = " ".join(str(e) for e in chain).lower()
    if "NoSuchBucket" in codes or "bucket does not exist" in text:
        return "bucket does not exist; create it or fix the URI"
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError"}:
        return {
            "s3": "no usable credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or use an instance profile",
            "gs": "no usable credentials; set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`",
        }.get(protocol, "no usable credentials")
    denied_codes = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
    if any(isinstance(e, PermissionError) for e in chain) or codes & denied_codes or text.startswith("forbidden"):
        return {
            "s3": "access denied; check the credentials (AWS_* variables, instance profile) for this bucket",
            "gs": "access denied; check the Google credentials (GOOGLE_APPLICATION_CREDENTIALS, "
            "`gcloud auth application-default login`) for this bucket",
        }.get(protocol, "permission denied; check the permissions of this path")
    if isinstance(err, FileNotFoundError) or codes & {"NoSuchKey", "404"}:
        return "not found; check the URI"
    if isinstance(err, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(err, NotADirectoryError):
        return "is not a folder"
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerTimeoutError"}:
        hint = "AWS_ENDPOINT_URL and the network" if protocol == "s3" else "the network"
        return f"cannot reach the storage service ({first_line(err)}); check {hint}"
    if isinstance(err, OSError):
        return f"storage error: {first_line(err)}"
    return None


@contextmanager
def storage_errors(where: Location | str | os.PathLike):
    """Turn storage failures inside the block into one StorageError line naming `where`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        location = where if isinstance(where, Location) else Location(where)
        reason = _reason(err, location.protocol)
        if reason is None:
            raise
        raise StorageError(f"{location.uri}: {reason}") from err


def _mapped(method):
    """Run a Location method inside storage_errors(self)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with storage_errors(self):
            return method(self, *args, **kwargs)

    return wrapper


def _normalise(where: str) -> str:
    """`scheme://bucket/key` without empty parts or a trailing slash, or an absolute local path."""
    if "://" not in where:
        return os.path.abspath(os.path.expanduser(where))
    scheme, rest = where.split("://", 1)
    protocol = SCHEMES.get(scheme.lower())
    if protocol is None:
        raise StorageError(f"{where}: unsupported scheme {scheme}://; use a local path or an s3://, gs:// or file:// URI")
    if protocol == "file":
        return os.path.abspath(os.path.expanduser(rest))  # file:///x and /x are the same place
    parts = [part for part in rest.split("/") if part]
    if not parts:
        raise StorageError(f"{where}: no bucket in the URI; write {protocol}://BUCKET/PATH")
    return f"{protocol}://" + "/".join(parts)


@dataclass(frozen=True, init=False)
class Location:
    """A local path or an object-storage URI, with the filesystem that reaches it.

    `uri` is normalised: an absolute path for local paths and file:// URIs, `s3://bucket/key` or
    `gs://bucket/key` otherwise. `storage_options` go to the fsspec filesystem (e.g. key/secret).
    """

    uri: str
    storage_options: dict = field(default_factory=dict, compare=False, repr=False)

    def __init__(self, where: Location | str | os.PathLike, storage_options: dict | None = None):
        if isinstance(where, Location):
            storage_options = where.storage_options if storage_options is None else storage_options
            where = where.uri
        object.__setattr__(self, "uri", _normalise(os.fspath(where)))
        object.__setattr__(self, "storage_options", dict(storage_options or {}))

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """A local Location is path-like (open(), Path(), numpy); a URI is not."""
        if self.is_remote:
            raise TypeError(f"{self.uri} is not a local path; open it through Location")
        return self.uri

    def __truediv__(self, name: str) -> Location:
        name = str(name).strip("/")
        if self.is_remote:
            return Location(f"{self.uri}/{name}", self.storage_options)
        return Location(os.path.join(self.uri, name), self.storage_options)

    @property
    def protocol(self) -> str:
        """fsspec protocol: "file", "s3" or "gs"."""
        return self.uri.split("://", 1)[0] if "://" in self.uri else "file"

    @property
    def is_remote(self) -> bool:
        return self.protocol != "file"

    @property
    def path(self) -> str:
        """The path inside `fs`: `bucket/key` on object storage, the absolute path locally."""
        return self.uri.split("://", 1)[1] if self.is_remote else self.uri

    @property
    def resolved(self) -> str:
        """Where this really is: the path with symbolic links resolved locally, the URI otherwise."""
        return self.uri if self.is_remote else os.path.realpath(self.path)

    @property
    def bucket(self) -> str | None:
        return self.path.split("/", 1)[0] if self.is_remote else None

    @property
    def name(self) -> str:
        return posixpath.basename(self.path) if self.is_remote else os.path.basename(self.path)

    @property
    def parent(self) -> Location:
        if self.is_remote:
            head = self.uri.rsplit("/", 1)[0] if "/" in self.path else self.uri  # a bucket is its own parent
            return Location(head, self.storage_options)
        return Location(os.path.dirname(self.uri), self.storage_options)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem (fsspec caches instances, so this is cheap); built lazily, so Locations pickle."""
        if self.is_remote:
            return fsspec.filesystem(self.protocol, **{**REMOTE_OPTIONS, **self.storage_options})
        return fsspec.filesystem("file", auto_mkdir=True)  # parents appear on write, as on object storage

    @_mapped
    def exists(self) -> bool:
        return self.fs.exists(self.path)

    @_mapped
    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    @_mapped
    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    @_mapped
    def iterdir(self) -> list[Location]:
        """The children, sorted (none for a file)."""
        paths = [p.rstrip("/") for p in self.fs.ls(self.path, detail=False)]
        prefix = f"{self.protocol}://" if self.is_remote else ""
        children = [Location(prefix + p, self.storage_options) for p in paths if p != self.path.rstrip("/")]
        return sorted(children, key=lambda child: child.uri)

    @_mapped
    def open(self, mode: str = "rb"):
        """A binary file object. s3fs reports a failed write on close: close it inside storage_errors(self)."""
        if "b" not in mode:
            raise ValueError(f"open {self.uri} in a binary mode ('rb', 'wb'), not {mode!r}")
        return self.fs.open(self.path, mode)

    @_mapped
    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    @_mapped
    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    @_mapped
    def upload(self, local_file: str) -> None:
        """Copy a local file here (object storage shows the new object only once the upload completes)."""
        self.fs.put_file(local_file, self.path)

    @_mapped
    def move_to(self, destination: Location) -> None:
        """Rename a file (copy and delete on object storage) within one filesystem."""
        self.fs.mv(self.path, destination.path)

    @_mapped
    def remove(self) -> None:
        """Remove one file, ignoring one that is already gone."""
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    @_mapped
    def remove_tree(self) -> None:
        """Remove this folder or prefix and everything under it, ignoring one that is already gone."""
        if self.path.rstrip("/") in ("", "/") or (self.is_remote and "/" not in self.path):
            raise StorageError(f"{self.uri}: refusing to remove a whole bucket or filesystem root")
        try:
            if not self.is_remote:
                if os.path.isdir(self.path) and not os.path.islink(self.path):
                    shutil.rmtree(self.path)
                else:
                    os.remove(self.path)
            else:
                self.fs.rm(self.path, recursive=True)
        except FileNotFoundError:
            pass

    def zarr_store(self, read_only: bool) -> zarr.abc.store.Store:
        """A zarr v3 store rooted here: LocalStore for local paths, FsspecStore (async fs) otherwise."""
        with storage_errors(self):
            if not self.is_remote:
                return zarr.storage.LocalStore(self.path, read_only=read_only)
            options = {**REMOTE_OPTIONS, **self.storage_options}
            return zarr.storage.FsspecStore.from_url(self.uri, storage_options=options, read_only=read_only)

    @contextmanager
    def local_copy(self) -> Iterator[str]:
        """A real file path for libraries that need one: the path itself locally, else a temp copy removed after."""
        if not self.is_remote:
            yield self.path
            return
        suffix = posixpath.splitext(self.name)[1]
        handle, tmp = tempfile.mkstemp(prefix="padim-", suffix=suffix)
        os.close(handle)
        try:
            with storage_errors(self):
                self.fs.get_file(self.path, tmp)
            yield tmp
        finally:
            os.unlink(tmp)


# One writer per output.

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


# Publishing a zarr store atomically.


@dataclass(frozen=True)
class StoreKind:
    """What a padim-ray store of one kind looks like, so that --overwrite replaces only a store of that kind."""

    name: str  # in messages: "model", "anomaly-map store"
    group: str  # the zarr group whose root metadata commits the store ("" = the store itself)
    entries: frozenset[str]  # every name the store's folder may hold

    def root(self, store: Location) -> Location:
        """Where the committing group of a store at `store` is."""
        return store / self.group if self.group else store


@dataclass(frozen=True)
class PendingStore:
    """A zarr store being written: arrays go under `staging`; commit_store makes it visible at `target`.

    Locally `staging` is a hidden sibling folder renamed onto `target` at commit. On object storage
    it is `target` itself and the root `zarr.json` is written last. Create each array in its own
    store (`array_store(name)`): zarr writes the root metadata when an array is created through a group.
    """

    target: Location
    staging: Location
    token: str
    overwrite: bool
    kind: StoreKind
    lease: Lease | None  # this run's right to write `target`; None in a copy sent to workers
    resumable: bool = False  # a stopped run's finished work (under `progress`) is kept for a rerun (see begin_store)

    def __reduce__(self):
        # workers get where to write; the lease (an open lock file, a heartbeat thread) stays with the run
        return PendingStore, (self.target, self.staging, self.token, self.overwrite, self.kind, None, self.resumable)

    @property
    def root(self) -> Location:
        """Where the committing group is being written."""
        return self.kind.root(self.staging)

    def array_store(self, name: str, read_only: bool = False) -> zarr.abc.store.Store:
        """A store for one array `name` of the committing group."""
        return (self.root / name).zarr_store(read_only)

    @property
    def progress(self) -> Location:
        """Where a resumable run records the work it has finished (removed at commit)."""
        return self.staging / PROGRESS_FOLDER

def begin_store(target: Location | str | os.PathLike, overwrite: bool, kind: StoreKind, resume: dict | None = None) -> PendingStore:
    """Check `target` before any work and return where to write a store of `kind`.

    An existing output is refused unless `overwrite`, and even then unless it is a complete store of
    the same `kind` (or an empty folder): --overwrite never deletes a user's files. The run takes
    the output's Lease (a second writer is refused); leftovers of a dead run are then removed. On
    object storage, overwriting deletes the old root first, then the rest. With `resume` (this run's
    identity, JSON), the staging store a stopped run of the same identity kept is reused as it is;
    one of another identity is a leftover.
    """
    target = Location(target)
    token = uuid.uuid4().hex
    if target.is_remote:
        lease, kept = _begin_remote(target, token, overwrite, kind, resume)
        staging = target
    else:
        staging, lease, kept = _begin_local(target, token, overwrite, kind, resume)
    if resume is not None and not kept:
        (staging / RESUME_FILE).write_bytes(json.dumps(resume).encode())
    return PendingStore(target, staging, token, overwrite, kind, lease, resume is not None)


def _resumes(staging: Location, resume: dict | None) -> bool:
    """Whether `staging` holds the kept work of a run whose identity is `resume`."""
    file = staging / RESUME_FILE
    if resume is None or not file.is_file():
        return False
    try:
        return json.loads(file.read_bytes()) == json.loads(json.dumps(resume))  # as JSON reads back (tuples are lists)
    except ValueError:  # cut short by a kill
        return False


def holds_progress(pending: PendingStore) -> bool:
    """Whether a resumable run has recorded finished work in its staging store."""
    try:
        return pending.resumable and pending.progress.is_dir() and bool(pending.progress.iterdir())
    except StorageError:
        return False


def is_committed(target: Location | str | os.PathLike, group: str = "") -> bool:
    """Whether a complete store is at `target` (its committing group's root metadata exists)."""
    target = Location(target)
    return ((target / group if group else target) / ROOT_METADATA).exists()


def check_replaceable(target: Location, kind: StoreKind, overwrite: bool) -> None:
    """Refuse an existing `target` unless `overwrite` and it is a complete store of `kind`, or an empty folder."""
    if not overwrite:
        raise StorageError(f"output {target} already exists; pass --overwrite or choose another --out")
    if not _holds_only(target, kind):
        raise _foreign(target, kind)


def _foreign(target: Location, kind: StoreKind) -> StorageError:
    return StorageError(f"{target}: holds files that are not a padim-ray {kind.name}; choose another --out or remove them")


def _holds_only(target: Location, kind: StoreKind) -> bool:
    """Whether `target` is an empty folder, or a complete store of `kind` (its names, a format version)."""
    if not target.is_dir():
        return False
    names = {child.name for child in target.iterdir()} - {WRITING_MARKER}
    if not names:
        return True
    root = kind.root(target) / ROOT_METADATA
    if not names <= kind.entries or not root.is_file():
        return False
    with storage_errors(root):
        metadata = json.loads(root.read_bytes())
    return "format_version" in metadata.get("attributes", {})


def _begin_remote(target: Location, token: str, overwrite: bool, kind: StoreKind, resume: dict | None) -> tuple[Lease, bool]:
    """Claim `target` for this run: its lease, and whether a stopped run's kept work there is reused."""
    if "/" not in target.path:
        raise StorageError(f"{target}: a store needs a path inside the bucket, e.g. {target}/model.zarr")
    root, marker = kind.root(target) / ROOT_METADATA, target / WRITING_MARKER
    with storage_errors(target):
        contents = [p for p in target.fs.find(target.path) if p != marker.path]
    complete = root.exists()
    if complete:
        check_replaceable(target, kind, overwrite)
    elif contents and not marker.exists() and not (target / RESUME_FILE).exists():
        raise _foreign(target, kind)
    lease = Lease(target, "--out", token)  # the marker: also proves, before any work, that the bucket is writable
    try:
        if not complete and _resumes(target, resume):
            return lease, True
        root.remove()  # first, so that readers stop seeing the old store as complete
        with storage_errors(target):
            leftovers = [p for p in target.fs.find(target.path) if p != marker.path]
            if leftovers:
                target.fs.rm(leftovers)
    except BaseException:
        lease.release()
        raise
    return lease, False


def _begin_local(target: Location, token: str, overwrite: bool, kind: StoreKind, resume: dict | None) -> tuple[Location, Lease, bool]:
    """The staging folder for `target`, this run's lease, and whether the folder is a stopped run's kept one (reused)."""
    if os.path.lexists(target.path):
        check_replaceable(target, kind, overwrite)
    make_parent_folders(target)
    parent = target.parent
    lease = Lease(target, "--out", token)
    pattern = posixpath.join(parent.path, f".{target.name}.partial-*")
    kept = next((s for s in map(Location, sorted(parent.fs.glob(pattern))) if _resumes(s, resume)), None)
    remove_staging_leftovers(parent, target.name, keep=kept)  # a dead run's: we hold the lease
    if kept:
        return kept, lease, True
    staging = parent / f".{target.name}.partial-{token[:8]}"
    try:
        os.mkdir(staging.path)
    except OSError as err:
        lease.release()
        raise StorageError(f"output folder {parent} is not writable ({err.strerror}); choose another --out") from None
    return staging, lease, False


def make_parent_folders(target: Location | str | os.PathLike, option: str = "--out") -> None:
    """Create the missing folders above a local `target` (as `mkdir -p` does), logging the one made,
    and refuse a parent that cannot be a writable folder: called before any cluster work.

    Object storage has no folders: nothing to create or check there (the bucket is checked on first write).
    """
    target = Location(target)
    if target.is_remote:
        return
    parent = target.parent.path
    existed = os.path.isdir(parent)
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in _ancestors(parent) if os.path.exists(p) and not os.path.isdir(p))
        where = "is a file" if blocker == parent else f"cannot be created: {blocker} is a file"
        raise StorageError(f"output folder {parent} {where}; choose another {option}") from None
    except OSError as err:
        raise StorageError(f"output folder {parent} cannot be created ({err.strerror}); choose another {option}") from None
    if not existed:
        log.info("created folder %s for %s", parent, option)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StorageError(f"output folder {parent} is not writable; choose another {option}")


def _ancestors(path: str) -> list[str]:
    """`path` and the folders above it, outermost first."""
    chain = [path]
    while os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    return chain[::-1]


def remove_staging_leftovers(parent: Location, name: str, keep: Location | None = None) -> None:
    """Remove the hidden `.NAME.partial-*` / `.NAME.old-*` folders of a local run killed before cleaning up
    (but `keep`, a staging folder being resumed)."""
    for pattern in (f".{name}.partial-*", f".{name}.old-*"):
        for leftover in parent.fs.glob(posixpath.join(parent.path, pattern)):
            if keep is None or Location(leftover) != keep:
                shutil.rmtree(leftover, ignore_errors=True)


def commit_store(pending: PendingStore, attributes: dict) -> None:
    """Write the root group metadata (with `attributes`) last, making the store visible at its target."""
    target = pending.target
    with storage_errors(target):
        if target.is_remote:
            if not pending.lease.holds():
                raise StorageError(f"{target}: another run took over this store while it was written; rerun one at a time")
            _drop_progress(pending)
            _write_root(pending.root, attributes)
            pending.lease.release()
            return
        _drop_progress(pending)
        _write_root(pending.root, attributes)
        if os.path.lexists(target.path):
            check_replaceable(target, pending.kind, pending.overwrite)  # it appeared while the store was written
            trash = target.parent / f".{target.name}.old-{pending.token[:8]}"
            os.replace(target.path, trash.path)
            os.replace(pending.staging.path, target.path)
            shutil.rmtree(trash.path, ignore_errors=True)
        else:
            os.replace(pending.staging.path, target.path)
        pending.lease.release()


def _drop_progress(pending: PendingStore) -> None:
    """Remove a resumable run's bookkeeping: its finished work is in the store by now."""
    if pending.resumable:
        pending.progress.remove_tree()
        (pending.staging / RESUME_FILE).remove()


def _write_root(where: Location, attributes: dict) -> None:
    """One write of the root zarr.json (arrays are created in stores of their own, so none exists yet)."""
    zarr.create_group(where.zarr_store(read_only=False), attributes=attributes, zarr_format=3, overwrite=False)


def abort_store(pending: PendingStore) -> None:
    """Best effort: remove what a failed write left (never a committed store, nor another run's), and release the lease."""
    try:
        if not pending.target.is_remote:
            pending.staging.remove_tree()
        elif pending.lease.holds() and not (pending.root / ROOT_METADATA).exists():
            pending.target.remove_tree()
    except StorageError:
        pass
    finally:
        pending.lease.release()


@contextmanager
def staged_store(
    target: Location | str | os.PathLike, overwrite: bool, kind: StoreKind, resume: dict | None = None
) -> Iterator[PendingStore]:
    """begin_store, and abort_store after the block (a no-op once the block has called commit_store),
    unless a resumable run stopped with finished work: that staging store is kept for its rerun."""
    pending = begin_store(target, overwrite, kind, resume)
    try:
        yield pending
    finally:
        if holds_progress(pending):
            pending.lease.release()
        else:
            abort_store(pending)
