"""Plain HTTP on the WebSocket port: static files (``--web``) and a health endpoint.

The server asks these responders only about requests that are not WebSocket upgrades
(see :class:`~trio_bridge.routing.HttpResponder`), so one port serves noVNC's files
and relays its WebSocket, as websockify does. Every response closes the connection:
the bridge answers one request per connection, which costs a browser a few more TCP
handshakes for noVNC's ~60 files and keeps the server free of HTTP keep-alive state.

Safety of the file server does not rest on string checks of the URL alone: each
request is percent-decoded segment by segment (``..``, ``.``, encoded slashes,
backslashes and NUL are refused outright), the resolved path must lie under the root,
and so must the file actually opened, by the kernel's own name for it. Symbolic links
inside the root work; a link that leads out of it is a 404.

Files are read into memory (websockets' :class:`~websockets.http11.Response` carries
its body as bytes), so the size served is bounded by ``max_file_size``; noVNC's
largest file is ~100 KiB. Larger files get 403 naming the limit: put a real web
server in front for downloads.
"""

from __future__ import annotations

import email.utils
import errno
import html
import mimetypes
import os
import stat
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus

import trio
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .config import Address, ConfigError
from .routing import ClientInfo, HttpRefusal, HttpResponder, RequestGate

DEFAULT_MAX_FILE_SIZE = 16 << 20
INDEX_FILES = ("index.html", "index.htm")
SAFE_METHODS = ("GET", "HEAD")

# Python's built-in table, not the system's mime.types (which differs between hosts),
# with the types a browser insists on: ES modules load only as JavaScript.
_TYPES = mimetypes.MimeTypes()
_TYPES.add_type("text/javascript", ".js")
_TYPES.add_type("text/javascript", ".mjs")
_TYPES.add_type("application/wasm", ".wasm")
_TYPES.add_type("image/svg+xml", ".svg")
_TYPES.add_type("application/json", ".json")


def content_type(name: str) -> str:
    kind, _ = _TYPES.guess_type(name, strict=False)
    if kind is None:
        return "application/octet-stream"
    if kind.startswith("text/") or kind in ("application/json", "image/svg+xml"):
        return f"{kind}; charset=utf-8"
    return kind


def http_response(
    status: int,
    body: bytes = b"",
    *,
    content_type: str | None = "text/plain; charset=utf-8",
    headers: Iterable[tuple[str, str]] = (),
    head: bool = False,
    content_length: int | None = None,
) -> Response:
    """A complete response that closes the connection.

    For HEAD (``head=True``) the headers describe the body (``content_length``, by
    default ``len(body)``) but no body is sent: websockets' serializer writes the
    headers exactly as given, then ``Response.body``, which is left empty.
    A 304 has neither body nor Content-Length (RFC 9110 15.4.5).
    """
    code = HTTPStatus(status)
    fields = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            # Error bodies quote the request path: never let a browser sniff them as HTML.
            ("X-Content-Type-Options", "nosniff"),
        ]
    )
    if code is not HTTPStatus.NOT_MODIFIED:
        length = len(body) if content_length is None else content_length
        fields["Content-Length"] = str(length)
        if content_type is not None:
            fields["Content-Type"] = content_type
    for name, value in headers:
        fields[name] = value
    if head or code is HTTPStatus.NOT_MODIFIED:
        body = b""
    return Response(code.value, code.phrase, fields, body)


def text_response(
    status: int, text: str, *, headers: Iterable[tuple[str, str]] = (), head: bool = False
) -> Response:
    """A plain-text answer whose first line names the cause (the server logs that line)."""
    return http_response(status, f"{text}\n".encode(), headers=headers, head=head)


def method_not_allowed(method: str) -> Response:
    return text_response(
        HTTPStatus.METHOD_NOT_ALLOWED,
        f"method {method} is not allowed here (only GET and HEAD)",
        headers=[("Allow", ", ".join(SAFE_METHODS))],
    )


def refusal_response(refusal: HttpRefusal, *, head: bool = False) -> Response:
    return text_response(refusal.status, refusal.reason, headers=refusal.headers, head=head)


def split_target(target: str) -> tuple[str, str]:
    """``/a/b?x=1`` -> (``/a/b``, ``x=1``); a fragment (never sent by browsers) is dropped."""
    path, _, query = target.partition("?")
    path = path.partition("#")[0]
    return path, query.partition("#")[0]


# -- the file server -------------------------------------------------------------------


class BadPath(Exception):
    """The request target cannot name a file under the root (400)."""


def decode_segments(path: str) -> list[str]:
    """Percent-decode a URL path into file-name segments, refusing anything that could
    step outside the folder it names. Empty segments (``//``) are dropped."""
    if not path.startswith("/"):
        raise BadPath("the request target must be an absolute path")
    segments: list[str] = []
    for raw in path.split("/"):
        try:
            name = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise BadPath("the path is not valid UTF-8") from None
        if name in (".", ".."):
            raise BadPath("the path has a '.' or '..' segment")
        if "/" in name or "\\" in name:
            raise BadPath("the path has an encoded slash or a backslash")
        if "\x00" in name:
            raise BadPath("the path has a NUL byte")
        if name:
            segments.append(name)
    return segments


