"""The storage layer against a real S3 protocol server (moto, in-process) and the local filesystem."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from padim_ray import leases
from padim_ray.stc import LayoutError, scene_videos
from padim_ray.files import Location, StorageError, storage_errors
from padim_ray.leases import WRITING_MARKER
from padim_ray.publish import abort_store, begin_store, commit_store, staged_store
from padim_ray.store import MODEL_STORE
from padim_ray.video import expand_inputs, index_video, iter_unit_frames, make_units
from helpers import BUCKET, set_moto_auth

def tiny_video(frames: int = 8, size: int = 64) -> bytes:
    """An MPEG-4 video in memory whose frame i is the flat grey level 30 * i."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 30 * i, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


# Parsing: no I/O.


def test_uris_are_normalised_and_joined():
    assert Location("s3://bkt//a/b/").uri == "s3://bkt/a/b"
    assert Location("gcs://bkt/a").uri == "gs://bkt/a"
    key = Location("s3://bkt/a") / "b/c.mp4"
    assert (key.uri, key.path, key.name, key.bucket, key.is_remote) == ("s3://bkt/a/b/c.mp4", "bkt/a/b/c.mp4", "c.mp4", "bkt", True)
    assert key.parent.uri == "s3://bkt/a/b"
    assert Location("s3://bkt").parent.uri == "s3://bkt"
    assert Location("gs://bkt/x").protocol == "gs"


def test_file_uris_and_local_paths_are_the_same_place(tmp_path):
    assert Location(f"file://{tmp_path}/a") == Location(tmp_path / "a") == Location(str(tmp_path / "a"))
    local = Location(f"file://{tmp_path}") / "a"
    assert (local.uri, local.path, local.is_remote, local.protocol) == (str(tmp_path / "a"), str(tmp_path / "a"), False, "file")


@pytest.mark.parametrize("bad, message", [
    ("http://host/x", "http://host/x: unsupported scheme http://; use a local path or an s3://, gs:// or file:// URI"),
    ("s3://", "s3://: no bucket in the URI; write s3://BUCKET/PATH"),
])
def test_bad_uris_are_refused_in_one_line(bad, message):
    with pytest.raises(StorageError) as err:
        Location(bad)
    assert str(err.value) == message


# Bytes and listings, locally (plain path and file:// alike) and on S3.


@pytest.mark.parametrize("kind", ["path", "file-uri", "s3"])
def test_round_trip_and_listing(kind, tmp_path, request):
    if kind == "s3":
        root = request.getfixturevalue("prefix")
    else:
        root = Location(str(tmp_path / "root") if kind == "path" else f"file://{tmp_path}/root")
    (root / "b" / "deep.bin").write_bytes(b"deep")  # parents appear as needed, locally too
    (root / "a.bin").write_bytes(b"hello")
    (root / "a.bin2").write_bytes(b"sibling")
    assert (root / "a.bin").read_bytes() == b"hello"
    with (root / "a.bin").open("rb") as f:
        assert f.read() == b"hello"
    assert [child.name for child in root.iterdir()] == ["a.bin", "a.bin2", "b"]
    assert all(child.is_remote == (kind == "s3") for child in root.iterdir())
    assert (root / "b").is_dir() and not (root / "b").is_file()
    assert (root / "a.bin").is_file() and (root / "a.bin").exists()
    assert not (root / "missing").exists()
    with pytest.raises(StorageError) as err:
        (root / "missing").read_bytes()
    assert str(err.value) == f"{root / 'missing'}: not found; check the URI"
    (root / "a.bin").remove_tree()  # a prefix of a sibling's name: the sibling stays
    assert [child.name for child in root.iterdir()] == ["a.bin2", "b"]
    root.remove_tree()
    assert not root.exists()
    root.remove_tree()  # already gone: fine


def test_a_bucket_is_never_removed_whole(s3):
    with pytest.raises(StorageError, match="refusing to remove a whole bucket"):
        Location(f"s3://{BUCKET}").remove_tree()


def test_pyarrow_reads_and_writes_through_fs(where):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"frame": [0, 1, 2], "score": [0.5, 1.5, 2.5]})
    target = where / "scores.parquet"
    pq.write_table(table, target.path, filesystem=target.fs)
    assert pq.read_table(target.path, filesystem=target.fs).equals(table)


