"""websockify's JWTTokenApi: the token is a signed JWT whose claims name the target.

``--token-source`` says which key verifies the tokens:

- a file with a PEM public key (RSA, EC, Ed25519/Ed448), or a private key whose public
  half is used;
- a file with a JWK or a JWK set (JSON, RFC 7517), as identity providers publish them;
  in a set, the token header's ``kid`` picks the key, and a token naming no key of the
  set is refused;
- ``hmac:FILE``: a file holding an HMAC secret in base64url (a JWK ``k`` value, the
  form websockify reads). A JWK with ``"kty": "oct"`` is an HMAC secret too.

HMAC secrets are taken only when the operator says so. websockify took any file that
is not PEM for one, so an OpenSSH public key or a JWK of a public key became a secret
that every holder of the *public* key could sign tokens with, for any target. Such a
file is now a start-up error. Secrets must have at least 32 bytes (RFC 7518 3.2:
shorter ones can be brute-forced offline, and whoever forges a token picks the target).

Claims: ``host`` (string) and ``port`` (integer or digits); ``exp`` and ``nbf`` are
honoured when present. ``--jwt-audience`` and ``--jwt-issuer`` make ``aud`` and ``iss``
required and checked (``aud`` may be a list that names the audience); without
``--jwt-audience`` a token with an ``aud`` claim is refused (it was minted for someone
else), without ``--jwt-issuer`` ``iss`` is not looked at. Which algorithms are
accepted follows from the key type (or a JWK's ``alg``), never from the token's
header, which rules out algorithm confusion and ``alg: none`` tokens.

The library is PyJWT (its :class:`jwt.PyJWK` reads JWKs): typed, maintained, explicit
about algorithms. websockify uses jwcrypto, which also decrypts JWE tokens; encrypted
tokens are not supported here.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from ..addresses import Address, TcpAddress
from ..errors import ConfigError
from ..routing import HttpRefusal
from .base import describe_token, require_source

log = logging.getLogger("trio_bridge.tokens")

MIN_SECRET = 32
FORBIDDEN = 403
HMAC_PREFIX = "hmac:"
BASE64URL = re.compile(rb"[A-Za-z0-9_-]+={0,2}")
PRIVATE_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


@dataclass(frozen=True)
class VerificationKey:
    key: Any  # bytes for HMAC, a cryptography public key otherwise
    algorithms: list[str]


# By key id; the key None verifies every token (a PEM key, one JWK, an HMAC secret).
Keys = dict[str | None, VerificationKey]


def _verification_key(key: Any, where: str, alg: str | None = None) -> VerificationKey:
    """``key`` with the algorithms its type allows (only ``alg`` when the JWK names one)."""
    if isinstance(key, PRIVATE_KEYS):
        key = key.public_key()
    if isinstance(key, bytes):
        if len(key) < MIN_SECRET:
            raise ConfigError(
                f"{where}: the HMAC secret is {len(key)} bytes; at least {MIN_SECRET} are "
                "needed (RFC 7518 3.2)"
            )
        # RFC 7518 3.2: a key at least as long as the hash (32, 48, 64 bytes).
        family = [f"HS{bits}" for bits in (256, 384, 512) if len(key) * 8 >= bits]
    elif isinstance(key, rsa.RSAPublicKey):
        family = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    elif isinstance(key, ec.EllipticCurvePublicKey):
        family = ["ES256", "ES384", "ES512"]
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        family = ["EdDSA"]
    else:
        raise ConfigError(f"{where}: unsupported key type {type(key).__name__}")
    if alg is not None and alg not in family:
        raise ConfigError(f"{where}: 'alg' {alg!r} does not go with this key type")
    return VerificationKey(key, [alg] if alg else family)


def _pem_key(data: bytes, where: str) -> VerificationKey:
    try:
        try:
            key: Any = load_pem_public_key(data)
        except ValueError:
            key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: not a usable PEM key ({exc})") from None
    return _verification_key(key, where)


def _jwk_error(exc: Exception) -> str:
    """PyJWT's message without the JWK it sometimes appends (it may hold the secret)."""
    return str(exc).partition(": {")[0]


def _jwk_keys(document: Any, where: str) -> Keys:
    """The keys of a JWK (one key for every token) or a JWK set (by ``kid``).

    Like :class:`jwt.PyJWKSet`, a set's keys that PyJWT cannot use (an encryption key
    type) are skipped, with a warning here.
    """
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: JSON, but not a JWK or a JWK set (an object)")
    if "keys" not in document:
        return {None: _jwk_key(document, where)}
    keys: Keys = {}
    for raw in document["keys"] if isinstance(document["keys"], list) else ():
        kid = raw.get("kid") if isinstance(raw, dict) else None
        if not isinstance(kid, str) or kid in keys:
            raise ConfigError(f"{where}: each key of a JWK set needs its own 'kid'")
        try:
            keys[kid] = _jwk_key(raw, f"{where} (kid {kid!r})")
        except ConfigError as exc:
            log.warning("%s; key skipped", exc)
    if not keys:
        raise ConfigError(f"{where}: a JWK set without a usable key")
    return keys


