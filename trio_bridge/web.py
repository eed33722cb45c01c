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

A file's body is never held in memory: :class:`FileServer` answers with a
:class:`FileResponse` that carries the open file, and the server sends it after the
headers with :func:`send_file` (sendfile(2) on a plain socket, 64 KiB chunks under TLS),
so forty slow readers of a large file cost forty descriptors, not forty copies.

Everything a client wrote that an answer quotes back (the path, the method) has its
control characters escaped (:func:`~trio_bridge.logs.escape`): an error body is shown to people too.
"""

from __future__ import annotations

import email.utils
import errno
import html
import mimetypes
import os
import socket
import stat
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType

import trio
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .addresses import Address
from .errors import ConfigError
from .logs import escape
from .netio import PEER_GONE, Fairness, sendfile
from .request_target import split_target
from .routing import ClientInfo, HttpRefusal, HttpResponder, RequestGate
from .transport import Transport

#: No limit by default: a file's size costs the bridge no memory (see :func:`send_file`).
DEFAULT_MAX_FILE_SIZE: int | None = None
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


# C0 controls, DEL, C1 controls and the Unicode line separators.
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
    headers exactly as given, then ``Response.body``, which is left empty (the
    :class:`HeadResponse` keeps the body's first line for the log).
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
    if code is HTTPStatus.NOT_MODIFIED:
        body = b""
    if head:
        cause = body.decode("utf-8", "replace").partition("\n")[0] or code.phrase
        return HeadResponse(code.value, code.phrase, fields, b"", cause=cause)
    return Response(code.value, code.phrase, fields, body)


@dataclass
class HeadResponse(Response):
    """The answer to a HEAD request: GET's headers, no body. ``cause`` is the first line
    GET's body would have had, so that the log names why a HEAD was refused too."""

    cause: str = field(default="", kw_only=True)


def text_response(
    status: int, text: str, *, headers: Iterable[tuple[str, str]] = (), head: bool = False
) -> Response:
    """A plain-text answer whose first line names the cause (the server logs that line).

    ``text`` may quote the request, so its control characters are escaped.
    """
    return http_response(status, f"{escape(text)}\n".encode(), headers=headers, head=head)


def method_not_allowed(method: str) -> Response:
    return text_response(
        HTTPStatus.METHOD_NOT_ALLOWED,
        f"method {method} is not allowed here (only GET and HEAD)",
        headers=[("Allow", ", ".join(SAFE_METHODS))],
    )


def refusal_response(refusal: HttpRefusal, *, head: bool = False) -> Response:
    return text_response(refusal.status, refusal.reason, headers=refusal.headers, head=head)


# -- the file server -------------------------------------------------------------------


class BadRequest(Exception):
    """The request cannot be answered as asked (400); the message names the cause."""


class BadPath(BadRequest):
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


def single_header(headers: Headers, name: str) -> str | None:
    """The one value of a header that must not repeat, or None when it is absent.

    Two ``If-None-Match`` (or ``If-Modified-Since``) lines leave no right answer to
    which one counts: the request is refused (400) rather than guessed at.
    """
    values = headers.get_all(name)
    if len(values) > 1:
        raise BadRequest(f"the {name} header is given {len(values)} times; send it once")
    return values[0] if values else None


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
        max_file_size: int | None = DEFAULT_MAX_FILE_SIZE,
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
        # Bounds the lookups (stat, open) running at once in threads, not the connections.
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
        try:
            lookup = Lookup(
                method=request.method,
                url_path=url_path,
                query=query,
                if_none_match=single_header(request.headers, "If-None-Match"),
                if_modified_since=single_header(request.headers, "If-Modified-Since"),
            )
        except BadRequest as exc:
            return text_response(HTTPStatus.BAD_REQUEST, str(exc), head=head)
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
        except OSError as exc:
            return self._unreadable(exc, lookup, "look this path up")
        if stat.S_ISDIR(st.st_mode):
            return self._directory(real, segments, lookup)
        return self._file(real, lookup)

    def _not_found(self, lookup: Lookup) -> Response:
        return text_response(HTTPStatus.NOT_FOUND, f"{lookup.url_path} not found", head=lookup.head)

    def _directory(self, real: str, segments: list[str], lookup: Lookup) -> Response:
        if not lookup.url_path.endswith("/"):
            # Relative links in an index page resolve against the folder only with the slash.
            # The location is rebuilt from the checked segments: echoing the request's own
            # path could redirect "//host" off-site. The query is kept, percent-encoded
            # where it holds what a header value cannot (control characters).
            path = "".join(f"/{urllib.parse.quote(name)}" for name in segments) + "/"
            query = urllib.parse.quote(lookup.query, safe=QUERY_SAFE)
            location = path + (f"?{query}" if query else "")
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

    def _unreadable(self, exc: OSError, lookup: Lookup, what: str) -> Response:
        """403 naming the cause when the service user may not read ``what``; else 404:
        the answer says no more about the file system than whether access was refused."""
        if exc.errno in (errno.EACCES, errno.EPERM):
            return text_response(
                HTTPStatus.FORBIDDEN,
                f"{lookup.url_path}: permission denied: the server cannot {what}",
                head=lookup.head,
            )
        return self._not_found(lookup)

    def _listing(self, real: str, lookup: Lookup) -> Response:
        entries: list[str] = []
        try:
            with os.scandir(real) as scan:
                for entry in scan:
                    if entry.name.startswith(".") or not utf8(entry.name):
                        continue  # a name that is not UTF-8 cannot be requested
                    target = os.path.realpath(entry.path)
                    if not self._inside(target):
                        continue  # a link out of the root is not served, so not listed
                    shown = entry.name + ("/" if os.path.isdir(target) else "")
                    entries.append(shown)
        except OSError as exc:
            return self._unreadable(exc, lookup, "list this folder")
        title = html.escape(escape(f"Index of {urllib.parse.unquote(lookup.url_path)}"))
        items = [] if lookup.url_path == "/" else ['<li><a href="../">../</a></li>']
        for shown in sorted(entries):
            href = urllib.parse.quote(shown)
            items.append(f'<li><a href="{href}">{html.escape(escape(shown))}</a></li>')
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
            return self._unreadable(exc, lookup, "open this file")
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
            if self.max_file_size is not None and st.st_size > self.max_file_size:
                return text_response(
                    HTTPStatus.FORBIDDEN,
                    f"{lookup.url_path} is larger than the {self.max_file_size}-byte limit "
                    "of this file server",
                    head=lookup.head,
                )
            response = http_response(
                HTTPStatus.OK,
                content_type=content_type(real),
                headers=validators,
                head=lookup.head,
                content_length=st.st_size,
            )
            if lookup.head:
                return response
            body = FileBody(fd, st.st_size)
            fd = -1  # the response owns the descriptor now
            return FileResponse(
                response.status_code, response.reason_phrase, response.headers, file=body
            )
        finally:
            if fd >= 0:
                os.close(fd)