# zarr v3 through zarr_store.


def test_zarr_array_round_trip(where):
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    array = zarr.create_array((where / "arr").zarr_store(read_only=False), shape=values.shape, chunks=(2, 6), dtype="float32")
    array[:] = values
    read = zarr.open_array((where / "arr").zarr_store(read_only=True), mode="r")
    np.testing.assert_array_equal(read[:], values)
    with pytest.raises(ValueError, match="read-only"):
        read[0] = 1


# Publishing a store: root zarr.json last on object storage, a rename locally.


def open_root(target: Location) -> zarr.Group:
    return zarr.open_group(target.zarr_store(read_only=True), mode="r", zarr_format=3)


def write_array(pending, name: str, values: np.ndarray) -> None:
    array = zarr.create_array(pending.array_store(name), shape=values.shape, chunks=values.shape, dtype=values.dtype)
    array[:] = values


def test_publish_protocol(where):
    target = where / "model.zarr"
    pending = begin_store(target, overwrite=False, kind=MODEL_STORE)
    write_array(pending, "mean", np.ones(3))
    with pytest.raises((zarr.errors.GroupNotFoundError, FileNotFoundError)):
        open_root(target)  # arrays written, root not yet: no group
    commit_store(pending, {"format_version": 1, "eps": 0.01})
    group = open_root(target)
    assert dict(group.attrs) == {"format_version": 1, "eps": 0.01}
    assert sorted(group.array_keys()) == ["mean"]
    np.testing.assert_array_equal(group["mean"][:], np.ones(3))
    assert not (target / WRITING_MARKER).exists()

    with pytest.raises(StorageError) as err:
        begin_store(target, overwrite=False, kind=MODEL_STORE)
    assert str(err.value) == f"output {target} already exists; pass --overwrite or choose another --out"

    pending = begin_store(target, overwrite=True, kind=MODEL_STORE)
    if target.is_remote:  # no rename on object storage: the old root goes first, then its arrays
        with pytest.raises(zarr.errors.GroupNotFoundError):
            open_root(target)
        assert [child.name for child in target.iterdir()] == [WRITING_MARKER]
    write_array(pending, "precision", np.zeros(2, np.float32))
    commit_store(pending, {"format_version": 2})
    group = open_root(target)
    assert dict(group.attrs) == {"format_version": 2}
    assert sorted(group.array_keys()) == ["precision"]
    assert [child.name for child in target.parent.iterdir()] == ["model.zarr"]  # no staging or trash left


CRASHING_WRITER = """
import os, signal, sys
import numpy as np, zarr
from padim_ray.publish import begin_store
from padim_ray.store import MODEL_STORE
pending = begin_store(sys.argv[1], overwrite=False, kind=MODEL_STORE)
zarr.create_array(pending.array_store("orphan"), shape=(2,), dtype="f8", zarr_format=3)[:] = np.ones(2)
os.kill(os.getpid(), signal.SIGKILL)  # before commit_store, holding the lease
"""


