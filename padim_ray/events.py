"""Anomaly events: frames (or regions of maps) over a threshold, with hysteresis, a minimum duration and merged gaps.

One rule, for a frame score sequence (frame_events) and for each tracked region of the maps
(RegionTracker) alike, with on = T, off = hysteresis * T and (min_frames, merge_frames) from
EventConfig.frames(fps):
- a track starts at the first frame whose score >= on, and continues through frames >= off;
- it ends at its last frame >= off once merge_frames consecutive frames are < off (a shorter gap
  merges its neighbours; frames >= off inside the gap continue it);
- it is an event only if end - start + 1 >= min_frames, announced `opened` at the frame where
  that first holds;
- the end of the input closes every open track.
Every decision uses only the frames seen so far, so RegionTracker can run live. Pure numpy/scipy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from padim_ray.thresholds import EventConfig

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Span:
    """A frame-level event: frames start..end (inclusive) and its highest frame score (the first, on ties)."""

    start: int
    end: int
    peak: int
    peak_score: float


@dataclass(frozen=True)
class Event:
    """A region's event: id (from 0 per input, in order of opening), span, peak, and the box of its region at the peak frame.

    The box (y0, x0, y1, x1) is half-open; start_s and end_s are start_frame / fps and end_frame / fps.
    """

    event: int
    start_frame: int
    end_frame: int
    peak_frame: int
    peak_score: float
    peak_y: int
    peak_x: int
    box_y0: int
    box_x0: int
    box_y1: int
    box_x1: int
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Notice:
    """What happened to an event at a frame: "opened" (it reached the minimum duration), "updated" (its peak rose), "closed"."""

    kind: str
    event: Event


def frame_events(scores, fps: float, threshold: float, events: EventConfig) -> list[Span]:
    """The events of one sequence of frame scores, in order.

    Computed on the whole array at once; equal to running the rule frame by frame (tests check it
    against RegionTracker on 1x1 maps).
    """
    scores = np.asarray(scores)
    min_frames, merge_frames = events.frames(fps)
    on, off = np.float64(threshold), np.float64(events.hysteresis * threshold)
    over = np.flatnonzero(scores >= off)
    spans = []
    # frames >= off with gaps < merge_frames between them form a chain; a track runs from a chain's first frame >= on to its end
    for chain in np.split(over, np.flatnonzero(np.diff(over) > merge_frames) + 1):
        hot = chain[scores[chain] >= on]
        if len(hot) and chain[-1] - hot[0] + 1 >= min_frames:
            start, end = int(hot[0]), int(chain[-1])
            peak = start + int(np.argmax(scores[start : end + 1]))
            spans.append(Span(start, end, peak, float(scores[peak])))
    return spans


@dataclass(frozen=True)
class Region:
    """A connected region of a map >= off: its peak value and position (first in raster order), and its half-open box."""

    peak: float
    y: int
    x: int
    box: tuple[int, int, int, int]


def regions(anomaly_map: np.ndarray, off: float) -> list[Region]:
    """The 8-connected regions of `anomaly_map` >= off, in scipy.ndimage.label's order (raster order of their first pixel)."""
    if not anomaly_map.size or anomaly_map.max() < off:
        return []
    labels, _ = ndimage.label(anomaly_map >= off, structure=EIGHT_CONNECTED)
    found = []
    for label, (rows, columns) in enumerate(ndimage.find_objects(labels), start=1):
        window = np.where(labels[rows, columns] == label, anomaly_map[rows, columns], -np.inf)
        y, x = np.unravel_index(int(np.argmax(window)), window.shape)
        found.append(Region(float(window[y, x]), rows.start + int(y), columns.start + int(x), (rows.start, columns.start, rows.stop, columns.stop)))
    return found


@dataclass(eq=False)
class _Track:
    start: int
    last: int  # its last frame >= off (with a matched region)
    box: tuple[int, int, int, int]  # its last region's box, matched against the next frames' regions
    peak_frame: int
    peak: Region
    event: int | None = None  # its id once opened


