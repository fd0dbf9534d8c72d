"""JWT-SVID identities for agent containers: an ES256 issuer and a caching verifier.

The issuer signs short-lived JWT-SVIDs (``sub`` = ``spiffe://<trust-domain>/agent/<name>``)
with a P-256 key kept on disk, and publishes its public keys as a SPIFFE JWT bundle (JWKS).
The verifier checks tokens with py-spiffe against per-trust-domain bundles, caches each valid
token until it expires, and refuses tokens of stopped container instances.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain
from spiffe.errors import PySpiffeError

from gateway.errors import ConfigError, ExpiredToken, InvalidToken, RevokedToken, Unauthorized
from gateway.ids import token_urlsafe

log = logging.getLogger(__name__)

INSTANCE_CLAIM = "gw_instance"
MAX_TOKEN_BYTES = 8192
# The SPIFFE JWT-SVID spec's allow-list; py-spiffe enforces the same, we check first to
# give a precise message and to never hand an HS*/none token to the library.
ALLOWED_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
_KEY_FILE_RE = re.compile(r"^jwt-svid-(\d+)-([A-Za-z0-9_-]{43})\.pem$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    """A freshly minted JWT-SVID and what it says."""

    token: str
    spiffe_id: str
    expires_at: float
    kid: str
    jti: str


@dataclass(frozen=True, slots=True)
class VerifiedIdentity:
    """Who presented a valid JWT-SVID; ``agent`` is set for ``/agent/<name>`` paths only."""

    spiffe_id: str
    trust_domain: str
    agent: str | None
    instance_id: str | None
    expires_at: float
    jti: str | None


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()


def _public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The key's JWK members, kid = RFC 7638 thumbprint (stable across restarts and hosts)."""
    nums = key.public_numbers()
    jwk = {"crv": "P-256", "kty": "EC", "x": _b64(nums.x), "y": _b64(nums.y)}
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
    kid = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
    return {"kty": "EC", "crv": "P-256", "x": jwk["x"], "y": jwk["y"], "kid": kid}


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    created_ms: int
    private: ec.EllipticCurvePrivateKey
    jwk: dict[str, str]
    path: Path


