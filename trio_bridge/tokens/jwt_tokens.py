"""websockify's JWTTokenApi: the token is a signed JWT whose claims name the target.

``--token-source`` is a key file, read as websockify reads it so existing set-ups
keep working:

- a PEM public key (RSA, EC, Ed25519/Ed448), or a private key whose public half is
  used: tokens must be signed with the matching asymmetric algorithm;
- anything else is a JWK ``k`` value, the base64url encoding of an HMAC secret of at
  least 32 bytes (RFC 7518 3.2; shorter secrets can be brute-forced offline, and
  anyone who can forge a token can pick the target, so they are refused at start).

Claims: ``host`` (string) and ``port`` (integer or digits); ``exp`` and ``nbf`` are
honoured when present; a token with an ``aud`` claim is refused (it was minted for
someone else). Which algorithms are accepted follows from the key type, never from
the token's header, which rules out algorithm-confusion and ``alg: none`` tokens.

The library is PyJWT: typed, maintained, explicit about algorithms. websockify uses
jwcrypto, which also decrypts JWE tokens; encrypted tokens are not supported here.
"""

from __future__ import annotations

import base64
import binascii
import logging
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from ..config import Address, ConfigError, TcpAddress
from ..routing import HttpRefusal
from .base import require_source

log = logging.getLogger("trio_bridge.tokens")

MIN_SECRET = 32
FORBIDDEN = 403

Key = Any  # bytes for HMAC, a cryptography public key otherwise


def _public_key(data: bytes) -> Any:
    try:
        return load_pem_public_key(data)
    except ValueError:
        return load_pem_private_key(data, password=None).public_key()


def load_key(path: Path) -> tuple[Key, list[str]]:
    """The verification key in ``path`` and the algorithms it may verify."""
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        try:
            key = _public_key(data)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"--token-source {path}: not a usable PEM key ({exc})") from None
        if isinstance(key, rsa.RSAPublicKey):
            return key, ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
        if isinstance(key, ec.EllipticCurvePublicKey):
            return key, ["ES256", "ES384", "ES512"]
        if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            return key, ["EdDSA"]
        raise ConfigError(f"--token-source {path}: unsupported key type {type(key).__name__}")
    text = data.strip().decode("ascii", "replace")
    try:
        secret = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"--token-source {path}: neither a PEM key nor a base64url HMAC secret"
        ) from None
    if len(secret) < MIN_SECRET:
        raise ConfigError(
            f"--token-source {path}: the HMAC secret is {len(secret)} bytes; at least "
            f"{MIN_SECRET} are needed (RFC 7518 3.2)"
        )
    return secret, ["HS256", "HS384", "HS512"]


def _claimed_target(claims: dict[str, Any]) -> Address | None:
    host, port = claims.get("host"), claims.get("port")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if not isinstance(host, str) or not host or not isinstance(port, int):
        return None
    if isinstance(port, bool) or not 0 < port < 65536:
        return None
    return TcpAddress(host, port)


class JwtTokens:
    def __init__(self, source: str | None) -> None:
        self.source = Path(require_source("JWTTokenApi", source, "KEY_FILE"))
        try:
            self.key, self.algorithms = load_key(self.source)
        except OSError as exc:
            raise ConfigError(f"--token-source {self.source}: {exc.strerror or exc}") from None

    def reload(self) -> None:
        """Re-read the key file (key rotation); raises :class:`ConfigError`, keeping the
        previous key, when it is unusable."""
        try:
            self.key, self.algorithms = load_key(self.source)
        except OSError as exc:
            raise ConfigError(f"JWT key {self.source}: {exc.strerror or exc}") from None
        log.info("JWT key %s reloaded", self.source)

    async def lookup(self, token: str) -> Address | None:
        try:
            claims = jwt.decode(token, self.key, algorithms=self.algorithms)
        except jwt.ExpiredSignatureError:
            raise HttpRefusal(FORBIDDEN, "Token expired") from None
        except jwt.ImmatureSignatureError:
            raise HttpRefusal(FORBIDDEN, "Token not valid yet") from None
        except jwt.InvalidTokenError as exc:
            log.info("JWT refused: %s", exc)
            raise HttpRefusal(FORBIDDEN, "Invalid token") from None
        target = _claimed_target(claims)
        if target is None:
            log.info("JWT refused: no usable 'host' and 'port' claims")
            raise HttpRefusal(FORBIDDEN, "Invalid token")
        return target
