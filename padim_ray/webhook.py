"""`watch --webhook URL`: each notice POSTed as JSON, in order, from a thread of its own, so that a slow
or dead endpoint never holds up scoring; stdout and events.jsonl stay the record."""

from __future__ import annotations

import collections
import json
import logging
import threading
import urllib.request

from padim_ray.errors import first_line

log = logging.getLogger(__name__)
TIMEOUT = 5.0  # seconds a POST may take
QUEUED = 1000  # notices waiting at most; beyond, the oldest are dropped (counted)


class Webhook:
    """Sends notices to `url`; a failed POST is not retried, and is logged once per run of failures."""

    def __init__(self, url: str):
        self.url = url
        self.sent = self.failed = self.dropped = 0
        self._queue: collections.deque[bytes] = collections.deque(maxlen=QUEUED)
        self._ready = threading.Condition()
        self._closing = self._failing = False
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    def post(self, notice: dict) -> None:
        """Queue `notice` to be sent."""
        with self._ready:
            self.dropped += len(self._queue) == QUEUED
            self._queue.append(json.dumps(notice).encode())
            self._ready.notify()

    def close(self, wait: float) -> None:
        """Send what is queued, for at most `wait` seconds, then stop."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join(wait)
        unsent = len(self._queue) + self.dropped
        if self.failed or unsent:
            log.warning("watch: webhook %s: %d notice(s) sent, %d failed, %d not sent", self.url, self.sent, self.failed, unsent)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closing:
                    self._ready.wait()
                if not self._queue:
                    return
                body = self._queue.popleft()
            self._send(body)

    def _send(self, body: bytes) -> None:
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                response.read()
        except (OSError, ValueError) as err:  # refused, timed out, an HTTP error status, a bad URL
            self.failed += 1
            if not self._failing:
                log.warning("watch: webhook %s failed (%s); notices go on to stdout and events.jsonl", self.url, first_line(err))
            self._failing = True
            return
        self.sent += 1
        self._failing = False
