"""The Ray Data source of frames: one decode task per work unit, blocks of resized frames out.

A decode task reads one unit sequentially and marks the unit's last row with the number of frames it
produced (`unit_total`, NOT_LAST on every other row), so consumers can prove every frame was used
exactly once.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from padim_ray.video import BAD_UNIT, NOT_LAST, InputPolicy, VideoError, WorkUnit, iter_unit_frames


def frames_dataset(
    units: list[WorkUnit], size: int, stride: int, decode_batch: int, skip: dict | None = None,
    input_policy: InputPolicy = InputPolicy(), credits=None,
):
    """A Ray Dataset of resized frames: one decode task per work unit, on any node's CPUs.

    Blocks hold up to `decode_batch` frames; `skip` maps unit ids to frame indices to leave out;
    `input_policy` says whether units that fail to decode are marked instead of failing; `credits`
    bounds the frames decoded ahead of the consumers (see decode_units).
    Each block the decoder yields stays one block: Ray Data would otherwise coalesce them into
    128 MiB blocks (~650 frames at 256x256), which move and are freed only as a whole.
    """
    import ray

    items = [{"uid": u.uid, "path": u.path, "start": u.start, "stop": -1 if u.stop is None else u.stop} for u in units]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        decode_units,
        batch_size=1,
        fn_kwargs={
            "size": size, "stride": stride, "decode_batch": decode_batch, "skip": skip, "input_policy": input_policy, "credits": credits,
        },
    )
    # a full block is emitted as soon as it is yielded, and only blocks over 1.5x the target are cut
    dataset.context.target_max_block_size = decode_batch * size * size * 3 * 3 // 4
    return dataset


def decode_units(
    batch: dict, size: int, stride: int, decode_batch: int, skip: dict | None = None, input_policy: InputPolicy = InputPolicy(),
    credits=None,
) -> Iterator[dict]:
    """Ray Data map_batches generator: work units in, blocks of resized frames out.

    Each output row has `frame` (size, size, 3) uint8, `unit`, `index` (frame number within the
    input) and `unit_total`, which is NOT_LAST except on a unit's last row, where it is the number of
    frames the unit produced. Blocks hold up to `decode_batch` frames. Frames whose index is in
    `skip[unit id]` (done before: a resumed or recovered fit) are decoded but not emitted. With
    `input_policy.skip_bad`, a unit that fails to decode ends with one row whose `unit_total` is
    BAD_UNIT instead of raising (rows emitted before the failure must then be discarded by the
    consumer's caller).
    With `credits` (a streaming.FrameCredits actor), each block waits for credit for its rows first.
    """
    for block in _decode_blocks(batch, size, stride, decode_batch, skip, input_policy):
        if credits is not None:
            import ray

            ray.get(credits.take.remote(len(block["unit"])))
        yield block


def _decode_blocks(batch: dict, size: int, stride: int, decode_batch: int, skip: dict | None, input_policy: InputPolicy) -> Iterator[dict]:
    for uid, path, start, stop in zip(batch["uid"], batch["path"], batch["start"], batch["stop"]):
        unit = WorkUnit(int(uid), str(path), int(start), None if stop < 0 else int(stop))
        done = set(skip[unit.uid].tolist()) if skip and unit.uid in skip else set()
        try:
            yield from _decode_unit(unit, size, stride, decode_batch, done)
        except VideoError:
            if not input_policy.skip_bad:
                raise
            marker = _block(unit, [-1], [np.zeros((size, size, 3), dtype=np.uint8)])
            marker["unit_total"][:] = BAD_UNIT
            yield marker


def _decode_unit(unit: WorkUnit, size: int, stride: int, decode_batch: int, done: set[int]) -> Iterator[dict]:
    pending: dict | None = None
    produced = 0
    last_emitted = False  # whether the unit's last frame is in `pending`
    indices: list[int] = []
    frames: list[np.ndarray] = []
    for index, frame in iter_unit_frames(unit, stride, size):
        produced += 1
        last_emitted = index not in done
        if last_emitted:
            indices.append(index)
            frames.append(frame)
        if len(frames) == decode_batch:
            if pending is not None:
                yield pending
            pending = _block(unit, indices, frames)
            indices, frames = [], []
    if frames:
        if pending is not None:
            yield pending
        pending = _block(unit, indices, frames)
    if produced == 0:
        raise VideoError(f"input {unit.path} has no frames; remove it from the inputs")
    if pending is not None:
        if last_emitted:
            pending["unit_total"][-1] = produced
        yield pending


def _block(unit: WorkUnit, indices: list[int], frames: list[np.ndarray]) -> dict:
    return {
        "frame": np.stack(frames),  # (n, S, S, 3) uint8
        "unit": np.full(len(frames), unit.uid, dtype=np.int64),
        "index": np.asarray(indices, dtype=np.int64),
        "unit_total": np.full(len(frames), NOT_LAST, dtype=np.int64),
    }
