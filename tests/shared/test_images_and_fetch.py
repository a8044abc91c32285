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


def test_a_server_that_drips_bytes_meets_the_total_deadline():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while not stop.is_set():
            try:
                conn.sendall(b"x")
            except OSError:
                break
            time.sleep(0.2)
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    with pytest.raises(ImageFetchFailed, match="longer than"):
        fetch_image_bytes(f"http://127.0.0.1:{listener.getsockname()[1]}/slow",
                          FetchPolicy(allow_private=True, read_timeout_s=5, total_timeout_s=1.5))
    stop.set()
    listener.close()


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
