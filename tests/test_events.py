"""Events: the rule on a hand-made score sequence, the frame-level form against the causal tracker, regions tracked apart."""

import numpy as np
import pytest

from padim_ray.events import Event, Notice, RegionTracker, Span, frame_events, map_events
from padim_ray.thresholds import EventConfig

# fps 10: min_frames = 3 (0.3 s), merge_frames = 3 (0.3 s); threshold 10: on = 10, off = 5
FPS, T = 10.0, 10.0
RULES = EventConfig(hysteresis=0.5, min_event=0.3, event_gap=0.3)

SCORES = [
    0, 0,
    10, 6, 3, 4, 7, 12, 1, 1, 1,  # A, 2-7: starts on; 6 is between off and on; a 2-frame dip merges (7 >= off continues); 3 frames < off end it
    9, 11, 0, 0, 0,  # B: 9 is >= off but starts nothing; starts at 11 (frame 12) and is 1 frame long: no event
    10, 5, 10, 0, 0, 0,  # C, 16-18: 5 == off continues; exactly min_frames long
    20, 8, 2, 6,  # D, 22-25: the end of the input closes it at its last frame >= off
]


def _one_pixel(scores):
    return [(index, np.array([[value]], dtype=np.float32)) for index, value in enumerate(scores)]


def _event(event, start, end, peak_frame, peak_score, fps=FPS):
    return Event(event, start, end, peak_frame, peak_score, 0, 0, 0, 0, 1, 1, start / fps, end / fps)


def test_frame_events_of_a_hand_made_sequence():
    assert frame_events(np.array(SCORES, dtype=np.float32), FPS, T, RULES) == [Span(2, 7, 7, 12.0), Span(16, 18, 16, 10.0), Span(22, 25, 22, 20.0)]


def test_tracker_notices_come_at_the_frames_the_rule_decides():
    tracker = RegionTracker(FPS, T, RULES)
    notices = {index: tracker.step(index, anomaly_map) for index, anomaly_map in _one_pixel(SCORES)}
    notices = {index: found for index, found in notices.items() if found}
    assert notices == {
        6: [Notice("opened", _event(0, 2, 6, 2, 10.0))],  # 3 frames long counting frame 6 (4 and 5 are < off)
        7: [Notice("updated", _event(0, 2, 7, 7, 12.0))],
        10: [Notice("closed", _event(0, 2, 7, 7, 12.0))],  # the third frame < off
        18: [Notice("opened", _event(1, 16, 18, 16, 10.0))],
        21: [Notice("closed", _event(1, 16, 18, 16, 10.0))],
        25: [Notice("opened", _event(2, 22, 25, 22, 20.0))],
    }
    assert tracker.finish() == [Notice("closed", _event(2, 22, 25, 22, 20.0))]
    assert map_events(_one_pixel(SCORES), FPS, T, RULES) == [_event(0, 2, 7, 7, 12.0), _event(1, 16, 18, 16, 10.0), _event(2, 22, 25, 22, 20.0)]
    assert _event(0, 2, 7, 7, 12.0).start_s == 0.2 and _event(0, 2, 7, 7, 12.0).end_s == 0.7


@pytest.mark.parametrize("length", [1, 2, 3, 4])
def test_minimum_duration_opens_at_the_frame_it_is_reached(length):
    scores = [0] * 5 + [10] * length + [0] * 5
    tracker = RegionTracker(FPS, T, RULES)
    opened = [(index, notice.kind) for index, m in _one_pixel(scores) for notice in tracker.step(index, m) if notice.kind == "opened"]
    assert opened == ([(5 + 2, "opened")] if length >= 3 else [])
    assert frame_events(np.array(scores, np.float32), FPS, T, RULES) == ([Span(5, 4 + length, 5, 10.0)] if length >= 3 else [])


@pytest.mark.parametrize("gap, spans", [(2, [Span(0, 7, 0, 10.0)]), (3, [Span(0, 2, 0, 10.0), Span(6, 8, 6, 10.0)])])
def test_a_gap_shorter_than_merge_frames_merges(gap, spans):
    scores = [10] * 3 + [0] * gap + [10] * 3
    assert frame_events(np.array(scores, np.float32), FPS, T, RULES) == spans
    assert [(e.event, e.start_frame, e.end_frame) for e in map_events(_one_pixel(scores), FPS, T, RULES)] == [(i, s.start, s.end) for i, s in enumerate(spans)]