class SvidIssuer:
    """Mints ES256 JWT-SVIDs with a signing key persisted (mode 0600) in ``key_dir``."""

    def __init__(
        self,
        key_dir: Path,
        trust_domain: str,
        audience: str,
        *,
        max_ttl_s: int = 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key_dir = Path(key_dir)
        self.trust_domain = TrustDomain(trust_domain).name
        self.audience = audience
        self.max_ttl_s = max_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._keys = self._load()  # oldest first; the last one signs
        if not self._keys:
            self._keys = [self._create_key()]
        self._prune()

    @property
    def kid(self) -> str:
        """The key id new tokens are signed with."""
        return self._keys[-1].kid

    def mint(self, agent: str, instance_id: str, ttl_s: int = 300) -> IssuedSvid:
        """Sign a JWT-SVID for ``agent`` bound to container ``instance_id``."""
        if not _NAME_RE.match(agent) or agent in (".", ".."):
            raise ValueError(f"agent name {agent!r} is not a valid SPIFFE path segment")
        if not instance_id:
            raise ValueError("instance_id cannot be empty")
        if not 0 < ttl_s <= self.max_ttl_s:
            raise ValueError(f"ttl_s must be in 1..{self.max_ttl_s}")
        key = self._keys[-1]
        now = int(self._clock())
        spiffe_id = f"spiffe://{self.trust_domain}/agent/{agent}"
        jti = token_urlsafe(16)
        claims = {
            "sub": spiffe_id,
            "aud": [self.audience],
            "iat": now,
            "exp": now + ttl_s,
            "jti": jti,
            INSTANCE_CLAIM: instance_id,
        }
        token = jwt.encode(
            claims, key.private, algorithm="ES256", headers={"kid": key.kid, "typ": "JWT"}
        )
        return IssuedSvid(token, spiffe_id, float(now + ttl_s), key.kid, jti)

    def rotate(self) -> str:
        """Switch to a new signing key, keep older ones published until their tokens expired."""
        with self._lock:
            self._keys = [*self._keys, self._create_key()]
            self._prune()
        for listener in list(self._listeners):
            listener()
        return self.kid

    def jwks(self) -> dict[str, Any]:
        """The JWT bundle as a SPIFFE JWKS document (``use: jwt-svid`` on every key)."""
        return {"keys": [{**k.jwk, "use": "jwt-svid"} for k in self._keys]}

    def on_rotate(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each rotation (verifiers refresh their bundle with it)."""
        self._listeners.append(callback)

    def _load(self) -> list[_Key]:
        keys: list[_Key] = []
        if not self.key_dir.is_dir():
            return keys
        for path in self.key_dir.iterdir():
            m = _KEY_FILE_RE.match(path.name)
            if not m:
                continue
            if path.stat().st_mode & 0o077:
                log.warning("tightening permissions of %s to 0600", path)
                os.chmod(path, 0o600)
            try:
                private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"not a usable private key: {e}", location=str(path)) from e
            if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
                private.curve, ec.SECP256R1
            ):
                raise ConfigError("JWT-SVID keys must be P-256 EC keys", location=str(path))
            jwk = _public_jwk(private.public_key())
            # A renamed or swapped file would publish a kid that no token can match.
            if jwk["kid"] != m.group(2):
                raise ConfigError(
                    "file name does not match the key's thumbprint", location=str(path)
                )
            keys.append(_Key(jwk["kid"], int(m.group(1)), private, jwk, path))
        keys.sort(key=lambda k: (k.created_ms, k.kid))
        return keys

    def _create_key(self) -> _Key:
        self.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = _public_jwk(private.public_key())
        # Strictly increasing so the newest key is also the current one after a restart.
        created = int(self._clock() * 1000)
        if self._keys:
            created = max(created, self._keys[-1].created_ms + 1)
        path = self.key_dir / f"jwt-svid-{created}-{jwk['kid']}.pem"
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd, tmp = tempfile.mkstemp(dir=self.key_dir, prefix=".jwt-svid-")  # created 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return _Key(jwk["kid"], created, private, jwk, path)

    def _prune(self) -> None:
        # A key retired when its successor was made; its last token expires max_ttl_s later.
        now_ms = int(self._clock() * 1000)
        keep = [self._keys[-1]]
        for old, successor in zip(self._keys[:-1], self._keys[1:], strict=True):
            if successor.created_ms + self.max_ttl_s * 1000 < now_ms:
                old.path.unlink(missing_ok=True)
            else:
                keep.append(old)
        self._keys = sorted(keep, key=lambda k: (k.created_ms, k.kid))


def _parse_jwks(trust_domain: TrustDomain, jwks: Any) -> JwtBundle:
    """A JwtBundle from a JWKS dict; refuses bad keys instead of skipping them like PyJWKSet."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ConfigError(f"bundle of '{trust_domain.name}' is not a JWKS document")
    authorities: dict[str, Any] = {}
    for i, raw in enumerate(jwks["keys"]):
        # SPIFFE bundles also carry x509-svid roots (no kid); they do not sign JWTs.
        if not isinstance(raw, dict) or raw.get("use", "jwt-svid") != "jwt-svid":
            continue
        kid = raw.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ConfigError(f"bundle of '{trust_domain.name}': key #{i} has no kid")
        try:
            authorities[kid] = jwt.PyJWK(raw).key
        except jwt.PyJWTError as e:
            raise ConfigError(f"bundle of '{trust_domain.name}': key {kid!r}: {e}") from e
    return JwtBundle(trust_domain, authorities)


def _expired(exp: float) -> ExpiredToken:
    when = dt.datetime.fromtimestamp(exp, dt.UTC).isoformat(timespec="seconds")
    return ExpiredToken(f"token expired at {when}")


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, unverified. Not PyJWT's parser: it spends ~40 µs per call."""
    try:
        parts = token.split(".")
        if len(parts) != 3:
            raise ValueError("a JWS has three segments")
        header, claims = (
            json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in parts[:2]
        )
    except (ValueError, TypeError, RecursionError) as e:
        raise InvalidToken("token is not a well-formed JWT") from e
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidToken("token is not a well-formed JWT")
    return header, claims


def _q(value: object) -> str:
    """Quote an attacker-supplied value for a message: bounded and with escapes."""
    return repr(str(value)[:64])


class TokenVerifier:
    """Validates JWT-SVIDs for ``audience`` against trusted bundles, caching valid tokens."""

    def __init__(
        self,
        audience: str,
        bundles: dict[str, dict[str, Any]] | None = None,
        *,
        is_instance_active: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
        max_ttl_s: int = 3600,
        cache_size: int = 10_000,
    ) -> None:
        self.audience = audience
        self._audience_set = {audience}
        self._is_active = is_instance_active
        self._clock = clock
        self._max_ttl_s = max_ttl_s
        self._cache_size = cache_size
        self._cache: dict[str, VerifiedIdentity] = {}
        self._revoked: dict[str, float] = {}  # instance id -> when the entry may be dropped
        self._bundles: dict[str, JwtBundle] = {}
        self._generation = 0  # bumped on every bundle change
        self._lock = threading.Lock()
        for trust_domain, jwks in (bundles or {}).items():
            self.add_bundle(trust_domain, jwks)

    def add_bundle(self, trust_domain: str, jwks: dict[str, Any]) -> None:
        """Trust (or replace) the JWKS bundle of ``trust_domain``."""
        try:
            td = TrustDomain(trust_domain)
        except PySpiffeError as e:
            raise ConfigError(f"invalid trust domain {trust_domain!r}: {e}") from e
        bundle = _parse_jwks(td, jwks)
        with self._lock:
            self._bundles[td.name] = bundle
            # A key may have left the bundle: cached tokens must be re-checked.
            self._cache.clear()
            self._generation += 1

    def load_bundle_file(self, path: Path, trust_domain: str) -> None:
        """Trust the JWKS JSON file at ``path`` (e.g. from a SPIRE server) for ``trust_domain``."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read trust bundle: {e.strerror}", location=str(path)) from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid JSON: {e.msg}", location=f"{path}:{e.lineno}") from e
        try:
            self.add_bundle(trust_domain, doc)
        except ConfigError as e:
            raise ConfigError(e.message, location=str(path)) from e

    def track_issuer(self, issuer: SvidIssuer) -> None:
        """Trust ``issuer``'s bundle and refresh it whenever the issuer rotates its key."""
        self.add_bundle(issuer.trust_domain, issuer.jwks())
        issuer.on_rotate(lambda: self.add_bundle(issuer.trust_domain, issuer.jwks()))

    def revoke_instance(self, instance_id: str) -> None:
        """Refuse every token bound to ``instance_id`` from now on (its container stopped)."""
        now = self._clock()
        with self._lock:
            # Tokens live at most max_ttl_s, so older entries guard nothing any more. Every
            # entry lives max_ttl_s from its revocation, so the dict is in the order they
            # expire: pruning stops at the first live one (a scan of every revocation of
            # the last hour, on every task's end, grew with the dispatch rate).
            while self._revoked:
                oldest = next(iter(self._revoked))
                if self._revoked[oldest] >= now:
                    break
                del self._revoked[oldest]
            self._revoked.pop(instance_id, None)  # revoked again: to the back, a new end
            self._revoked[instance_id] = now + self._max_ttl_s

    def verify(self, token: str) -> VerifiedIdentity:
        """The identity in a valid JWT-SVID, or an Unauthorized subclass saying what is wrong."""
        ident = self._cache.get(token)
        if ident is None:
            generation = self._generation
            ident = self._validate(token)
            self._check_active(ident)
            with self._lock:
                # Validated against a bundle replaced meanwhile (another thread): don't keep it.
                if generation == self._generation:
                    if len(self._cache) >= self._cache_size:
                        self._evict()
                    self._cache[token] = ident
            return ident
        if ident.expires_at <= self._clock():
            self._cache.pop(token, None)
            raise _expired(ident.expires_at)
        self._check_active(ident)
        return ident

    def _check_active(self, ident: VerifiedIdentity) -> None:
        iid = ident.instance_id
        if iid is not None and (
            iid in self._revoked or (self._is_active is not None and not self._is_active(iid))
        ):
            raise RevokedToken(f"container instance {_q(iid)} is no longer running")

    def _evict(self) -> None:
        now = self._clock()
        for tok in [t for t, i in self._cache.items() if i.expires_at <= now]:
            del self._cache[tok]
        while len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]  # oldest insertion first

    def _validate(self, token: str) -> VerifiedIdentity:
        if not token:
            raise Unauthorized("no token was presented")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("token is not a well-formed JWT")
        # The cheap checks come first so each failure gets a precise reason; the library
        # then repeats them strictly together with the signature, audience and expiry checks.
        header, claims = _peek(token)
        kid = _check_header(header)
        spiffe_id = _subject_of(claims)
        td = spiffe_id.trust_domain.name
        bundle = self._bundles.get(td)
        if bundle is None:
            raise InvalidToken(f"trust domain {_q(td)} is not trusted")
        if bundle.get_jwt_authority(kid) is None:
            raise InvalidToken(f"unknown key id {_q(kid)} for trust domain {_q(td)}")
        self._check_lifetime(claims)
        instance = claims.get(INSTANCE_CLAIM)
        if instance is not None and not isinstance(instance, str):
            raise InvalidToken(f"{INSTANCE_CLAIM} claim is not a string")

        try:
            svid = JwtSvid.parse_and_validate(token, bundle, self._audience_set)
        except Exception as e:  # py-spiffe leaks KeyError and friends: never let them out
            raise self._translate(e) from e

        segments = spiffe_id.path.split("/")
        agent = segments[2] if len(segments) == 3 and segments[1] == "agent" else None
        jti = claims.get("jti")
        return VerifiedIdentity(
            spiffe_id=str(svid.spiffe_id),
            trust_domain=td,
            agent=agent,
            instance_id=instance,
            expires_at=float(svid.expiry),
            jti=jti if isinstance(jti, str) else None,
        )

    def _check_lifetime(self, claims: dict[str, Any]) -> None:
        exp = claims.get("exp")
        if exp is None:
            raise InvalidToken("token has no exp claim")
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise InvalidToken("exp claim is not an integer")
        now = self._clock()
        if exp <= now:
            raise _expired(exp)
        if exp > now + self._max_ttl_s + 60:
            raise InvalidToken(f"token lifetime exceeds the maximum of {self._max_ttl_s}s")

    def _translate(self, e: Exception) -> InvalidToken:
        # py-spiffe wraps PyJWT's errors in InvalidTokenError; the cause says what failed.
        cause = e.__cause__ if isinstance(e.__cause__, jwt.PyJWTError) else e
        if isinstance(cause, jwt.ExpiredSignatureError):
            return ExpiredToken("token has expired")  # by the wall clock, not ours
        if isinstance(cause, jwt.InvalidAudienceError):
            return InvalidToken(f"token audience does not include {_q(self.audience)}")
        if isinstance(cause, jwt.MissingRequiredClaimError):
            return InvalidToken(f"token has no {cause.claim} claim")
        if isinstance(cause, jwt.ImmatureSignatureError):
            return InvalidToken("token is not valid yet (nbf is in the future)")
        if isinstance(cause, jwt.InvalidSignatureError | jwt.InvalidKeyError):
            return InvalidToken("token signature is invalid")
        if isinstance(cause, jwt.DecodeError):
            return InvalidToken("token is not a well-formed JWT")
        if isinstance(cause, KeyError):
            return InvalidToken(f"token has no {cause.args[0] if cause.args else 'required'} claim")
        if isinstance(cause, jwt.PyJWTError | PySpiffeError):
            return InvalidToken(f"token is invalid: {cause}")
        return InvalidToken("token could not be validated")


def _check_header(header: dict[str, Any]) -> str:
    """The header's kid, once alg and typ are ones we accept."""
    alg = header.get("alg")
    if alg not in ALLOWED_ALGS:
        raise InvalidToken(f"alg {_q(alg)} is not allowed")
    if header.get("typ", "JWT") not in ("JWT", "JOSE"):
        raise InvalidToken(f"typ {_q(header.get('typ'))} is not allowed")
    kid = header.get("kid")
    if not kid or not isinstance(kid, str):
        raise InvalidToken("token header has no kid")
    return kid


def _subject_of(claims: dict[str, Any]) -> SpiffeId:
    sub = claims.get("sub")
    if not sub or not isinstance(sub, str):
        raise InvalidToken("token has no sub claim")
    try:
        return SpiffeId(sub)
    except PySpiffeError as e:
        raise InvalidToken(f"sub {_q(sub)} is not a valid SPIFFE ID") from e
