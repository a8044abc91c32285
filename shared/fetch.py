"""Safe HTTP(S) image fetch: scheme allow-list, address guard, timeouts, byte and redirect caps.

The address guard runs inside the connection itself: the host name is resolved once, every
address is checked, and the socket connects to the checked address. A DNS answer that changes
between check and connect (rebinding) can't slip through, and every redirect hop goes through
the same connection class, so "after every redirect" holds by construction.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import ipaddress
import itertools
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ProtocolError
from urllib3.util import parse_url

from shared.errors import ImageFetchFailed
from shared.settings import Settings


class AddressRefused(ImageFetchFailed):
    """The URL resolves to a loopback, private, link-local, metadata or otherwise non-global address."""


_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: bits 48-63 and 72-87 (around the u octet)
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT, RFC 2765


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address carries in one of its standard spellings: IPv4-mapped,
    IPv4-compatible, IPv4-translated, 6to4, NAT64 (well-known and local-use prefixes) and Teredo
    (its server and its client). A packet to such an address reaches that IPv4 host on a network
    that translates it, so the guard judges what it holds."""
    value = int(ip)
    held: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        held.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        held.append(ip.sixtofour)
    if ip.teredo is not None:
        held.extend(ip.teredo)
    if ip in _NAT64_WELL_KNOWN or ip in _IPV4_TRANSLATED or (ip in _IPV4_COMPATIBLE and value > 1):
        held.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if ip in _NAT64_LOCAL:
        held.append(ipaddress.IPv4Address((((value >> 64) & 0xFFFF) << 16) | ((value >> 40) & 0xFFFF)))
    return held


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global unicast, and so is every IPv4 address it embeds (see `embedded_ipv4`)."""
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        return all(inner.is_global and not inner.is_multicast for inner in embedded_ipv4(ip))
    return True


def _resolve_checked(host: str, port: int, allow_private: bool) -> list[tuple]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ImageFetchFailed(f"cannot resolve host {host!r}: {exc.strerror}") from exc
    except UnicodeError as exc:
        raise ImageFetchFailed(f"invalid host name {host[:100]!r}") from exc
    if not allow_private:
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if not is_public_address(ip):
                raise AddressRefused(
                    f"refused to connect to {host!r}: it resolves to {ip}, a non-public address"
                )
    return infos


# ---- one deadline for a whole exchange ----------------------------------------------------------
# A socket timeout bounds one read: a server that sends a byte every few seconds resets it forever,
# in the headers as in the body. So every outbound exchange (an image and its redirects, a webhook
# delivery) runs under an `Exchange`: the sockets it uses are registered with it, and one watchdog
# thread per process shuts them down when its deadline passes, which ends a blocked read at once.
# It holds a duplicate of each socket's descriptor, so it never touches a descriptor the connection
# closed and the process reused meanwhile; the duplicate is closed when the exchange ends.


class Exchange:
    """The sockets of one outbound HTTP exchange and the moment it must be over."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self.done = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def attach(self, sock: socket.socket) -> None:
        try:
            own = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:  # closed already: nothing to watch
            return
        with self._lock:
            if self.done:
                own.close()
                return
            self._sockets.append(own)
            if self.expired:
                _shut(own)

    def expire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def close(self) -> None:
        with self._lock:
            self.done = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One daemon thread that expires exchanges at their deadlines (a heap; an ended exchange is
    dropped when it comes up)."""

    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._heap: list[tuple[float, int, Exchange]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._compacted = 1024  # the heap's size after its last sweep of ended exchanges

    def watch(self, exchange: Exchange) -> None:
        with self._wake:
            if len(self._heap) > 2 * self._compacted:  # most exchanges end long before their deadline
                self._heap = [entry for entry in self._heap if not entry[2].done]
                heapq.heapify(self._heap)
                self._compacted = max(1024, len(self._heap))
            heapq.heappush(self._heap, (exchange.deadline, next(self._order), exchange))
            if self._thread is None or not self._thread.is_alive():  # (a forked child starts its own)
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is exchange:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                _, _, due = heapq.heappop(self._heap)
            due.expire()


_WATCHDOG = _Watchdog()
_CURRENT = threading.local()


@contextlib.contextmanager
def exchange_deadline(seconds: float) -> Iterator[Exchange]:
    """Everything this thread sends and receives inside the block is cut off `seconds` from now."""
    exchange = Exchange(seconds)
    _WATCHDOG.watch(exchange)
    outer = getattr(_CURRENT, "exchange", None)
    _CURRENT.exchange = exchange
    try:
        yield exchange
    finally:
        _CURRENT.exchange = outer
        exchange.close()


def _current_exchange() -> Exchange | None:
    exchange: Exchange | None = getattr(_CURRENT, "exchange", None)
    return exchange


def _connect(host: str, port: int, timeout: float | None, allow_private: bool) -> socket.socket:
    last: OSError | None = None
    exchange = _current_exchange()
    for family, socktype, proto, _, addr in _resolve_checked(host, port, allow_private):
        sock = socket.socket(family, socktype, proto)
        try:
            if exchange is not None:
                timeout = max(0.001, min(timeout or exchange.seconds, exchange.remaining()))
                exchange.attach(sock)  # the TLS handshake and every read after it are cut off on time
            sock.settimeout(timeout)
            sock.connect(addr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise ImageFetchFailed(f"cannot connect to {host}:{port}: {last}")


def _attach_kept(connection: HTTPConnection) -> None:
    """A kept connection's socket joins the current exchange (a new one joined it in `_connect`)."""
    exchange = _current_exchange()
    if exchange is not None and connection.sock is not None:
        exchange.attach(connection.sock)