def _jwk_key(raw: dict[str, Any], where: str) -> VerificationKey:
    try:
        jwk = jwt.PyJWK(raw)
    except jwt.PyJWTError as exc:
        raise ConfigError(f"{where}: not a usable JWK: {_jwk_error(exc)}") from None
    if raw.get("use", "sig") != "sig":
        raise ConfigError(f"{where}: a key for {raw.get('use')!r}, not for signatures")
    alg = raw.get("alg")
    return _verification_key(jwk.key, where, alg if isinstance(alg, str) else None)


def _hmac_secret(data: bytes, where: str) -> Keys:
    text = data.strip()
    if not BASE64URL.fullmatch(text):
        raise ConfigError(f"{where}: expected an HMAC secret in base64url (a JWK 'k' value)")
    secret = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    return {None: _verification_key(secret, where)}


def load_keys(path: Path, hmac: bool = False) -> Keys:
    """The verification keys in ``path`` (see the module docs); :class:`ConfigError`,
    in one line naming the file and what was expected, for anything else."""
    where = f"--token-source {HMAC_PREFIX if hmac else ''}{path}"
    data = path.read_bytes()
    if hmac:
        return _hmac_secret(data, where)
    if b"-----BEGIN" in data:
        return {None: _pem_key(data, where)}
    if data.lstrip().startswith(b"{"):
        try:
            document = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc})") from None
        return _jwk_keys(document, where)
    hint = " (an OpenSSH key: ssh-keygen -e -m PKCS8 -f FILE writes it as PEM)"
    raise ConfigError(
        f"{where}: expected a PEM key, a JWK or JWK set (JSON), or hmac:FILE for an HMAC "
        f"secret{hint if data.startswith(b'ssh-') else ''}"
    )


def _claimed_target(claims: dict[str, Any]) -> Address | None:
    host, port = claims.get("host"), claims.get("port")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if not isinstance(host, str) or not host or not isinstance(port, int):
        return None
    if isinstance(port, bool) or not 0 < port < 65536:
        return None
    return TcpAddress(host, port)


def _claim_refusal(exc: jwt.InvalidTokenError, audience: str | None, issuer: str | None) -> str:
    """Which claim failed, for the log: the expected value, never the token's."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        flag = {"aud": "--jwt-audience", "iss": "--jwt-issuer"}.get(exc.claim)
        return f"no {exc.claim!r} claim" + (f", which {flag} requires" if flag else "")
    if isinstance(exc, jwt.InvalidAudienceError):
        if audience is None:
            return "it has an 'aud' claim, and no --jwt-audience is set"
        return f"its 'aud' claim does not name the audience {audience!r}"
    if isinstance(exc, jwt.InvalidIssuerError):
        return f"its 'iss' claim is not the issuer {issuer!r}"
    return str(exc)


class JwtTokens:
    def __init__(
        self, source: str | None, *, audience: str | None = None, issuer: str | None = None
    ) -> None:
        """``audience`` and ``issuer``: the ``aud`` and ``iss`` a token must carry
        (``--jwt-audience``, ``--jwt-issuer``)."""
        source = require_source("JWTTokenApi", source, "KEY_FILE or hmac:SECRET_FILE")
        self.hmac = source.startswith(HMAC_PREFIX)
        self.source = Path(source.removeprefix(HMAC_PREFIX))
        self.audience = audience
        self.issuer = issuer
        self.required = [claim for claim, value in (("aud", audience), ("iss", issuer)) if value]
        self.keys = self._load()

    def _load(self) -> Keys:
        try:
            return load_keys(self.source, self.hmac)
        except OSError as exc:
            raise ConfigError(f"--token-source {self.source}: {exc.strerror or exc}") from None

    def reload(self) -> None:
        """Re-read the key file (key rotation); raises :class:`ConfigError`, keeping the
        previous keys, when it is unusable."""
        self.keys = self._load()
        log.info("JWT key %s reloaded: %d key(s)", self.source, len(self.keys))

    def _key_for(self, token: str) -> VerificationKey:
        """The key for ``token``: the one key, or the one of the set its ``kid`` names."""
        if None in self.keys:
            return self.keys[None]
        kid = jwt.get_unverified_header(token).get("kid")
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            shown = repr(kid)[:80] if kid is not None else "none"
            log.info("JWT refused: key id %s is not in %s", shown, self.source)
            raise HttpRefusal(FORBIDDEN, "Invalid token")
        return key

    async def lookup(self, token: str) -> Address | None:
        try:
            key = self._key_for(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=key.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": self.required},
            )
        except jwt.ExpiredSignatureError:
            raise HttpRefusal(FORBIDDEN, "Token expired") from None
        except jwt.ImmatureSignatureError:
            raise HttpRefusal(FORBIDDEN, "Token not valid yet") from None
        except jwt.InvalidTokenError as exc:
            reason = _claim_refusal(exc, self.audience, self.issuer)
            log.info("JWT %s refused: %s", describe_token(token), reason)
            raise HttpRefusal(FORBIDDEN, "Invalid token") from None
        target = _claimed_target(claims)
        if target is None:
            log.info("JWT refused: no usable 'host' and 'port' claims")
            raise HttpRefusal(FORBIDDEN, "Invalid token")
        return target
