"""Image decoding (modes, orientation, caps) and the guarded fetch (addresses, caps, timeouts)."""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from shared.errors import ImageFetchFailed, ImageInvalid, ImageTooLarge
from shared.fetch import AddressRefused, FetchPolicy, fetch_image_bytes
from shared.images import decode_image, sniff
from tests.support.images import make_image

pytestmark = pytest.mark.unit  # no Postgres, Redis, S3 or worker process


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


ODD_BUT_VALID = {
    "cmyk jpeg": lambda: encode(Image.new("CMYK", (20, 10), (0, 255, 0, 0)), "JPEG"),
    "16-bit png": lambda: encode(Image.fromarray(np.full((10, 20), 40000, dtype=np.uint16)), "PNG"),
    "palette png": lambda: encode(Image.new("RGB", (20, 10), (10, 200, 30)).convert("P"), "PNG"),
    "palette with transparency": lambda: encode(Image.new("P", (20, 10), 0), "PNG", transparency=0),
    "rgba png": lambda: encode(Image.new("RGBA", (20, 10), (255, 0, 0, 0)), "PNG"),
    "grayscale": lambda: encode(Image.new("L", (20, 10), 128), "PNG"),
    "1-bit": lambda: encode(Image.new("1", (20, 10), 1), "PNG"),
    "webp": lambda: encode(Image.new("RGB", (20, 10), (1, 2, 3)), "WEBP"),
    "bmp": lambda: encode(Image.new("RGB", (20, 10)), "BMP"),
    "tiff": lambda: encode(Image.new("RGB", (20, 10)), "TIFF"),
}


@pytest.mark.parametrize("name", sorted(ODD_BUT_VALID))
def test_odd_but_valid_images_decode_to_rgb(name):
    img = decode_image(ODD_BUT_VALID[name](), max_pixels=10_000)
    assert img.mode == "RGB" and img.size == (20, 10)


def test_transparency_is_composited_on_white():
    img = decode_image(ODD_BUT_VALID["rgba png"](), max_pixels=10_000)
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_keeps_its_contrast():
    arr = np.zeros((10, 20), dtype=np.uint16)
    arr[:, 10:] = 65535
    img = decode_image(encode(Image.fromarray(arr), "PNG"), max_pixels=10_000)
    assert img.getpixel((0, 0)) == (0, 0, 0) and img.getpixel((15, 0)) == (255, 255, 255)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = decode_image(buf.getvalue(), max_pixels=10_000)
    r, g, b = img.getpixel((5, 5))
    assert r > 200 and b < 50


def test_one_pixel_image():
    assert decode_image(encode(Image.new("RGB", (1, 1)), "PNG"), max_pixels=10).size == (1, 1)


def test_exif_orientation_is_applied():
    img = Image.open(io.BytesIO(make_image(40, 20)))
    exif = img.getexif()
    exif[0x0112] = 8  # rotate 90 CCW
    assert decode_image(encode(img, "JPEG", exif=exif), max_pixels=10_000).size == (20, 40)


@pytest.mark.parametrize(("data", "error"), [
    (b"", ImageInvalid),
    (b"GIF89a" + b"\x00" * 10, ImageInvalid),
    (make_image(100, 100)[:300], ImageInvalid),
    (b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>", ImageInvalid),
    (b"PK\x03\x04zipfile", ImageInvalid),
])
def test_unreadable_data_is_image_invalid(data, error):
    with pytest.raises(error):
        decode_image(data, max_pixels=1_000_000)


def test_pixel_cap_is_checked_before_decoding():
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageTooLarge, match="9000000 pixels"):
        decode_image(data, max_pixels=1_000_000)


def test_sniff():
    assert sniff(make_image()) == "image/jpeg"
    assert sniff(b"hello") is None


# ---- fetch --------------------------------------------------------------------------------