@functools.cache
def _connection_classes(
    allow_private: bool, allow_endpoints: frozenset[str],
) -> tuple[type[HTTPConnection], type[HTTPSConnection]]:
    def allowed(host: str, port: int) -> bool:
        return allow_private or f"{host.lower()}:{port}" in allow_endpoints

    class GuardedHTTP(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _connect(self._dns_host, self.port, self.timeout, allowed(self._dns_host, self.port))

        def request(self, *args: Any, **kwargs: Any) -> None:
            _attach_kept(self)
            super().request(*args, **kwargs)

    class GuardedHTTPS(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return _connect(self._dns_host, self.port, self.timeout, allowed(self._dns_host, self.port))

        def request(self, *args: Any, **kwargs: Any) -> None:
            _attach_kept(self)
            super().request(*args, **kwargs)

    return GuardedHTTP, GuardedHTTPS


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    total_timeout_s: float = 60.0
    max_bytes: int = 25 * 1024 * 1024
    max_redirects: int = 5
    # host:port pairs that may be reached even when private (an internal image server, say);
    # every other non-public address stays refused, redirects included.
    allow_endpoints: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str | None
    final_url: str


def policy_from_settings(settings: Settings) -> FetchPolicy:
    """The fetch policy the settings describe (image fetching; webhooks obey the same rules)."""
    return FetchPolicy(
        allow_private=settings.allow_private_networks,
        connect_timeout_s=settings.fetch_connect_timeout_s,
        read_timeout_s=settings.fetch_read_timeout_s,
        total_timeout_s=settings.fetch_total_timeout_s,
        max_bytes=settings.max_fetch_bytes,
        max_redirects=settings.fetch_max_redirects,
        allow_endpoints=frozenset(e.lower() for e in settings.fetch_allow_endpoints),
    )


# A plain http(s) URL: a host name or IPv4 address, an optional port, a path and query of URL-safe
# characters. Both checks below accept every such URL (a property test says so), so the API checks
# a 10,000-item batch's URLs without urllib3's parser for each (bench/README.md has the cost of each).
_PLAIN_URL = re.compile(r"https?://[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::([0-9]{1,5}))?"
                        r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?(?:\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?")


def check_url_syntax(url: str) -> str | None:
    """Why a URL can't be fetched at all (scheme, host), or None. Cheap; used by the API too."""
    plain = _PLAIN_URL.fullmatch(url)
    if plain is not None and (plain.group(1) is None or int(plain.group(1)) <= 65535):
        return None
    return _url_problem(url)


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
        parse_url(url)  # urllib3's own checks (a host with control characters, spaces): what the fetch uses
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "only http and https URLs are accepted"
    if not parts.hostname:
        return "the URL has no host"
    if parts.username or parts.password:
        return "credentials in the URL are not accepted"
    return None


def _refuse_unfetchable(url: str) -> None:
    problem = check_url_syntax(url)
    if problem:
        raise ImageFetchFailed(f"{problem}: {url[:200]}")


def guarded_pool(url: str, policy: FetchPolicy) -> tuple[urllib3.HTTPConnectionPool, str]:
    """A one-connection pool for `url` whose connections check the address, and the request path:
    webhook delivery's, so callbacks obey the same address rules as image URLs (image fetches keep
    their connections instead: `_pool_manager`).

    Raises ImageFetchFailed for a URL that can't be fetched at all.
    """
    _refuse_unfetchable(url)
    parts = urlsplit(url)
    scheme, host = parts.scheme, parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    http_cls, https_cls = _connection_classes(policy.allow_private, policy.allow_endpoints)
    pool_cls = urllib3.HTTPSConnectionPool if scheme == "https" else urllib3.HTTPConnectionPool
    pool = pool_cls(
        host, port, maxsize=1, retries=False,
        timeout=urllib3.Timeout(connect=policy.connect_timeout_s, read=policy.read_timeout_s),
    )
    pool.ConnectionCls = https_cls if scheme == "https" else http_cls
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return pool, path


# Image fetches keep their connections alive, per fetch policy: a catalog's images mostly come from
# one CDN, and a new connection per image cost a DNS lookup and a TCP (and TLS) handshake each time.
# Every new connection is address-checked as before (GuardedHTTP); a kept one stays connected to
# the address that was checked when it opened, so a DNS answer that changes since can't redirect it.
FETCH_HOSTS = 16  # hosts with kept connections per process and policy (the least recently used go)
FETCH_CONNECTIONS = 32  # idle connections kept per host (above a worker's concurrency)


@functools.cache
def _pool_classes(
    allow_private: bool, allow_endpoints: frozenset[str],
) -> dict[str, type[urllib3.HTTPConnectionPool]]:
    http_cls, https_cls = _connection_classes(allow_private, allow_endpoints)

    class GuardedHTTPPool(urllib3.HTTPConnectionPool):
        ConnectionCls = http_cls

    class GuardedHTTPSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = https_cls

    return {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}


@functools.lru_cache(maxsize=8)
def _pool_manager(policy: FetchPolicy) -> urllib3.PoolManager:
    manager = urllib3.PoolManager(
        num_pools=FETCH_HOSTS, maxsize=FETCH_CONNECTIONS, block=False, retries=False,
        timeout=urllib3.Timeout(connect=policy.connect_timeout_s, read=policy.read_timeout_s),
    )
    manager.pool_classes_by_scheme = _pool_classes(policy.allow_private, policy.allow_endpoints)
    return manager


def _open(url: str, policy: FetchPolicy) -> urllib3.BaseHTTPResponse:
    """GET `url` on a kept connection if there is one. A kept connection the server closed meanwhile
    (its keep-alive ran out) fails before any answer: that is tried once more, on a new connection."""
    _refuse_unfetchable(url)
    manager = _pool_manager(policy)

    def get() -> urllib3.BaseHTTPResponse:
        return manager.urlopen("GET", url, redirect=False, preload_content=False, retries=False,
                               headers={"User-Agent": "clipmask-fetch/1", "Accept": "image/*,*/*;q=0.5"})

    try:
        return get()
    except ProtocolError:  # aborted or reset before the status line; timeouts are not retried
        return get()


def fetch_image_bytes(url: str, policy: FetchPolicy) -> Fetched:
    """GET `url` following at most `max_redirects` redirects; raise ImageFetchFailed on any problem.
    The whole exchange (connects, redirects, headers, body) ends within `total_timeout_s`."""
    with exchange_deadline(policy.total_timeout_s) as exchange:
        try:
            return _fetch_within(url, policy, exchange)
        except ImageFetchFailed:
            if exchange.expired:
                raise ImageFetchFailed(f"the download took longer than {policy.total_timeout_s:g} s") from None
            raise


def _fetch_within(url: str, policy: FetchPolicy, exchange: Exchange) -> Fetched:
    for _hop in range(policy.max_redirects + 1):
        try:
            resp = _open(url, policy)
            complete = False  # the whole body read: the connection may serve the next image
            try:
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.headers.get("Location")
                    if not location:
                        raise ImageFetchFailed(f"redirect without Location from {url[:200]}")
                    url = urljoin(url, location)
                    continue
                if resp.status != 200:
                    raise ImageFetchFailed(f"the image URL answered HTTP {resp.status}")
                declared = resp.headers.get("Content-Length")
                if declared and declared.isascii() and declared.isdigit() and int(declared) > policy.max_bytes:
                    raise ImageFetchFailed(f"the image is larger than {policy.max_bytes} bytes")
                chunks: list[bytes] = []
                size = 0
                while chunk := resp.read1(64 * 1024):
                    size += len(chunk)
                    if size > policy.max_bytes:
                        raise ImageFetchFailed(f"the image is larger than {policy.max_bytes} bytes")
                    chunks.append(chunk)
                if exchange.expired:  # cut off: what was read is not the whole image
                    raise ImageFetchFailed("cut off at the deadline")
                complete = True
                return Fetched(b"".join(chunks), resp.headers.get("Content-Type"), url)
            finally:
                if not complete:  # a body left unread (a redirect, an error, a cap): the connection goes
                    resp.close()
                resp.release_conn()
        except ImageFetchFailed:
            raise
        except (Urllib3Error, OSError) as exc:
            raise ImageFetchFailed(f"could not download the image: {type(exc).__name__}: {exc}") from exc
    raise ImageFetchFailed(f"more than {policy.max_redirects} redirects")
