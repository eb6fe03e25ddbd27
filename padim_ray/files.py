"""Where bytes live: one layer for local paths and s3://, gs://, file:// URIs, and one-line storage errors.

Built on fsspec. s3fs and gcsfs follow their ecosystems' credential conventions: the standard AWS_*
variables (AWS_ENDPOINT_URL for S3-compatible servers such as MinIO or Ceph, read by botocore),
config files and instance profiles for S3; Google application default credentials for GCS.
zarr v3 reads and writes through `Location.zarr_store`, pyarrow through `Location.fs` and `.path`.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import zarr

from padim_ray.errors import PadimError, first_line

log = logging.getLogger(__name__)

SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs", "file": "file"}  # accepted URI schemes -> fsspec protocol
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


def replace_file(file: Location, data: bytes) -> None:
    """Write `file` in one step: a rename locally (a killed writer leaves no half file), one upload on object storage."""
    if file.is_remote:
        file.write_bytes(data)
        return
    temporary = file.parent / f".{file.name}.{os.getpid()}.tmp"
    temporary.write_bytes(data)
    temporary.move_to(file)