def test_frame_events_equal_the_causal_tracker_on_one_pixel_maps():
    rng = np.random.default_rng(19)
    for _ in range(300):
        scores = rng.choice([0.0, 4.0, 5.0, 7.0, 9.5, 10.0, 12.0], size=rng.integers(1, 60)).astype(np.float32)
        rules = EventConfig(hysteresis=rng.choice([0.5, 0.8, 1.0]), min_event=rng.choice([0, 0.2, 0.5]), event_gap=rng.choice([0, 0.2, 0.4]))
        expected = [Span(e.start_frame, e.end_frame, e.peak_frame, e.peak_score) for e in map_events(_one_pixel(scores), FPS, T, rules)]
        assert frame_events(scores, FPS, T, rules) == expected, (scores.tolist(), rules)


SHAPE = (40, 60)


def _map(*blobs):
    """A map of blobs (y0, x0, y1, x1, level, (y, x, peak)): rectangles at `level` with one peak pixel."""
    anomaly_map = np.zeros(SHAPE, dtype=np.float32)
    for y0, x0, y1, x1, level, (y, x, peak) in blobs:
        anomaly_map[y0:y1, x0:x1] = level
        anomaly_map[y, x] = peak
    return anomaly_map


def test_two_blobs_in_the_same_frames_are_two_events():
    first = dict(zip(range(2, 9), [10, 11, 15, 12, 11, 10, 9]))  # frame: peak value; 9 (frame 8) is >= off only
    second = dict(zip(range(4, 13), [10, 20, 30, 25, 20, 15, 12, 11, 10]))
    frames = []
    for index in range(15):
        blobs = []
        if index in first:
            blobs.append((5, 8, 10, 14, 6, (7, 10, first[index])))
        if index in second:
            rows = (24, 32) if index == 6 else (25, 31)  # larger at its peak frame
            blobs.append((rows[0], 40, rows[1], 52, 7, (28, 45, second[index])))
        anomaly_map = _map(*blobs)
        if index in first:
            anomaly_map[4, 8:14] = 4.9  # below off: not in the region
            anomaly_map[10, 14] = 5.0  # == off, touches the rectangle's corner diagonally: in the region (8-connected)
        frames.append((index, anomaly_map))
    assert map_events(frames, FPS, T, RULES) == [
        Event(0, 2, 8, 4, 15.0, 7, 10, 5, 8, 11, 15, 0.2, 0.8),
        Event(1, 4, 12, 6, 30.0, 28, 45, 24, 40, 32, 52, 0.4, 1.2),
    ]


def test_a_moving_blob_is_one_event_until_it_jumps_away():
    peaks = [10, 11, 12, 13, 14, 18, 14, 13, 12, 11]
    frames = [(i, _map((10, 5 + 2 * i, 16, 11 + 2 * i, 6, (12, 7 + 2 * i, peak)))) for i, peak in enumerate(peaks)]  # 2 px a frame
    frames += [(i, _map((10, 45, 16, 51, 6, (12, 47, 10)))) for i in range(10, 14)]  # no overlap with the last box: a new track
    assert map_events(frames, FPS, T, RULES) == [
        Event(0, 0, 9, 5, 18.0, 12, 17, 10, 15, 16, 21, 0.0, 0.9),
        Event(1, 10, 13, 10, 10.0, 12, 47, 10, 45, 16, 51, 1.0, 1.3),
    ]


@pytest.mark.parametrize("absent, spans", [(2, [(0, 9)]), (3, [(0, 3), (7, 10)])])
def test_a_blob_that_disappears_for_less_than_merge_frames_stays_one_event(absent, spans):
    blob = _map((3, 3, 9, 9, 6, (5, 5, 12)))
    frames = [(i, blob if not 4 <= i < 4 + absent else np.zeros(SHAPE, np.float32)) for i in range(8 + absent)]
    assert [(e.event, e.start_frame, e.end_frame, e.box_y0, e.box_x0, e.box_y1, e.box_x1) for e in map_events(frames, FPS, T, RULES)] == [
        (i, start, end, 3, 3, 9, 9) for i, (start, end) in enumerate(spans)
    ]


def test_frame_indices_may_skip_and_must_increase():
    blob = _map((3, 3, 9, 9, 6, (5, 5, 12)))
    once = EventConfig(hysteresis=0.5, min_event=0, event_gap=0.3)  # min_frames 1, merge_frames 3
    frames = [(0, blob), (10, blob), (11, blob)]  # 9 unseen frames after 0: its track ended before frame 10
    assert [(e.event, e.start_frame, e.end_frame) for e in map_events(frames, FPS, T, once)] == [(0, 0, 0), (1, 10, 11)]
    tracker = RegionTracker(FPS, T, once)
    tracker.step(5, blob)
    with pytest.raises(ValueError, match="increasing order"):
        tracker.step(5, blob)
