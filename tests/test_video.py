"""Decoding real video files (written with PyAV) and frame folders; the Ray Data source."""

from __future__ import annotations

import numpy as np
import pytest

from padim_ray.frames import decode_units, frames_dataset
from padim_ray.video import NOT_LAST, VideoError, WorkUnit, expand_inputs, index_video, iter_unit_frames, make_units


def test_decodes_every_frame_in_order(stc_root):
    video = stc_root / "training" / "videos" / "01_001.avi"
    frames = list(iter_unit_frames(WorkUnit(0, str(video))))
    assert [i for i, _ in frames] == list(range(30))
    assert frames[0][1].shape == (180, 320, 3) and frames[0][1].dtype == np.uint8
    assert [i for i, _ in iter_unit_frames(WorkUnit(0, str(video)), stride=7)] == [0, 7, 14, 21, 28]


@pytest.mark.parametrize("size", [16, 48, 64])
def test_frames_resized_while_decoding_are_the_resized_picture(stc_root, size):
    """At every size the frames are the resized picture (decord, which decoded them before PyAV, padded the rows of 48 px)."""
    from PIL import Image

    unit = WorkUnit(0, str(stc_root / "training" / "videos" / "01_001.avi"))
    (_, native), (_, resized) = next(iter_unit_frames(unit)), next(iter_unit_frames(unit, size=size))
    reference = np.asarray(Image.fromarray(native).resize((size, size), Image.BILINEAR), dtype=float)
    assert resized.shape == (size, size, 3)
    assert np.abs(resized - reference).mean() < 6  # another filter than Pillow's; one pixel off is 8-13, BGR 14-16


def test_videos_decode_to_decords_picture(stc_root):
    """Videos are decoded with PyAV (decord, which decoded them before and feeds anomalib, reads ahead
    without bound); the pixels are decord's up to the scaler's rounding."""
    import decord

    video = stc_root / "training" / "videos" / "01_001.avi"
    reader = decord.VideoReader(str(video), ctx=decord.cpu(0), num_threads=1, width=64, height=64)
    expected = np.stack([reader.next().asnumpy() for _ in range(len(reader))]).astype(int)
    decoded = np.stack([frame for _, frame in iter_unit_frames(WorkUnit(0, str(video)), size=64)])
    assert decoded.shape == expected.shape == (30, 64, 64, 3)
    difference = np.abs(decoded - expected)
    assert difference.mean() < 1 and difference.max() <= 16  # one pixel off or BGR: 8-16 on average


@pytest.mark.parametrize("name, codec", [("clip.mkv", "libx264"), ("clip.mpg", "mpeg2video")])
def test_videos_whose_header_declares_no_frame_count_are_counted(tmp_path, name, codec):
    import av

    path = tmp_path / name
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(11):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((64, 96, 3), 20 * i, np.uint8), format="rgb24")))
        out.mux(stream.encode())
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # the header declares nothing
    assert index_video(path) == (11, 64, 96, 25.0)  # frames counted, and the rate it was written at
    units, estimate = make_units([path])
    assert estimate == units[0].frames == len(list(iter_unit_frames(units[0]))) == 11


def test_a_file_without_a_video_stream_is_refused(tmp_path):
    import av

    path = tmp_path / "sound.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with pytest.raises(VideoError, match=f"input {path} has no video stream"):
        make_units([path])


def test_decode_blocks_mark_the_last_row_with_the_unit_total(stc_root):
    video = stc_root / "training" / "videos" / "01_002.avi"
    batch = {"uid": np.array([5]), "path": np.array([str(video)]), "start": np.array([0]), "stop": np.array([-1])}
    blocks = list(decode_units(batch, size=32, stride=1, decode_batch=8))
    assert [len(b["unit"]) for b in blocks] == [8, 8, 8, 6]
    totals = np.concatenate([b["unit_total"] for b in blocks])
    assert (totals[:-1] == NOT_LAST).all() and totals[-1] == 30
    assert blocks[0]["frame"].shape == (8, 32, 32, 3)
    assert np.concatenate([b["index"] for b in blocks]).tolist() == list(range(30))


