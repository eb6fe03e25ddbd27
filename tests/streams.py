"""A live camera for tests: a clip published as an endless MPEG-TS stream, looped at its own frame rate
and encoded by FFmpeg's libraries (through PyAV) as a camera's encoder would, served over HTTP or
sent over UDP, for `padim-ray watch` to read as it reads a real camera.

Run as a script in its own process, so that a test can kill it mid-stream and start it again:

    python tests/streams.py http PORT CLIP   # each client gets the clip from its first frame, looped
    python tests/streams.py udp PORT CLIP    # datagrams to 127.0.0.1:PORT, whether anyone listens or not

It prints "listening" (http: once it takes connections) or "sending" (udp).
"""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import time

import av
import numpy as np

PATH = "/live.ts"


def clip_frames(clip: str) -> tuple[list[np.ndarray], int]:
    """The clip's frames (RGB) and its frame rate."""
    with av.open(clip) as container:
        stream = container.streams.video[0]
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)], round(stream.average_rate)


def publish(output, frames: list[np.ndarray], fps: int) -> None:
    """Write `frames` to `output` (a file object or an FFmpeg URL) as MPEG-TS, looping at `fps` until writing fails."""
    height, width = frames[0].shape[:2]
    with av.open(output, "w", format="mpegts", container_options={"flush_packets": "1"}) as container:
        stream = container.add_stream("mpeg2video", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000
        stream.codec_context.gop_size = fps // 2  # a reader that joins or reconnects decodes within half a second
        started, count = time.monotonic(), 0
        while True:
            for picture in frames:
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts = count
                for packet in stream.encode(frame):
                    container.mux(packet)
                count += 1
                time.sleep(max(0.0, started + count / fps - time.monotonic()))  # a camera gives each frame at its time


def serve(port: int, clip: str) -> None:
    frames, fps = clip_frames(clip)

    class Camera(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != PATH:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.end_headers()
            try:
                publish(self.wfile, frames, fps)
            except (BrokenPipeError, ConnectionResetError, av.FFmpegError, OSError):
                pass  # the reader went away

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Camera)  # allow_reuse_address: a restart takes the port again
    print("listening", flush=True)
    server.serve_forever()


def send(port: int, clip: str) -> None:
    frames, fps = clip_frames(clip)
    print("sending", flush=True)
    publish(f"udp://127.0.0.1:{port}?pkt_size=1316", frames, fps)  # seven TS packets a datagram, as cameras send them



class LiveCamera:
    """This script serving (http) or sending (udp) `clip` on a free local port, in a process of its own: started,
    killed, started again."""

    def __init__(self, clip, protocol: str = "http"):
        self.clip, self.protocol, self.process = clip, protocol, None
        kind = socket.SOCK_STREAM if protocol == "http" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}{PATH}" if protocol == "http" else f"udp://127.0.0.1:{self.port}"

    def start(self) -> LiveCamera:
        command = [sys.executable, __file__, self.protocol, str(self.port), str(self.clip)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        started = self.process.stdout.readline().strip()
        assert started in ("listening", "sending"), f"the {self.protocol} camera on port {self.port} did not start"
        return self

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


if __name__ == "__main__":
    {"http": serve, "udp": send}[sys.argv[1]](int(sys.argv[2]), sys.argv[3])