def opened_path(fd: int) -> str:
    """Where an open file is, as the kernel sees it (Linux /proc; "" when unknown)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def utf8(name: str) -> bool:
    """Is this file name valid UTF-8 (os.scandir keeps other bytes as surrogates)?"""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


# -- sending a file -----------------------------------------------------------------------

#: What a query may hold as it is in a Location header (RFC 3986 pchar, "/", "?", and "%"
#: so that what the client already encoded stays as it was); the rest is percent-encoded.
QUERY_SAFE = "/?:@!$&'()*+,;=%"
#: Bytes read and encrypted at a time under TLS: the most a transfer holds in memory.
TLS_CHUNK = 64 << 10
#: Bytes handed to one sendfile(2) call: bounds how long one call can keep the event loop
#: (a cold page cache makes the call read the disk).
SENDFILE_CHUNK = 1 << 20


class FileBody:
    """An open file to send as a response body: its first ``size`` bytes (the size the
    Content-Length promised when it was opened); ``sent`` counts what went out.

    Closing is idempotent; a body dropped unsent still closes its descriptor when
    collected, so a response that never reaches :func:`send_file` cannot leak it.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.sent = 0

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> FileBody:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


@dataclass
class FileResponse(Response):
    """A 200 whose body is an open file rather than bytes.

    ``serialize()`` gives the header block alone (``body`` is empty; Content-Length is
    the file's size); the server writes it, then the body with :func:`send_file`, and
    closes the file (``with response.file:``) whatever happens to the connection.
    """

    file: FileBody = field(kw_only=True)


async def send_file(transport: Transport, body: FileBody, stall_timeout: float) -> str | None:
    """Send ``body`` to the client; None once all of it is sent, else why it was cut short.

    Memory does not grow with the file or with the client's pace: on a plain socket the
    kernel moves page-cache pages to the socket (sendfile(2), nothing in user space);
    under TLS one 64 KiB chunk at a time is read, encrypted and sent. A client that takes
    no data for ``stall_timeout`` seconds is given up, so a reader that stops cannot hold
    a connection and a descriptor for ever. The caller closes ``body``.
    """
    try:
        if transport.raw is not None:
            return await _sendfile(transport.raw, body, stall_timeout)
        return await _send_chunks(transport, body, stall_timeout)
    except PEER_GONE as exc:
        return f"the client went away ({exc.strerror or exc})"


def _stalled(stall_timeout: float) -> str:
    return f"the client took no data for {stall_timeout:g} s"


_SHRANK = "the file shrank while it was sent"


async def _sendfile(sock: socket.socket, body: FileBody, stall_timeout: float) -> str | None:
    fairness = Fairness()
    while body.sent < body.size:
        count = min(body.size - body.sent, SENDFILE_CHUNK)
        sent = 0
        with trio.move_on_after(stall_timeout) as waiting:
            sent = await sendfile(sock, body.fd, body.sent, count, fairness)
        if waiting.cancelled_caught:
            return _stalled(stall_timeout)
        if sent == 0:
            return _SHRANK
        body.sent += sent
    return None


async def _send_chunks(transport: Transport, body: FileBody, stall_timeout: float) -> str | None:
    while body.sent < body.size:
        chunk = os.pread(body.fd, min(body.size - body.sent, TLS_CHUNK), body.sent)
        if not chunk:
            return _SHRANK
        with trio.move_on_after(stall_timeout) as sending:
            await transport.send_all(chunk)
        if sending.cancelled_caught:
            return _stalled(stall_timeout)
        body.sent += len(chunk)
    return None


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
