"""Test images and HTTP servers that serve them (normally, slowly, or by registered route)."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


def make_image(width: int = 160, height: int = 120, fmt: str = "JPEG", mode: str = "RGB", **save: Any) -> bytes:
    """A picture with structure (gradients and a block), so masks are not trivially uniform."""
    img = Image.new("RGB", (width, height))
    pixels = img.load()
    for y in range(height):
        for x in range(width):
            pixels[x, y] = ((x * 255) // max(1, width - 1), (y * 255) // max(1, height - 1), (x * y) % 256)
    img.paste((250, 20, 20), (width // 4, height // 4, width // 2, height // 2))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


class ImageServer:
    """Serves registered paths on 127.0.0.1: bytes, redirects or a status code."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hits: dict[str, int] = {}  # path -> GETs served
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                status, headers, body = server.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, path: str, body: bytes, *, status: int = 200, content_type: str = "image/jpeg") -> str:
        self.routes[path] = (status, {"Content-Type": content_type}, body)
        return self.base + path

    def redirect(self, path: str, to: str, status: int = 302) -> str:
        self.routes[path] = (status, {"Location": to}, b"")
        return self.base + path


class SlowImage(BaseHTTPRequestHandler):
    body = make_image(40, 40)

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        for start in range(0, len(self.body), len(self.body) // 8 + 1):  # about 2 s in all
            self.wfile.write(self.body[start : start + len(self.body) // 8 + 1])
            self.wfile.flush()
            time.sleep(0.25)

    def log_message(self, *args) -> None:
        pass