STRICT = FetchPolicy(allow_private=False, connect_timeout_s=2, read_timeout_s=2, total_timeout_s=3)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/a.jpg",
    "http://localhost:80/a.jpg",
    "http://[::1]/a.jpg",
    "http://10.1.2.3/a.jpg",
    "http://192.168.0.10/a.jpg",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:127.0.0.1]/a.jpg",
    "http://0.0.0.0/a.jpg",
    # IPv4 inside IPv6: NAT64 (the metadata service on an IPv6-only cluster), IPv4-compatible, 6to4,
    # NAT64's local-use prefix, IPv4-translated and Teredo
    "http://[64:ff9b::7f00:1]/a.jpg",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "http://[::7f00:1]/a.jpg",
    "http://[2002:7f00:1::]/a.jpg",
    "http://[2002:a00:1::1]/a.jpg",
    "http://[64:ff9b:1:a00:0:100::]/a.jpg",
    "http://[::ffff:0:a00:1]/a.jpg",
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/a.jpg",
])
def test_non_public_addresses_are_refused_before_connecting(url):
    with pytest.raises(AddressRefused, match="non-public address"):
        fetch_image_bytes(url, STRICT)


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "file:///etc/passwd", "http://user:pw@x.test/a",
                                 "https://\u0101\u00fd\x0f\x89", "http://exa mple.com/a.jpg"])  # the fuzzer's hosts
def test_bad_schemes_and_credentials_are_refused(url):
    with pytest.raises(ImageFetchFailed):
        fetch_image_bytes(url, STRICT)


def test_allowed_private_fetch_and_byte_cap(image_server):
    url = image_server.add("/cap.jpg", make_image(200, 200))
    open_policy = FetchPolicy(allow_private=True)
    assert fetch_image_bytes(url, open_policy).data == make_image(200, 200)
    with pytest.raises(ImageFetchFailed, match="larger than 100 bytes"):
        fetch_image_bytes(url, FetchPolicy(allow_private=True, max_bytes=100))


def test_redirect_cap(image_server):
    for i in range(3):
        image_server.redirect(f"/hop{i}", image_server.base + f"/hop{i + 1}")
    image_server.add("/hop3", make_image(10, 10))
    assert fetch_image_bytes(image_server.base + "/hop0", FetchPolicy(allow_private=True, max_redirects=3)).data
    with pytest.raises(ImageFetchFailed, match="more than 2 redirects"):
        fetch_image_bytes(image_server.base + "/hop0", FetchPolicy(allow_private=True, max_redirects=2))


class DripServer:
    """Answers every request one byte every `every` s: the status line and headers too when
    `head_too`, else the headers at once and then the body a byte at a time. `redirect_first`
    answers the first request with a redirect to the dripping path at once."""

    def __init__(self, *, head_too: bool, every: float = 0.1, redirect_first: bool = False) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/slow"
        self.head_too, self.every, self.redirect_first = head_too, every, redirect_first
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        served = 0
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, served), daemon=True).start()
            served += 1

    def _serve(self, conn: socket.socket, served: int) -> None:
        with conn:
            conn.recv(4096)
            if self.redirect_first and served == 0:
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /slower\r\nContent-Length: 0\r\n\r\n")
                conn.recv(4096)  # the same connection is kept for the next hop
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
            drip = head + b"x" * 100000 if self.head_too else b"x" * 100000
            if not self.head_too:
                conn.sendall(head)
            for byte in drip:
                if self.stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(self.every)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.mark.parametrize(("head_too", "redirect_first"), [
    (False, False),  # the body a byte at a time
    (True, False),  # the status line and headers a byte at a time: each read resets a socket timeout
    (True, True),  # the same after a redirect: the deadline covers every hop
])
def test_a_server_that_drips_bytes_meets_the_total_deadline(head_too, redirect_first):
    server = DripServer(head_too=head_too, redirect_first=redirect_first)
    started = time.monotonic()
    try:
        with pytest.raises(ImageFetchFailed, match="longer than 0.6 s"):
            fetch_image_bytes(server.url, FetchPolicy(allow_private=True, read_timeout_s=2, total_timeout_s=0.6))
    finally:
        server.close()
    assert time.monotonic() - started < 1.5  # the deadline, not the 2 s read timeout nor the whole drip


def test_a_webhook_receiver_that_drips_its_answer_is_a_failed_attempt_on_time():
    from shared.webhooks import send

    server = DripServer(head_too=True)
    started = time.monotonic()
    try:
        outcome = send("d1", server.url, "{}", "whsec_" + "A" * 32, FetchPolicy(allow_private=True), timeout_s=0.6)
    finally:
        server.close()
    assert not outcome.ok and not outcome.permanent
    assert "within 0.6 s" in (outcome.error or "")
    assert time.monotonic() - started < 1.5


