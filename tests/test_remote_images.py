"""Remote images: refused without --allow-remote-images; with it, only public addresses (or an explicit allow-list),
size and time limits, each redirect checked. A local HTTP server on 127.0.0.1 plays the remote host: it is
reachable only through the documented allow-list, and the same server is refused without it."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from palo.mm_utils import ImageLoadError, load_image
from palo.remote_images import RemoteImageError, RemoteImagePolicy, fetch_image_bytes

LOCAL = ("127.0.0.1/32",)


def _png(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), color).save(buffer, format="PNG")
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        port = self.server.server_address[1]
        routes = {
            "/img.png": (200, {}, _png()),
            "/big": (200, {}, b"x" * 5000),
            "/redirect-ok": (302, {"Location": "/img.png"}, b""),
            "/redirect-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/redirect-loopback": (302, {"Location": f"http://127.0.0.2:{port}/img.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/missing": (404, {}, b"no"),
        }
        if self.path == "/trickle":  # headers a line at a time: each read is quick, the whole never ends
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(100):
                try:
                    self.wfile.write(b"X-Pad: a\r\n")
                    self.wfile.flush()
                except OSError:  # the client closed
                    return
                time.sleep(0.1)
            return
        if self.path == "/slow":
            time.sleep(3)
            routes["/slow"] = (200, {}, _png())
        status, headers, body = routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_refused_without_the_flag(server):
    with pytest.raises(ImageLoadError, match="not fetched without --allow-remote-images"):
        load_image(server + "/img.png")


def test_fetched_with_the_flag_from_an_allowed_network(server):
    image = load_image(server + "/img.png", allow_remote=True, policy=RemoteImagePolicy.from_strings(LOCAL))
    assert image.size == (30, 20) and image.getpixel((0, 0)) == (255, 0, 0)
    image = load_image(server + "/redirect-ok", allow_remote=True, policy=RemoteImagePolicy.from_strings(LOCAL))
    assert image.size == (30, 20)


def test_loopback_refused_by_default_even_with_the_flag(server):
    with pytest.raises(RemoteImageError, match="loopback address 127.0.0.1"):
        load_image(server + "/img.png", allow_remote=True)


@pytest.mark.parametrize("path, reason", [
    ("/redirect-metadata", "link-local address 169.254.169.254"),
    ("/redirect-loopback", "loopback address 127.0.0.2"),  # the allow-list names 127.0.0.1 only
    ("/loop", "more than 3 redirects"),
    ("/missing", "HTTP 404"),
])
def test_redirects_are_checked_hop_by_hop(server, path, reason):
    with pytest.raises(RemoteImageError, match=reason):
        fetch_image_bytes(server + path, RemoteImagePolicy.from_strings(LOCAL))


def test_size_and_time_limits(server):
    with pytest.raises(RemoteImageError, match="over the limit of 1,000"):
        fetch_image_bytes(server + "/big", RemoteImagePolicy.from_strings(LOCAL, max_bytes=1000))
    assert len(fetch_image_bytes(server + "/big", RemoteImagePolicy.from_strings(LOCAL, max_bytes=5000))) == 5000
    start = time.monotonic()
    with pytest.raises(RemoteImageError, match="timed out after 0.5 s"):
        fetch_image_bytes(server + "/slow", RemoteImagePolicy.from_strings(LOCAL, timeout=0.5))
    assert time.monotonic() - start < 2.5


def test_the_time_limit_holds_for_a_server_that_trickles_its_headers(server):
    """httpx's timeout bounds each read: headers sent a line at a time kept a fetch (and the worker's place for
    reading images) for good. The clock now bounds the whole fetch, and the overrun fetch's thread ends too."""
    start = time.monotonic()
    with pytest.raises(RemoteImageError, match="timed out after 0.5 s"):
        fetch_image_bytes(server + "/trickle", RemoteImagePolicy.from_strings(LOCAL, timeout=0.5))
    assert time.monotonic() - start < 2.0
    deadline = time.monotonic() + 5
    while any(t.name == "palo-image-fetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "palo-image-fetch" for t in threading.enumerate())  # its connection was closed


def test_a_port_out_of_range_is_a_refusal_not_a_crash():
    """``urlsplit(...).port`` raises a plain ValueError, which the worker answered as a server error (502)."""
    with pytest.raises(RemoteImageError, match="Port out of range"):
        fetch_image_bytes("http://127.0.0.1:99999/a.png", RemoteImagePolicy.from_strings(LOCAL))


def test_every_resolved_address_must_be_public():
    def resolver(answers):
        return RemoteImagePolicy(resolve=lambda host: answers)

    # One private answer among public ones is enough to refuse (a DNS name cannot smuggle in an intranet host).
    with pytest.raises(RemoteImageError, match="private address 10.1.2.3"):
        fetch_image_bytes("http://images.example/a.png", resolver(["93.184.216.34", "10.1.2.3"]))
    with pytest.raises(RemoteImageError, match="private address fd00::1"):
        fetch_image_bytes("http://images.example/a.png", resolver(["fd00::1"]))
    with pytest.raises(RemoteImageError, match="unspecified address 0.0.0.0"):
        fetch_image_bytes("http://0.0.0.0/a.png", RemoteImagePolicy())
    with pytest.raises(RemoteImageError, match="multicast address 224.0.0.1"):
        fetch_image_bytes("http://images.example/a.png", resolver(["224.0.0.1"]))
    with pytest.raises(RemoteImageError, match="only http"):
        fetch_image_bytes("ftp://example.com/a.png", RemoteImagePolicy())
    with pytest.raises(ValueError, match="not an IP network"):
        RemoteImagePolicy.from_strings(["localhost"])