def test_frame_folders_are_split_into_units(stc_root):
    clip = stc_root / "testing" / "frames" / "01_0001"
    units, estimate = make_units(expand_inputs([clip, stc_root / "training" / "videos"]))
    assert estimate == 12 + 60
    assert [u.path for u in units] == [str(clip)] + [str(stc_root / "training" / "videos" / f"01_00{i}.avi") for i in (1, 2)]
    frames = list(iter_unit_frames(units[0], stride=5))
    assert [i for i, _ in frames] == [0, 5, 10]


def test_ray_dataset_yields_every_frame_once(ray_local, stc_root):
    units, _ = make_units(expand_inputs([stc_root / "training" / "videos"]))
    rows = frames_dataset(units, size=16, stride=1, decode_batch=7).take_all()
    assert len(rows) == 60
    assert sorted((r["unit"], r["index"]) for r in rows) == [(u, i) for u in (0, 1) for i in range(30)]


def test_decoding_waits_for_frame_credits(ray_local, stc_root):
    """A decode task emits a block only with credit for it: the frames decoded ahead of the consumers stay bounded."""
    import threading
    import time

    import ray

    from padim_ray.streaming import FrameCredits

    units, _ = make_units(expand_inputs([stc_root / "training" / "videos" / "01_001.avi"]))
    credits = FrameCredits.remote(20)
    dataset = frames_dataset(units, size=32, stride=1, decode_batch=8, credits=credits)
    received = []
    reader = threading.Thread(target=lambda: received.extend(len(b["unit"]) for b in dataset.iter_batches(batch_size=None)))
    reader.start()

    def settled() -> int:
        """Rows received once nothing more arrives for 3 s (a decode task that did not wait would send all 30)."""
        deadline, seen = time.monotonic() + 60, -1
        while (sum(received) != seen or not seen) and time.monotonic() < deadline:
            seen = sum(received)
            time.sleep(3)
        return seen

    assert 0 < settled() <= 24  # credit 20, blocks of 8: the third block overdraws it, the fourth waits
    ray.get(credits.give.remote(24))
    reader.join(timeout=60)
    assert received == [8, 8, 8, 6]


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(VideoError, match=f"input {tmp_path / 'missing.avi'} does not exist"):
        expand_inputs([tmp_path / "missing.avi"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(VideoError, match="is not a video"):
        expand_inputs([tmp_path / "notes.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match=f"folder {tmp_path / 'empty'} holds neither frames nor videos"):
        expand_inputs([tmp_path / "empty"])


def test_frames_of_one_folder_must_share_a_size(tmp_path):
    from PIL import Image

    folder = tmp_path / "clip"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(folder / "0.png")
    Image.fromarray(np.zeros((24, 30, 3), dtype=np.uint8)).save(folder / "1.png")
    units, _ = make_units([folder])
    with pytest.raises(VideoError, match=r"1.png is 30x24, the first frame of its folder is 30x20"):
        list(iter_unit_frames(units[0], size=16))


def _png_declaring(path, width: int, height: int) -> None:
    """A real 4x4 PNG whose header (IHDR, with a valid CRC) declares width x height: a decompression bomb's shape."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after the signature, length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("width, height, message", [
    (9000, 9000, "declares 9000x9000 frames, beyond 1x1 to 8192x8192"),  # under Pillow's own limit: ours refuses it
    (100_000, 100_000, "exceeds limit of 178956970 pixels"),  # Pillow's own DecompressionBombError, as one line
])
def test_an_oversized_frame_is_a_bad_input_named_by_file(tmp_path, width, height, message):
    from PIL import Image

    bomb, clip = tmp_path / "bomb", tmp_path / "clip"
    for folder in (bomb, clip):
        folder.mkdir()
        Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(folder / "1.png")
    _png_declaring(bomb / "0.png", width, height)  # the first frame: checked before any cluster work
    _png_declaring(clip / "2.png", width, height)  # a later one: refused while decoding, before its pixels
    with pytest.raises(VideoError, match=f"frame {bomb / '0.png'} .*{message}"):
        make_units([bomb])
    bad = []
    units, _ = make_units([bomb, clip], bad=bad)  # --skip-bad-inputs
    assert [path for path, _ in bad] == [str(bomb)] and {u.path for u in units} == {str(clip)}
    with pytest.raises(VideoError, match=f"frame {clip / '2.png'} .*{message}"):
        list(iter_unit_frames(units[0], size=16))
