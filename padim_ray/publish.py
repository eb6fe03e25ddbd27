"""Publishing a zarr store atomically: staged where readers do not look, made visible in one step.

Locally a store is written into a hidden sibling folder and renamed onto its target. Object stores
have no rename, so a store there is published by writing its root `zarr.json` last (`begin_store` /
`commit_store`): readers see either no group or a complete one.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import zarr

from padim_ray.files import Location, StorageError, make_parent_folders, storage_errors
from padim_ray.leases import WRITING_MARKER, Lease

ROOT_METADATA = "zarr.json"
RESUME_FILE = ".padim-resume.json"  # identity of a resumable run, in its staging store (see begin_store)
PROGRESS_FOLDER = ".padim-progress"  # the finished work a resumable run keeps in its staging store if it stops


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