@dataclass(frozen=True)
class Lookup:
    """What the request conditions need to answer one GET or HEAD."""

    method: str
    url_path: str
    query: str
    if_none_match: str | None
    if_modified_since: str | None

    @property
    def head(self) -> bool:
        return self.method == "HEAD"


def etag_of(st: os.stat_result) -> str:
    return f'"{st.st_mtime_ns:x}-{st.st_size:x}"'


def not_modified(lookup: Lookup, st: os.stat_result) -> bool:
    """RFC 9110 13.1.2 / 13.1.3: If-None-Match (weak comparison) wins over If-Modified-Since."""
    if lookup.if_none_match is not None:
        ours = etag_of(st)
        tags = [tag.strip().removeprefix("W/") for tag in lookup.if_none_match.split(",")]
        return "*" in tags or ours in tags
    if lookup.if_modified_since is not None:
        try:
            since = email.utils.parsedate_to_datetime(lookup.if_modified_since)
        except (TypeError, ValueError):
            return False
        return int(st.st_mtime) <= since.timestamp()
    return False


class FileServer:
    """Answers GET and HEAD with files under ``root``; every other plain request is refused.

    ``gates`` (auth plugins, ``--web-auth``) are asked first about every request, as the
    server asks them about WebSocket requests. They see the client's address only: the
    :class:`~trio_bridge.routing.HttpResponder` interface carries no TLS identity.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        listing: bool = False,
        gates: Sequence[RequestGate] = (),
        max_file_size: int = DEFAULT_MAX_FILE_SIZE,
        index_files: Sequence[str] = INDEX_FILES,
    ) -> None:
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise ConfigError(f"--web: {root} is not a folder")
        self.root = real
        self._prefix = real.rstrip("/") + "/"
        self.listing = listing
        self.gates = list(gates)
        self.max_file_size = max_file_size
        self.index_files = tuple(index_files)
        # Bounds the files read at once (threads and memory), not the connections.
        self._limiter = trio.CapacityLimiter(8)

    async def respond(self, request: Request, client: str) -> Response:
        head = request.method == "HEAD"
        try:
            for gate in self.gates:
                await gate.check(request, ClientInfo(client))
        except HttpRefusal as refusal:
            return refusal_response(refusal, head=head)
        if request.method not in SAFE_METHODS:
            return method_not_allowed(request.method)
        url_path, query = split_target(request.path)
        try:
            segments = decode_segments(url_path)
        except BadPath as exc:
            return text_response(HTTPStatus.BAD_REQUEST, f"bad path: {exc}", head=head)
        lookup = Lookup(
            method=request.method,
            url_path=url_path,
            query=query,
            if_none_match=request.headers.get("If-None-Match"),
            if_modified_since=request.headers.get("If-Modified-Since"),
        )
        return await trio.to_thread.run_sync(self._answer, segments, lookup, limiter=self._limiter)

    # -- everything below runs in a worker thread: it blocks on the file system ---------

    def _inside(self, real: str) -> bool:
        """Is this absolute, link-free path the root or under it?"""
        return real == self.root or real.startswith(self._prefix)

    def _answer(self, segments: list[str], lookup: Lookup) -> Response:
        if any(name.startswith(".") for name in segments):
            return self._not_found(lookup)
        real = os.path.realpath(os.path.join(self.root, *segments))
        if not self._inside(real):
            return self._not_found(lookup)
        try:
            st = os.stat(real)
        except OSError:
            return self._not_found(lookup)
        if stat.S_ISDIR(st.st_mode):
            return self._directory(real, segments, lookup)
        return self._file(real, lookup)

    def _not_found(self, lookup: Lookup) -> Response:
        return text_response(HTTPStatus.NOT_FOUND, f"{lookup.url_path} not found", head=lookup.head)

    def _directory(self, real: str, segments: list[str], lookup: Lookup) -> Response:
        if not lookup.url_path.endswith("/"):
            # Relative links in an index page resolve against the folder only with the slash.
            # The location is rebuilt from the checked segments: echoing the request's own
            # path could redirect "//host" off-site.
            path = "".join(f"/{urllib.parse.quote(name)}" for name in segments) + "/"
            location = path + (f"?{lookup.query}" if lookup.query else "")
            return text_response(
                HTTPStatus.MOVED_PERMANENTLY,
                f"moved to {location}",
                headers=[("Location", location)],
                head=lookup.head,
            )
        for name in self.index_files:
            candidate = os.path.join(real, name)
            if os.path.isfile(candidate):
                return self._file(os.path.realpath(candidate), lookup)
        if not self.listing:
            return text_response(
                HTTPStatus.FORBIDDEN,
                f"{lookup.url_path}: directory listing is off (--web-listing turns it on)",
                head=lookup.head,
            )
        return self._listing(real, lookup)

    def _listing(self, real: str, lookup: Lookup) -> Response:
        entries: list[str] = []
        with os.scandir(real) as scan:
            for entry in scan:
                if entry.name.startswith("."):
                    continue
                target = os.path.realpath(entry.path)
                if not self._inside(target):
                    continue  # a link out of the root is not served, so not listed
                shown = entry.name + ("/" if os.path.isdir(target) else "")
                entries.append(shown)
        title = html.escape(f"Index of {urllib.parse.unquote(lookup.url_path)}")
        items = [] if lookup.url_path == "/" else ['<li><a href="../">../</a></li>']
        for shown in sorted(entries):
            href = urllib.parse.quote(shown)
            items.append(f'<li><a href="{href}">{html.escape(shown)}</a></li>')
        page = (
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>\n'
            f"<body><h1>{title}</h1>\n<ul>\n" + "\n".join(items) + "\n</ul></body></html>\n"
        )
        return http_response(
            HTTPStatus.OK,
            page.encode(),
            content_type="text/html; charset=utf-8",
            headers=[("Cache-Control", "no-cache")],
            head=lookup.head,
        )

    def _file(self, real: str, lookup: Lookup) -> Response:
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                return text_response(
                    HTTPStatus.FORBIDDEN, f"{lookup.url_path}: permission denied", head=lookup.head
                )
            return self._not_found(lookup)
        try:
            st = os.fstat(fd)
            # realpath() and open() are two steps: a folder swapped for a link in between
            # would lead open() elsewhere. The kernel's name for the open file settles it.
            if not stat.S_ISREG(st.st_mode) or not self._inside(opened_path(fd)):
                return self._not_found(lookup)
            validators = [
                ("ETag", etag_of(st)),
                ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)),
                # Revalidate every time (a 304 is cheap): after a noVNC upgrade the
                # browser must not mix cached modules of the old version with the new.
                ("Cache-Control", "no-cache"),
            ]
            if not_modified(lookup, st):
                return http_response(HTTPStatus.NOT_MODIFIED, headers=validators)
            if st.st_size > self.max_file_size:
                return text_response(
                    HTTPStatus.FORBIDDEN,
                    f"{lookup.url_path} is larger than the {self.max_file_size}-byte limit "
                    "of this file server",
                    head=lookup.head,
                )
            return http_response(
                HTTPStatus.OK,
                b"" if lookup.head else read_exactly(fd, st.st_size),
                content_type=content_type(real),
                headers=validators,
                head=lookup.head,
                content_length=st.st_size,
            )
        finally:
            os.close(fd)


def opened_path(fd: int) -> str:
    """Where an open file is, as the kernel sees it (Linux /proc; "" when unknown)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def read_exactly(fd: int, size: int) -> bytes:
    """``size`` bytes of the file: a file that shrinks meanwhile is padded with NULs so
    the Content-Length already decided stays true (the ETag changes with the file)."""
    chunks: list[bytes] = []
    left = size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks) + bytes(left)


