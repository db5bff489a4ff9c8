"""Helpers for the serving tests: free ports, service subprocesses, test images and prompts."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import uvicorn
from PIL import Image, ImageDraw

from palo.serve.launch import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_KEY = "test-key"
HEART_BEAT_INTERVAL = 0.5
HEART_BEAT_EXPIRATION = 3.0
START_TIMEOUT = 120.0
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def served(app, port: int | None = None) -> Iterator[str]:
    """Serve an ASGI application on ``port`` (default: a free one) of 127.0.0.1, in a thread of this process, for
    the ``with`` block.

    Yields:
        Its base URL.
    """
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "a test server")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class Service:
    """A service subprocess with its output in a log file."""

    name: str
    args: list[str]
    log_path: str
    env: dict
    url: str = ""
    proc: subprocess.Popen | None = None
    cwd: str = REPO

    def start(self) -> Service:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                     start_new_session=True)
        log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def hard_kill(self) -> None:
        """Die like a crashed machine: no goodbye to the controller."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def make_image(color: str = "red", size: tuple[int, int] = (96, 64)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 56, 56), fill=color)
    draw.rectangle((60, 20, 90, 50), fill="blue")
    return image


def image_b64(image: Image.Image | None = None, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    (image or make_image()).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def vicuna_prompt(question: str, image: bool = True) -> str:
    return f"{SYSTEM} USER: {'<image>' + chr(10) if image else ''}{question} ASSISTANT:"


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (from Linux's /proc/net/tcp and tcp6).

    ``{"127.0.0.1"}`` means loopback only; ``0.0.0.0`` or ``::`` would accept connections from other machines.
    """
    import ipaddress

    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                address, hex_port = fields[1].split(":")
                if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                # The kernel prints the address as native-endian 32-bit words: reverse each word's bytes.
                raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, width, 8))
                found.add(str(ipaddress.ip_address(raw)))
    return found
