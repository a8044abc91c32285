"""A TCP forwarder run as its own process: `python -m tests.tcp_proxy PORT TARGET_HOST TARGET_PORT`.

Fault tests put it between a service and Postgres and SIGKILL it to make Postgres unreachable
(every connection drops, new ones are refused), then start it again on the same port.
"""

from __future__ import annotations

import socket
import sys
import threading


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main(port: int, host: str, target_port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
    print("listening", flush=True)
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection((host, target_port), timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
