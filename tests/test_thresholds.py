"""Thresholds: parsing --threshold, budgets that hold on the calibration footage itself, quantiles, the calibration record."""

import numpy as np
import pytest

from padim_ray.config import ConfigError
from padim_ray.events import frame_events
from padim_ray.thresholds import (
    NOT_CALIBRATED, EventConfig, Threshold, ThresholdSpec, calibrated_quantile, calibration_record, parse_threshold, resolve_threshold,
    threshold_for_rate,
)


@pytest.mark.parametrize("fps, rules, frames", [
    (25, EventConfig(), (4, 25)),  # 3.75 frames
    (24, EventConfig(), (4, 24)),  # 3.6 frames: at least 0.15 s
    (10, EventConfig(min_event=0.3, event_gap=0.3), (3, 3)),  # 0.3 * 10 = 3.0000000000000004 is 3 frames
    (30, EventConfig(min_event=0, event_gap=0), (1, 1)),
])
def test_event_config_frames(fps, rules, frames):
    assert rules.frames(fps) == frames


@pytest.mark.parametrize("hysteresis", [0, 1.5])
def test_event_config_rejects_hysteresis_out_of_range(hysteresis):
    with pytest.raises(ConfigError, match="--hysteresis must be above 0 and at most 1"):
        EventConfig(hysteresis=hysteresis)


@pytest.mark.parametrize("text, spec, per_hour", [
    ("auto", ThresholdSpec("auto", 1.0, "h"), 1.0),
    (" AUTO ", ThresholdSpec("auto", 1.0, "h"), 1.0),
    ("1/h", ThresholdSpec("rate", 1.0, "h"), 1.0),
    ("0.5/min", ThresholdSpec("rate", 0.5, "min"), 30.0),
    ("3/day", ThresholdSpec("rate", 3.0, "day"), 0.125),
    ("0/h", ThresholdSpec("rate", 0.0, "h"), 0.0),
    ("2.5", ThresholdSpec("raw", 2.5), None),
    ("1e2", ThresholdSpec("raw", 100.0), None),
])
def test_parse_threshold(text, spec, per_hour):
    assert parse_threshold(text) == spec
    if per_hour is not None:
        assert spec.events_per_hour == pytest.approx(per_hour, rel=1e-12)


@pytest.mark.parametrize("text", ["-1", "0", "-2/h", "x/h", "abc", "1/week", "nan", "inf", "", "/h"])
def test_parse_threshold_rejects(text):
    with pytest.raises(ConfigError) as error:
        parse_threshold(text)
    assert str(error.value) == (
        f"--threshold must be auto, a false-alarm budget N/h, N/min or N/day (N >= 0), or a raw positive score, got {text!r}"
    )


def test_rates_need_a_calibration_and_raw_values_do_not():
    for text in ("auto", "1/h"):
        with pytest.raises(ConfigError) as error:
            resolve_threshold(parse_threshold(text), None, EventConfig())
        assert str(error.value) == "the model is not calibrated: run `padim-ray calibrate MODEL NORMAL_VIDEOS` or pass --threshold VALUE"
        assert str(error.value) == NOT_CALIBRATED
    assert resolve_threshold(parse_threshold("2.5"), None, EventConfig()) == Threshold(2.5, "raw value")


def _calibration_sequences():
    """Seeded noise with bumps of random height and length: 3 sequences, 2 at 25 fps and one at 10 fps (0.1 h)."""
    rng = np.random.default_rng(7)
    sequences, rates = [], [25.0, 25.0, 10.0]
    for fps in rates:
        sequence = rng.gamma(4.0, 10.0, size=int(120 * fps)).astype(np.float32)
        for start in rng.integers(0, len(sequence) - 40, size=30):
            sequence[start : start + rng.integers(1, 40)] += rng.uniform(20, 120)
        sequences.append(sequence)
    return sequences, rates


def _count(sequences, rates, threshold, rules):
    return sum(len(frame_events(sequence, fps, threshold, rules)) for sequence, fps in zip(sequences, rates))


@pytest.mark.parametrize("rules", [EventConfig(), EventConfig(min_event=0, event_gap=0.2)])
@pytest.mark.parametrize("per_hour", [0, 10, 30, 100, 300])
def test_threshold_from_a_budget_gives_that_rate_on_the_calibration_footage(rules, per_hour):
    sequences, rates = _calibration_sequences()
    hours = sum(len(s) / fps for s, fps in zip(sequences, rates)) / 3600
    threshold = threshold_for_rate(sequences, rates, per_hour, rules)
    allowed = per_hour * hours
    candidates = np.unique(np.concatenate(sequences))
    lower = candidates[candidates < threshold]
    assert _count(sequences, rates, threshold, rules) <= allowed
    assert len(lower) and _count(sequences, rates, lower[-1], rules) > allowed  # the next lower candidate is over: the smallest
    assert all(_count(sequences, rates, c, rules) <= allowed for c in candidates[candidates > threshold])  # every higher one keeps it
    maximum = np.float32(candidates[-1])
    if per_hour == 0 and rules.frames(25) == (1, 5):  # every frame is an event at 1 frame long: just above the max
        assert threshold == float(np.nextafter(maximum, np.float32(np.inf))) and np.float32(threshold) > maximum
    if per_hour == 300:
        assert _count(sequences, rates, threshold, rules) > 0