def test_leftovers_of_a_failed_run_are_removed(where, caplog):
    target = where / "model.zarr"
    crashed = subprocess.run([sys.executable, "-c", CRASHING_WRITER, target.uri], capture_output=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()
    pending = begin_store(target, overwrite=False, kind=MODEL_STORE)  # its lease is a dead process's: taken over
    assert "taking over the lease of pid" in caplog.text
    write_array(pending, "mean", np.ones(2))
    commit_store(pending, {"ok": True})
    assert sorted(open_root(target).array_keys()) == ["mean"]
    assert [child.name for child in target.parent.iterdir()] == ["model.zarr"]


def test_staged_store_aborts_on_error(where):
    target = where / "model.zarr"
    with pytest.raises(RuntimeError):
        with staged_store(target, overwrite=False, kind=MODEL_STORE) as pending:
            write_array(pending, "mean", np.ones(2))
            raise RuntimeError("fit failed")
    assert not target.exists()
    assert not where.exists() or [child.name for child in where.iterdir()] == []
    with staged_store(target, overwrite=False, kind=MODEL_STORE) as pending:
        write_array(pending, "mean", np.ones(2))
        commit_store(pending, {"ok": True})
    assert dict(open_root(target).attrs) == {"ok": True}


def test_a_prefix_with_foreign_files_is_never_cleared(prefix):
    (prefix / "videos" / "clip.mp4").write_bytes(b"not a store")
    with pytest.raises(StorageError) as err:
        begin_store(prefix, overwrite=True, kind=MODEL_STORE)
    assert str(err.value) == f"{prefix}: holds files that are not a padim-ray model; choose another --out or remove them"
    assert (prefix / "videos" / "clip.mp4").read_bytes() == b"not a store"


def test_a_run_that_was_taken_over_cannot_commit(prefix, monkeypatch):
    target = prefix / "model.zarr"
    first = begin_store(target, overwrite=False, kind=MODEL_STORE)
    monkeypatch.setattr(leases, "LEASE_STALE", 0.0)  # the first run's heartbeat is late: it counts as dead
    second = begin_store(target, overwrite=False, kind=MODEL_STORE)
    monkeypatch.undo()
    with pytest.raises(StorageError, match="another run took over"):
        commit_store(first, {"run": 1})
    abort_store(first)  # not its store any more: leaves the second run's files alone
    write_array(second, "mean", np.ones(2))
    commit_store(second, {"run": 2})
    assert dict(open_root(target).attrs) == {"run": 2}


def test_a_second_writer_is_refused_until_the_first_is_done(where):
    target = where / "model.zarr"
    first = begin_store(target, overwrite=False, kind=MODEL_STORE)
    write_array(first, "mean", np.ones(2))
    lock = target / WRITING_MARKER if target.is_remote else where / ".model.zarr.lock"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first.lease.holder.started))
    for _ in range(2):  # nothing of the first run's is touched by a refused one
        with pytest.raises(StorageError) as err:
            begin_store(target, overwrite=True, kind=MODEL_STORE)
        assert str(err.value) == (
            f"--out {target} is being written by pid {os.getpid()} on host {socket.gethostname()} since {since}; "
            f"wait for it, or remove {lock} if that run is dead"
        )
    commit_store(first, {"format_version": 1, "run": 1})
    assert [child.name for child in where.iterdir()] == ["model.zarr"]  # lock file or marker gone
    second = begin_store(target, overwrite=True, kind=MODEL_STORE)
    write_array(second, "mean", np.zeros(2))
    commit_store(second, {"run": 2})
    assert dict(open_root(target).attrs) == {"run": 2}


def test_a_stale_lease_is_taken_over(where, caplog):
    """A lock file naming a dead pid of this host (locally), a marker whose heartbeat stopped (on a bucket)."""
    target = where / "model.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"token": "0" * 32, "host": socket.gethostname(), "pid": int(dead.stdout), "started": 0.0, "heartbeat": 0.0}
    if target.is_remote:
        holder.update(host="another-host", heartbeat=time.time() - leases.LEASE_STALE - 1)
    (target / WRITING_MARKER if target.is_remote else where / ".model.zarr.lock").write_bytes(json.dumps(holder).encode())
    pending = begin_store(target, overwrite=False, kind=MODEL_STORE)
    assert f"taking over the lease of pid {holder['pid']} on host {holder['host']}" in caplog.text
    write_array(pending, "mean", np.ones(2))
    commit_store(pending, {"ok": True})
    assert [child.name for child in where.iterdir()] == ["model.zarr"]


# Videos from a bucket, one at a time.


def test_a_video_in_the_bucket_is_indexed_and_decoded_from_a_file_object(prefix):
    import av

    video = prefix / "clips" / "01.mp4"
    video.write_bytes(tiny_video())
    assert index_video(video)[:3] == (8, 64, 64)  # counted from its packets, streamed with ranged reads
    with video.open("rb") as f, av.open(f) as container:
        levels = [frame.to_ndarray(format="rgb24").mean() for frame in container.decode(video=0)]
    assert len(levels) == 8 and abs(levels[5] - 150) < 3
    with video.local_copy() as path:  # for libraries that need a real path
        assert index_video(path)[:3] == (8, 64, 64)
        copy = path
    assert not os.path.exists(copy)


# Error lines.