class RegionTracker:
    """Events per region of a stream of anomaly maps: call step once per frame, in order, then finish at the end of the input.

    Regions are 8-connected components of map >= off. A region with peak >= on that matches no track
    starts one; tracks match the next frames' regions by box overlap (largest intersection first,
    one to one; ties to the older track and the earlier region); a track without a region is in its
    gap, and its score per frame is its region's peak.
    """

    def __init__(self, fps: float, threshold: float, events: EventConfig):
        self.fps = fps
        self.min_frames, self.merge_frames = events.frames(fps)
        self.on, self.off = np.float64(threshold), np.float64(events.hysteresis * threshold)
        self.tracks: list[_Track] = []  # in order of starting
        self.opened = 0  # events opened so far: the next id
        self.index: int | None = None

    def step(self, index: int, anomaly_map: np.ndarray) -> list[Notice]:
        """Take frame `index` (increasing) and its (H, W) map; returns the notices of this frame."""
        if self.index is not None and index <= self.index:
            raise ValueError(f"RegionTracker.step got frame {index} after frame {self.index}: frames must come in increasing order")
        self.index = index
        notices = self._expire(index - 1)  # tracks whose gap ended in frames not passed to step (a frame stride)
        found = regions(np.asarray(anomaly_map), self.off)
        matched = self._match(found)
        for track, r in matched.items():
            region = found[r]
            track.last, track.box = index, region.box
            if region.peak > track.peak.peak:
                track.peak_frame, track.peak = index, region
                if track.event is not None:
                    notices.append(Notice("updated", self._event(track)))
        taken = set(matched.values())
        self.tracks += [_Track(index, index, region.box, index, region) for r, region in enumerate(found) if r not in taken and region.peak >= self.on]
        for track in self.tracks:
            if track.event is None and track.last == index and index - track.start + 1 >= self.min_frames:
                track.event, self.opened = self.opened, self.opened + 1
                notices.append(Notice("opened", self._event(track)))
        return notices + self._expire(index)

    def finish(self) -> list[Notice]:
        """The end of the input: close every open track."""
        notices = [Notice("closed", self._event(track)) for track in self.tracks if track.event is not None]
        self.tracks = []
        return notices

    def _match(self, found: list[Region]) -> dict[_Track, int]:
        """Tracks to the indices of their regions in `found`, one to one, by the largest box intersection first."""
        if not self.tracks or not found:
            return {}
        a = np.array([track.box for track in self.tracks])[:, None, :]  # (tracks, 1, 4)
        b = np.array([region.box for region in found])[None, :, :]  # (1, regions, 4)
        heights = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
        widths = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
        overlap = np.clip(heights, 0, None) * np.clip(widths, 0, None)
        tracks, found_at = np.nonzero(overlap)
        matched, used = {}, set()
        for i in np.lexsort((found_at, tracks, -overlap[tracks, found_at])):  # largest overlap, then the older track, the earlier region
            track, r = self.tracks[tracks[i]], int(found_at[i])
            if track not in matched and r not in used:
                matched[track] = r
                used.add(r)
        return matched

    def _expire(self, frame: int) -> list[Notice]:
        """Close the tracks whose last merge_frames frames up to `frame` were all < off; notices for those that were events."""
        ended = [track for track in self.tracks if frame - track.last >= self.merge_frames]
        self.tracks = [track for track in self.tracks if frame - track.last < self.merge_frames]
        return [Notice("closed", self._event(track)) for track in ended if track.event is not None]

    def _event(self, track: _Track) -> Event:
        start, end, peak = track.start, track.last, track.peak
        return Event(track.event, start, end, track.peak_frame, peak.peak, peak.y, peak.x, *peak.box, start / self.fps, end / self.fps)


def map_events(frames: Iterable[tuple[int, np.ndarray]], fps: float, threshold: float, events: EventConfig) -> list[Event]:
    """The closed events of one input's (index, map) frames, by id."""
    tracker = RegionTracker(fps, threshold, events)
    closed = []
    for index, anomaly_map in frames:
        closed += [notice.event for notice in tracker.step(index, anomaly_map) if notice.kind == "closed"]
    closed += [notice.event for notice in tracker.finish()]
    return sorted(closed, key=lambda event: event.event)