def test_public_addresses_inside_ipv6_spellings_are_still_fetched_addresses():
    """The embedded-IPv4 rule refuses only what it must: a NAT64 or 6to4 spelling of a public
    address is public (an IPv6-only cluster reaches every image server that way)."""
    import ipaddress

    from shared.fetch import is_public_address

    for public in ("64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111", "64:ff9b:1:808:8:800::"):
        assert is_public_address(ipaddress.ip_address(public)), public
    for private in ("64:ff9b::a9fe:a9fe", "::a00:1", "2002:c0a8:1::", "::ffff:0:7f00:1"):
        assert not is_public_address(ipaddress.ip_address(private)), private


# ---- kept connections ------------------------------------------------------------------------

def payload(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


class KeepAliveServer:
    """An HTTP/1.1 server that counts the connections it accepts. It answers GET /N with N bytes
    (any other path 404) and keeps the connection open; with `answers_per_connection` it closes a
    connection silently when the next request on it arrives, as a server whose keep-alive ran out
    while the request was on its way."""

    def __init__(self, answers_per_connection: int | None = None) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.base = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.answers_per_connection = answers_per_connection
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        answered = 0
        with conn:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(4096)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                if self.answers_per_connection is not None and answered >= self.answers_per_connection:
                    return  # closed without an answer
                path = head.split(b" ")[1].decode()
                size = path.lstrip("/")
                body = payload(int(size)) if size.isdigit() else b""
                status = b"200 OK" if size.isdigit() else b"404 Not Found"
                conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                             + body)
                answered += 1

    def close(self) -> None:
        self.listener.close()


@pytest.fixture()
def keepalive():
    servers: list[KeepAliveServer] = []

    def start(**kw) -> KeepAliveServer:
        servers.append(KeepAliveServer(**kw))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize(("answers_per_connection", "connections"), [
    (None, 1),  # one kept connection serves every fetch
    (1, 3),  # the server closes each kept connection as the next request arrives: tried again on a new one
])
def test_fetches_from_one_host_share_a_kept_connection(keepalive, answers_per_connection, connections):
    server = keepalive(answers_per_connection=answers_per_connection)
    policy = FetchPolicy(allow_private=True)
    for size in (1000, 200_000, 5):
        assert fetch_image_bytes(f"{server.base}/{size}", policy).data == payload(size)
    assert server.connections == connections


def test_a_server_that_never_answers_fails_the_fetch_after_the_one_retry(keepalive):
    server = keepalive(answers_per_connection=0)
    with pytest.raises(ImageFetchFailed, match="could not download"):
        fetch_image_bytes(f"{server.base}/10", FetchPolicy(allow_private=True))
    assert server.connections == 2


def test_a_body_left_unread_never_reaches_the_next_fetch(keepalive):
    server = keepalive()
    with pytest.raises(ImageFetchFailed, match="larger than 100 bytes"):
        fetch_image_bytes(f"{server.base}/5000", FetchPolicy(allow_private=True, max_bytes=100))
    with pytest.raises(ImageFetchFailed, match="HTTP 404"):
        fetch_image_bytes(f"{server.base}/nothing", FetchPolicy(allow_private=True, max_bytes=100))
    assert fetch_image_bytes(f"{server.base}/50", FetchPolicy(allow_private=True, max_bytes=100)).data == payload(50)
    assert server.connections == 3  # each answer whose body was not read closed its connection


def test_a_policy_never_borrows_another_policys_connections(keepalive):
    server = keepalive()
    assert fetch_image_bytes(f"{server.base}/10", FetchPolicy(allow_private=True)).data == payload(10)
    with pytest.raises(AddressRefused):  # the connection kept for the open policy is not this one's
        fetch_image_bytes(f"{server.base}/10", STRICT)
    assert server.connections == 1


def test_the_deadline_watchdog_keeps_no_more_than_the_live_exchanges():
    """Exchanges mostly end long before their deadline; the watchdog sweeps the ended ones instead
    of holding every fetch of the last minute."""
    from shared.fetch import _Watchdog, exchange_deadline

    dog = _Watchdog()
    import shared.fetch as fetch

    real, fetch._WATCHDOG = fetch._WATCHDOG, dog
    try:
        for _ in range(5000):
            with exchange_deadline(60):
                pass
        with exchange_deadline(60) as live:
            assert len(dog._heap) <= 2 * 1024 + 1 and not live.done
    finally:
        fetch._WATCHDOG = real
