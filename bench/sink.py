"""A minimal HTTP server for the host benchmarks: GET answers one of the files given (the images
jobs fetch), anything else (S3's PUT object, HEAD/PUT bucket) is read and answered 200 with an
ETag, nothing stored. One asyncio process, HTTP/1.1 keep-alive.

moto's S3 server and Python's http.server spend more CPU per request than the worker's own side
of it, so on a small machine they, not the worker, set the ceiling of a layout measurement. In
production the object store and the image hosts are elsewhere; with `--sink` the benchmarks use
this instead and report its CPU apart.

  python bench/sink.py PORT FILE...        # GET /0 .. /N-1 (any suffix) answers FILE 0 .. N-1
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path


async def serve(port: int, files: list[bytes]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length, expect = 0, False
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                    elif name.strip().lower() == "expect" and value.strip().lower() == "100-continue":
                        expect = True
                if expect:  # botocore waits for this before it sends the body
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if length:
                    await reader.readexactly(length)
                if method == "GET":
                    stem = path.rsplit("/", 1)[-1].split(".", 1)[0]
                    body = files[int(stem) % len(files)] if stem.isdigit() else b""
                    status = b"200 OK" if stem.isdigit() else b"404 Not Found"
                    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
                else:
                    etag = hashlib.md5(path.encode(), usedforsecurity=False).hexdigest().encode()
                    writer.write(b'HTTP/1.1 200 OK\r\nETag: "' + etag + b'"\r\nContent-Length: 0\r\n\r\n')
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=512)
    async with server:
        await server.serve_forever()


def main() -> int:
    port, paths = int(sys.argv[1]), sys.argv[2:]
    asyncio.run(serve(port, [Path(p).read_bytes() for p in paths]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