# -- health -----------------------------------------------------------------------------

#: A health check returns what is wrong, or None when all is well.
HealthCheck = Callable[[], str | None]


class HealthEndpoint:
    """``GET /healthz`` for load balancers: 200 ``ok``, or 503 listing what is wrong.

    It answers before any gate (a load balancer has no credentials) and says nothing
    about sessions or targets beyond the failing checks' one-line descriptions.
    """

    def __init__(self, path: str = "/healthz", checks: Sequence[HealthCheck] = ()) -> None:
        if not path.startswith("/"):
            raise ConfigError(f"--health-path: {path!r} must start with /")
        self.path = path
        self.checks = list(checks)

    def add_check(self, check: HealthCheck) -> None:
        self.checks.append(check)

    async def respond(self, request: Request, client: str) -> Response | None:
        if split_target(request.path)[0] != self.path:
            return None
        head = request.method == "HEAD"
        if request.method not in SAFE_METHODS:
            return method_not_allowed(request.method)
        problems = [problem for check in self.checks if (problem := check()) is not None]
        no_store = [("Cache-Control", "no-store")]
        if problems:
            return text_response(
                HTTPStatus.SERVICE_UNAVAILABLE, "; ".join(problems), headers=no_store, head=head
            )
        return text_response(HTTPStatus.OK, "ok", headers=no_store, head=head)


# -- composition ----------------------------------------------------------------------


class FirstAnswer:
    """Asks responders in order; the first one with a response answers the request."""

    def __init__(self, *responders: HttpResponder) -> None:
        self.responders = list(responders)

    async def respond(self, request: Request, client: str) -> Response | None:
        for responder in self.responders:
            response = await responder.respond(request, client)
            if response is not None:
                return response
        return None


class NoRelay:
    """The resolver of ``--file-only``: no WebSocket request reaches any target."""

    def __str__(self) -> str:
        return "nothing (--file-only)"

    async def resolve(self, request: Request, client: str) -> Address:
        raise HttpRefusal(
            HTTPStatus.FORBIDDEN, "this server only serves files (--file-only): no WebSocket relay"
        )