def test_missing_bucket(s3):
    missing = Location("s3://no-such-bucket-padim/x.bin")
    expected = "s3://no-such-bucket-padim/x.bin: bucket does not exist; create it or fix the URI"
    for action in (missing.read_bytes, lambda: missing.write_bytes(b"1"), missing.iterdir):
        with pytest.raises(StorageError) as err:
            action()
        assert str(err.value) == expected
    with pytest.raises(StorageError) as err:
        begin_store("s3://no-such-bucket-padim/model.zarr", overwrite=False, kind=MODEL_STORE)
    assert str(err.value) == "s3://no-such-bucket-padim/model.zarr: bucket does not exist; create it or fix the URI"


def test_missing_key(prefix):
    with pytest.raises(StorageError) as err:
        (prefix / "nothing.mp4").open("rb")
    assert str(err.value) == f"{prefix}/nothing.mp4: not found; check the URI"


def test_denied_access(s3, prefix):
    """An IAM user without policies, with moto checking every request (its IAM mode)."""
    import boto3

    (prefix / "secret.bin").write_bytes(b"x")
    iam = boto3.client("iam")
    user = f"nobody-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    options = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    denied = "access denied; check the credentials (AWS_* variables, instance profile) for this bucket"
    set_moto_auth(s3, "0")
    try:
        for action in ("read_bytes", "exists", "iterdir"):
            target = Location(prefix / "secret.bin", options) if action != "iterdir" else Location(prefix, options)
            with pytest.raises(StorageError) as err:
                getattr(target, action)()
            assert str(err.value) == f"{target}: {denied}"
        with pytest.raises(StorageError) as err:
            Location(prefix / "new.bin", options).write_bytes(b"y")
        assert str(err.value) == f"{prefix}/new.bin: {denied}"
    finally:
        set_moto_auth(s3, "inf")
    assert (prefix / "secret.bin").read_bytes() == b"x"


def test_unreachable_endpoint(s3):
    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(StorageError) as err:
        Location(f"s3://{BUCKET}/x.bin", options).read_bytes()
    assert str(err.value).startswith(f"s3://{BUCKET}/x.bin: cannot reach the storage service (")
    assert str(err.value).endswith("); check AWS_ENDPOINT_URL and the network")


def test_storage_errors_leave_other_errors_alone(tmp_path):
    with pytest.raises(KeyError):
        with storage_errors(tmp_path):
            raise KeyError("not storage")
    with pytest.raises(StorageError, match="permission denied"):
        with storage_errors(tmp_path):
            raise PermissionError(13, "Permission denied")


def upload(local: Path, remote: Location) -> None:
    """Copy a local folder tree into the bucket, file by file."""
    for file in sorted(local.rglob("*")):
        if file.is_file():
            (remote / str(file.relative_to(local))).write_bytes(file.read_bytes())


def test_stc_videos_and_frame_folders_decode_from_the_bucket_as_from_disk(stc_root, prefix):
    """What decode tasks read: an STC scene's videos and a clip's frame folder, from s3:// and locally."""
    upload(stc_root / "training" / "videos", prefix / "training" / "videos")
    upload(stc_root / "testing" / "frames" / "01_0001", prefix / "clip")
    remote_videos, local_videos = scene_videos(prefix, "01"), scene_videos(stc_root, "01")
    assert [v.uri for v in remote_videos] == [f"{prefix.uri}/training/videos/01_00{i}.avi" for i in (1, 2)]
    remote_units, remote_estimate = make_units(expand_inputs([*remote_videos, prefix / "clip"]))
    local_units, local_estimate = make_units(expand_inputs([*local_videos, stc_root / "testing" / "frames" / "01_0001"]))
    assert remote_estimate == local_estimate == 60 + 12
    for remote, local in zip(remote_units, local_units):
        assert (remote.frames, remote.height, remote.width) == (local.frames, local.height, local.width)
        remote_frames = list(iter_unit_frames(remote, size=32))
        local_frames = list(iter_unit_frames(local, size=32))
        assert [i for i, _ in remote_frames] == [i for i, _ in local_frames] and len(local_frames) in (30, 12)
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(remote_frames, local_frames))
    with pytest.raises(LayoutError, match=f"no training videos for scene 05 in {prefix.uri}/training/videos"):
        scene_videos(prefix, "05")
