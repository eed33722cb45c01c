"""TLS on the listening port (ws:// and wss:// on one port) and towards the target.

Python's :mod:`ssl` does the cryptography and :class:`trio.SSLStream` the I/O; this
module only decides *whether* a connection speaks TLS and with which context.

Like websockify, one port serves both schemes: a TLS ClientHello always starts with
the handshake record type ``0x16``, a byte no HTTP request line starts with, so a
``MSG_PEEK`` of the first byte tells them apart without consuming anything.

Contexts are built from files when the bridge starts and again on :meth:`reload`
(SIGHUP): a connection takes the context current at its accept, so a renewed
certificate applies to new connections while open sessions keep theirs.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
from typing import Any

import trio

from .addresses import Address, TcpAddress
from .config import TLS_VERSIONS, TargetTlsSettings, TlsSettings
from .errors import ConfigError, StartupError
from .routing import ClientInfo
from .transport import StreamTransport, Transport

log = logging.getLogger("trio_bridge.tls")

TLS_HANDSHAKE_RECORD = 0x16


class TlsFailure(Exception):
    """A TLS handshake failed; ``str()`` says why in words, for the log."""


class CertificateError(ConfigError, StartupError):
    """A certificate, key or CA file that cannot be used, named with what to do about it.

    A :class:`StartupError`, so the CLI exits 1 with this one line (the files are read
    when the bridge starts, not when its arguments are parsed); a :class:`ConfigError`,
    as a reload (SIGHUP) that meets one keeps the previous files.
    """


class _Passphrase(Exception):
    """Raised instead of letting OpenSSL prompt on the terminal for a key's passphrase."""


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----")
_PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----")
# PKCS#8 encryption, or the traditional (OpenSSL) PEM header of an encrypted key.
_PEM_ENCRYPTED = re.compile(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED")
PASSWORD_SOURCES = "file:PATH, env:NAME or credential:NAME"


def _file_error(flag: str, path: str, exc: OSError) -> CertificateError:
    return CertificateError(f"{flag} {path}: cannot read it: {exc.strerror or exc}")


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise _file_error(flag, path, exc) from None


def _ciphers_context(ciphers: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        raise ConfigError(f"--ssl-ciphers: no cipher matches {ciphers!r}") from None
    return context


def _check_pem(settings: TlsSettings) -> bytes:
    """Say what is missing from which file: OpenSSL says "PEM lib" for all of it.
    Returns the PEM text that holds the key."""
    cert = _read("--cert", settings.cert)
    if not _PEM_CERTIFICATE.search(cert):
        raise CertificateError(
            f"--cert {settings.cert}: no PEM certificate in this file "
            "(expected -----BEGIN CERTIFICATE-----)"
        )
    flag, path = ("--key", settings.key) if settings.key else ("--cert", settings.cert)
    key = _read(flag, path) if settings.key else cert
    if not _PEM_PRIVATE_KEY.search(key):
        where = "" if settings.key else ", and no --key names one"
        raise CertificateError(
            f"{flag} {path}: no PEM private key in this file{where} "
            "(expected -----BEGIN PRIVATE KEY-----)"
        )
    return key


def key_password(source: str) -> bytes:
    """The key's password from ``source`` (``--key-password``: ``file:PATH``,
    ``env:NAME`` or ``credential:NAME``, a file in systemd's ``$CREDENTIALS_DIRECTORY``),
    read anew at each (re)load. :class:`CertificateError` naming the source, never
    the password, when there is none to read."""
    kind, _, name = source.partition(":")
    flag = f"--key-password {source}"
    if kind == "env":
        value = os.environ.get(name)
        if value is None:
            raise CertificateError(f"{flag}: the environment variable {name} is not set")
        password = value.encode()
    else:
        path = name
        if kind == "credential":
            folder = os.environ.get("CREDENTIALS_DIRECTORY")
            if not folder:
                raise CertificateError(
                    f"{flag}: $CREDENTIALS_DIRECTORY is not set (systemd sets it for a "
                    f"unit with LoadCredential={name}:FILE)"
                )
            path = os.path.join(folder, name)
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise CertificateError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
        # One trailing newline is the file's, not the password's (echo, editors).
        password = data.removesuffix(b"\n").removesuffix(b"\r")
    if not password:
        raise CertificateError(f"{flag}: the password is empty")
    return password


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """A server context from ``settings``; :class:`ConfigError` naming the file on failure."""
    context = (
        _ciphers_context(settings.ciphers)
        if settings.ciphers
        else ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    )
    context.minimum_version = TLS_VERSIONS[settings.minimum_version]
    encrypted = bool(_PEM_ENCRYPTED.search(_check_pem(settings)))
    what = f"--cert {settings.cert}" + (f" / --key {settings.key}" if settings.key else "")
    source = settings.key_password

    def no_prompt() -> str:
        raise _Passphrase

    password = key_password(source) if source else no_prompt
    if source and not encrypted:
        log.warning("%s: the private key is not encrypted; --key-password is not used", what)
    try:
        context.load_cert_chain(settings.cert, settings.key, password=password)
    except _Passphrase:
        raise CertificateError(
            f"{what}: the private key is encrypted and trio-bridge cannot ask for its "
            "passphrase (decrypt it: openssl pkey -in KEY -out PLAIN-KEY); or give its "
            f"password with --key-password {PASSWORD_SOURCES}"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertificateError(
                f"{what}: the private key does not match the certificate"
            ) from None
        if source and encrypted:  # OpenSSL says "PEM lib" for a wrong password too
            raise CertificateError(
                f"{what}: the private key cannot be decrypted with the password from "
                f"--key-password {source} (wrong password?)"
            ) from None
        raise CertificateError(f"{what}: unusable certificate or key ({_reason(exc)})") from None
    except OSError as exc:
        raise _file_error("--cert/--key", settings.cert, exc) from None
    if settings.cafile:
        try:
            context.load_verify_locations(settings.cafile)
        except ssl.SSLError as exc:
            reason = _reason(exc)
            raise CertificateError(f"--cafile {settings.cafile}: no usable CA ({reason})") from None
        except OSError as exc:
            raise _file_error("--cafile", settings.cafile, exc) from None
        context.verify_mode = ssl.CERT_REQUIRED if settings.verify_client else ssl.CERT_OPTIONAL
    # Never negotiate h2: the WebSocket handshake here is HTTP/1.1. Renegotiation only
    # lets a client make the server redo expensive work on an established connection.
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


def _client_context(settings: TargetTlsSettings, *, check_hostname: bool) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=settings.cafile)
    except ssl.SSLError as exc:
        raise CertificateError(
            f"--ssl-target-cafile {settings.cafile}: no usable CA ({_reason(exc)})"
        ) from None
    except OSError as exc:
        raise _file_error("--ssl-target-cafile", str(settings.cafile), exc) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif not check_hostname:
        context.check_hostname = False
    return context


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code in words: CERTIFICATE_VERIFY_FAILED -> certificate verify failed."""
    detail = getattr(exc, "verify_message", None)
    reason = exc.reason or (exc.args[1] if len(exc.args) > 1 else str(exc))
    text = str(reason).lower().replace("_", " ")
    return f"{text}: {detail}" if detail else text


def describe_tls_error(exc: BaseException) -> str:
    """A one-line reason for a failed handshake, from Trio's wrapped error."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, ssl.SSLError):
        return _reason(cause)
    if cause is None:
        return "the peer closed the connection"
    return str(cause) or type(cause).__name__


async def sniff_tls(sock: socket.socket) -> bool | None:
    """Whether the client's first byte opens a TLS record; None when it closes first.

    The byte is only peeked: whoever reads next (the TLS layer or the HTTP parser)
    sees the stream from its start. Waits without limit: callers bound the time.
    """
    while True:
        try:
            head = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError:
            return None
        return head[0] == TLS_HANDSHAKE_RECORD if head else None


def sniff_tls_now(sock: socket.socket) -> bool | None:
    """:func:`sniff_tls` without waiting: None when nothing has arrived yet (or it closed)."""
    try:
        head = sock.recv(1, socket.MSG_PEEK)
    except OSError:
        return None
    return head[0] == TLS_HANDSHAKE_RECORD if head else None


class ServerTls:
    """The listening side's TLS: sniffing, the handshake, and the current context."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.context = server_context(settings)
        plain = "refused" if self.requires_tls else "served on the same port"
        log.info("TLS with certificate %s; plain ws:// %s", settings.cert, plain)

    @property
    def ssl_only(self) -> bool:
        return self.settings.ssl_only

    @property
    def requires_tls(self) -> bool:
        """Plain ws:// is refused: ``--ssl-only``, or a client certificate is mandatory
        (a plain connection would bypass the certificate check)."""
        return self.settings.ssl_only or self.settings.verify_client

    def reload(self) -> None:
        """Re-read certificate, key and CA files; raises :class:`ConfigError` and keeps
        serving with the previous ones when they are unusable."""
        self.context = server_context(self.settings)
        log.info("TLS: reloaded certificate %s", self.settings.cert)

    async def handshake(self, sock: socket.socket) -> trio.SSLStream[trio.SocketStream]:
        """Run the server handshake on an accepted socket; raises :class:`TlsFailure`.

        ``https_compatible``: a client that drops TCP without TLS close_notify is an
        ordinary end of stream, as browsers do it all the time; the WebSocket close
        handshake, not TLS, marks a clean end of a session.
        """
        stream = trio.SSLStream(
            trio.SocketStream(trio.socket.from_stdlib_socket(sock)),
            self.context,
            server_side=True,
            https_compatible=True,
        )
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            await trio.aclose_forcefully(stream)
            raise TlsFailure(f"TLS handshake failed: {describe_tls_error(exc)}") from exc
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream


class TargetTls:
    """``--ssl-target``: wraps a connected target stream in TLS."""

    def __init__(self, settings: TargetTlsSettings) -> None:
        self.settings = settings
        self._load()

    def _load(self) -> None:
        context = _client_context(self.settings, check_hostname=True)
        # A Unix-socket target has no host name to check unless one is configured.
        self.context_without_name = _client_context(self.settings, check_hostname=False)
        self.context = context

    def reload(self) -> None:
        """Re-read the target CA file; raises :class:`ConfigError` (keeping the old one)."""
        self._load()
        log.info("target TLS: reloaded CAs")

    async def wrap(
        self, stream: trio.SocketStream, target: Address
    ) -> trio.SSLStream[trio.SocketStream]:
        """TLS over a connected ``stream``; raises :class:`TlsFailure` naming the cause."""
        name = self.settings.server_name
        if name is None and isinstance(target, TcpAddress):
            name = target.host
        context = self.context if name is not None else self.context_without_name
        tls = trio.SSLStream(stream, context, server_hostname=name, https_compatible=True)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            await trio.aclose_forcefully(tls)
            raise TlsFailure(f"TLS handshake failed: {describe_tls_error(exc)}") from exc
        return tls


def client_info(transport: Transport, peer: str) -> ClientInfo:
    """What request gates may know about the client: its address and TLS identity."""
    stream = transport.stream if isinstance(transport, StreamTransport) else None
    if not isinstance(stream, trio.SSLStream):
        return ClientInfo(peer)
    certificate: dict[str, Any] | None = stream.getpeercert() or None
    return ClientInfo(peer, tls=True, certificate=certificate)