def test_threshold_scan_stops_at_the_first_threshold_over_the_budget():
    # A plateau at 5 with two bumps at 10: at 10, two events; at 5 (off 4.5) the whole sequence is one event, within a
    # budget of 1; the budget's threshold is above both bumps, not the plateau
    sequence = np.full(3600, 5.0, np.float32)
    sequence[1000:1010] = sequence[2000:2010] = 10.0
    threshold = threshold_for_rate([sequence], [1.0], 1.0, EventConfig())
    assert _count([sequence], [1.0], 5.0, EventConfig()) == 1
    assert threshold == float(np.nextafter(np.float32(10), np.float32(np.inf)))


def test_events_do_not_run_from_one_calibration_sequence_into_the_next():
    first, second = np.zeros(1800, np.float32), np.zeros(1800, np.float32)  # 1 fps: one hour in all
    first[-10:] = second[:10] = 10.0  # one event ending the first, one starting the second: 2 events at 10, not 1
    assert threshold_for_rate([first, second], [1.0, 1.0], 1.0, EventConfig()) == float(np.nextafter(np.float32(10), np.float32(np.inf)))


def test_calibrated_quantile_is_the_fraction_strictly_below():
    calibration = {"sequences": [[1.0, 2.0, 3.0], [2.0, 5.0]]}  # sorted: 1 2 2 3 5
    assert calibrated_quantile([0.0, 1.0, 2.0, 2.5, 5.0, 6.0], calibration).tolist() == [0.0, 0.0, 0.2, 0.6, 0.8, 1.0]


INPUTS = [
    {"path": "file:///a.mp4", "start": 0, "stop": None, "frames": 4, "fps": 25.0},
    {"path": "file:///b.mp4", "start": 100, "stop": 103, "frames": 3, "fps": 30.0},
    {"path": "file:///frames", "start": 0, "stop": 2, "frames": 2, "fps": 10.0},
]
SEQUENCES = [[0.1, 3.0, 2.0, 8.0], [1.0, 4.0, 5.0], np.array([6.0, 7.0], np.float32)]


def test_calibration_record():
    record = calibration_record(INPUTS, SEQUENCES, held_out=True)
    assert set(record) == {"frames", "seconds", "fps", "held_out", "score", "inputs", "sequences", "quantiles"}
    assert record["frames"] == 9 and record["seconds"] == pytest.approx(4 / 25 + 3 / 30 + 2 / 10, rel=1e-15)
    assert record["fps"] == 25.0 and record["held_out"] is True and record["score"] == "max" and record["inputs"] == INPUTS
    assert record["sequences"] == [[float(np.float32(0.1)), 3.0, 2.0, 8.0], [1.0, 4.0, 5.0], [6.0, 7.0]]  # float32 values
    assert all(type(v) is float for sequence in record["sequences"] for v in sequence)
    quantiles = record["quantiles"]
    assert len(quantiles) == 101 and quantiles[0] == float(np.float32(0.1)) and quantiles[50] == 4.0 and quantiles[100] == 8.0
    assert quantiles[25] == 2.0 and quantiles[75] == 6.0  # levels 0.25 and 0.75 of 9 sorted values fall on the 3rd and 7th
    with pytest.raises(ValueError, match="score sequences of"):
        calibration_record(INPUTS, SEQUENCES[:2], held_out=False)


def test_resolve_threshold_from_a_calibration():
    rng = np.random.default_rng(3)
    sequence = rng.gamma(4.0, 10.0, size=3690).astype(np.float32)  # 738 s at 5 fps
    record = calibration_record([{"path": "file:///n.mp4", "start": 0, "stop": None, "frames": 3690, "fps": 5.0}], [sequence], True)
    rules = EventConfig()
    assert resolve_threshold(parse_threshold("auto"), record, rules) == Threshold(
        threshold_for_rate([sequence], [5.0], 1.0, rules), "at most 1 false event per hour on 12.3 min of calibration footage (3,690 frames); "
        "that footage is too short to measure this rate: the threshold is its highest score, so expect more false events"
    )  # 12.3 min cannot show a rate of 1/h: said so
    assert resolve_threshold(parse_threshold("0.5/min"), record, rules) == Threshold(
        threshold_for_rate([sequence], [5.0], 30.0, rules), "at most 0.5 false events per minute on 12.3 min of calibration footage (3,690 frames)"
    )
