"""JWT-SVID issuing and verification (gateway.identity.svid)."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from spiffe import JwtBundle, JwtSvid, TrustDomain

import gateway.identity.svid as identity
from gateway.errors import ConfigError, Unauthorized
from gateway.identity.svid import (
    ExpiredToken,
    InvalidToken,
    RevokedToken,
    SvidIssuer,
    TokenVerifier,
    VerifiedIdentity,
)

TD = "example.org"
AUD = "agent-gateway"


@pytest.fixture
def issuer(tmp_path: Path) -> SvidIssuer:
    return SvidIssuer(tmp_path / "keys", TD, AUD)


@pytest.fixture
def verifier(issuer: SvidIssuer) -> TokenVerifier:
    v = TokenVerifier(AUD)
    v.track_issuer(issuer)
    return v


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts calls into py-spiffe's parse_and_validate."""
    seen: list[str] = []
    real = JwtSvid.parse_and_validate

    def counting(token: str, bundle: JwtBundle, audience: set[str]) -> JwtSvid:
        seen.append(token)
        return real(token, bundle, audience)

    monkeypatch.setattr(identity.JwtSvid, "parse_and_validate", counting)
    return seen


def signing_key(issuer: SvidIssuer) -> bytes:
    """The PEM of the issuer's current key, read from disk like an attacker with the file."""
    (path,) = issuer.key_dir.glob(f"*-{issuer.kid}.pem")
    return path.read_bytes()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "sub": f"spiffe://{TD}/agent/echo",
        "aud": [AUD],
        "iat": now,
        "exp": now + 300,
        "jti": "j1",
        "gw_instance": "c1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64json(doc: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def thumbprint(jwk: dict[str, str]) -> str:
    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    digest = hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode())
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def test_mint_and_verify_roundtrip(issuer: SvidIssuer, verifier: TokenVerifier) -> None:
    svid = issuer.mint("echo", "c-123", ttl_s=120)
    header = jwt.get_unverified_header(svid.token)
    body = jwt.decode(svid.token, options={"verify_signature": False})

    ident = verifier.verify(svid.token)

    assert header == {"alg": "ES256", "kid": issuer.kid, "typ": "JWT"}
    assert body["sub"] == f"spiffe://{TD}/agent/echo" == svid.spiffe_id
    assert body["aud"] == [AUD]
    assert body["exp"] - body["iat"] == 120
    assert body["gw_instance"] == "c-123"
    assert body["jti"] == svid.jti and svid.kid == issuer.kid
    assert ident == VerifiedIdentity(
        spiffe_id=f"spiffe://{TD}/agent/echo",
        trust_domain=TD,
        agent="echo",
        instance_id="c-123",
        expires_at=svid.expires_at,
        jti=svid.jti,
    )
    assert svid.jti != issuer.mint("echo", "c-123").jti


def test_jwks_is_a_spiffe_jwt_bundle(issuer: SvidIssuer) -> None:
    doc = issuer.jwks()

    (key,) = doc["keys"]
    assert set(key) == {"use", "kid", "kty", "crv", "x", "y"}
    assert (key["use"], key["kty"], key["crv"]) == ("jwt-svid", "EC", "P-256")
    assert key["kid"] == thumbprint(key) == issuer.kid
    bundle = JwtBundle.parse(TrustDomain(TD), json.dumps(doc).encode())
    assert set(bundle.jwt_authorities) == {issuer.kid}


def test_key_persists_across_issuers(tmp_path: Path) -> None:
    first = SvidIssuer(tmp_path / "keys", TD, AUD)
    token = first.mint("echo", "c1").token
    (pem,) = (tmp_path / "keys").glob("*.pem")
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600

    second = SvidIssuer(tmp_path / "keys", TD, AUD)

    assert second.kid == first.kid and second.jwks() == first.jwks()
    assert TokenVerifier(AUD, {TD: second.jwks()}).verify(token).agent == "echo"


def test_key_file_that_does_not_match_its_kid_is_refused(tmp_path: Path) -> None:
    issuer = SvidIssuer(tmp_path, TD, AUD)
    (pem,) = tmp_path.glob("*.pem")
    pem.rename(tmp_path / f"jwt-svid-1-{'A' * 43}.pem")

    with pytest.raises(ConfigError, match="thumbprint"):
        SvidIssuer(tmp_path, TD, AUD)
    assert issuer.kid != "A" * 43


def test_rotation_keeps_old_tokens_valid(issuer: SvidIssuer, verifier: TokenVerifier) -> None:
    old_kid = issuer.kid
    old = issuer.mint("echo", "c1").token
    verifier.verify(old)

    new_kid = issuer.rotate()
    new = issuer.mint("echo", "c2").token

    assert new_kid != old_kid and jwt.get_unverified_header(new)["kid"] == new_kid
    assert {k["kid"] for k in issuer.jwks()["keys"]} == {old_kid, new_kid}
    assert verifier.verify(old).instance_id == "c1"
    assert verifier.verify(new).instance_id == "c2"
    reloaded = SvidIssuer(issuer.key_dir, TD, AUD)
    assert reloaded.kid == new_kid and len(reloaded.jwks()["keys"]) == 2


def test_rotation_prunes_keys_retired_longer_than_max_ttl(tmp_path: Path) -> None:
    now = [1_000_000.0]
    issuer = SvidIssuer(tmp_path, TD, AUD, max_ttl_s=600, clock=lambda: now[0])
    first = issuer.kid
    second = issuer.rotate()
    now[0] += 601

    third = issuer.rotate()

    assert [k["kid"] for k in issuer.jwks()["keys"]] == [second, third]
    assert not list(tmp_path.glob(f"*-{first}.pem"))


@pytest.mark.parametrize(
    ("agent", "ttl_s"),
    [("", 60), ("a/b", 60), ("..", 60), ("echo", 0), ("echo", 3601)],
)
def test_mint_refuses_bad_arguments(issuer: SvidIssuer, agent: str, ttl_s: int) -> None:
    with pytest.raises(ValueError):
        issuer.mint(agent, "c1", ttl_s=ttl_s)


Crafter = Callable[[SvidIssuer, Path], str | None]


def _expired(issuer: SvidIssuer, tmp: Path) -> str:
    past = SvidIssuer(issuer.key_dir, TD, AUD, clock=lambda: time.time() - 3600)
    return past.mint("echo", "c1", ttl_s=60).token


def _other_key(issuer: SvidIssuer, tmp: Path) -> str:
    return SvidIssuer(tmp / "other", TD, AUD).mint("echo", "c1").token


def _forged_kid(issuer: SvidIssuer, tmp: Path) -> str:
    other = signing_key(SvidIssuer(tmp / "other", TD, AUD))
    return jwt.encode(claims(), other, algorithm="ES256", headers={"kid": issuer.kid})


def _tampered(issuer: SvidIssuer, tmp: Path) -> str:
    header, _, sig = issuer.mint("echo", "c1").token.split(".")
    return ".".join([header, b64json(claims(sub=f"spiffe://{TD}/agent/admin")), sig])


def _deep_json() -> str:
    return f"{_b64('[' * 4000)}.{b64json(claims())}.c2ln"


def _bad_b64(issuer: SvidIssuer, tmp: Path) -> str:
    return issuer.mint("echo", "c1").token + "!"


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _signed(issuer: SvidIssuer, alg: str = "ES256", **over: Any) -> str:
    kid = over.pop("kid", issuer.kid)
    headers = {"kid": kid} if kid else {}
    return jwt.encode(claims(**over), signing_key(issuer), algorithm=alg, headers=headers)


REJECTIONS: list[tuple[str, Crafter, type[Unauthorized], str, str]] = [
    ("empty", lambda i, t: "", Unauthorized, "unauthorized", "no token"),
    ("none", lambda i, t: None, Unauthorized, "unauthorized", "no token"),
    ("malformed", lambda i, t: "not-a-jwt", InvalidToken, "invalid_token", "well-formed"),
    ("bad segments", lambda i, t: "a.b.c", InvalidToken, "invalid_token", "well-formed"),
    ("huge", lambda i, t: "a" * 9000, InvalidToken, "invalid_token", "well-formed"),
    ("deep json", lambda i, t: _deep_json(), InvalidToken, "invalid_token", "well-formed"),
    ("bad signature encoding", _bad_b64, InvalidToken, "invalid_token", "well-formed"),
    ("expired", _expired, ExpiredToken, "token_expired", "expired"),
    ("unknown key", _other_key, InvalidToken, "invalid_token", "unknown key id '"),
    ("forged kid", _forged_kid, InvalidToken, "invalid_token", "signature is invalid"),
    ("tampered", _tampered, InvalidToken, "invalid_token", "signature is invalid"),
    (
        "alg none",
        lambda i, t: jwt.encode(claims(), None, algorithm="none", headers={"kid": i.kid}),
        InvalidToken,
        "invalid_token",
        "alg 'none' is not allowed",
    ),
    (
        "hs256",
        lambda i, t: jwt.encode(claims(), "s" * 32, algorithm="HS256", headers={"kid": i.kid}),
        InvalidToken,
        "invalid_token",
        "alg 'HS256' is not allowed",
    ),
    (
        "wrong audience",
        lambda i, t: SvidIssuer(i.key_dir, TD, "someone-else").mint("echo", "c1").token,
        InvalidToken,
        "invalid_token",
        "token audience does not include 'agent-gateway'",
    ),
    (
        "untrusted trust domain",
        lambda i, t: SvidIssuer(t / "evil", "evil.org", AUD).mint("echo", "c1").token,
        InvalidToken,
        "invalid_token",
        "trust domain 'evil.org' is not trusted",
    ),
    (
        "no exp",
        lambda i, t: _signed(i, exp=None),
        InvalidToken,
        "invalid_token",
        "token has no exp claim",
    ),
    ("no kid", lambda i, t: _signed(i, kid=""), InvalidToken, "invalid_token", "no kid"),
    (
        "typ not jwt",
        lambda i, t: jwt.encode(claims(), signing_key(i), "ES256", {"kid": i.kid, "typ": "at+jwt"}),
        InvalidToken,
        "invalid_token",
        "typ 'at+jwt' is not allowed",
    ),
    ("no sub", lambda i, t: _signed(i, sub=None), InvalidToken, "invalid_token", "no sub"),
    (
        "sub not spiffe",
        lambda i, t: _signed(i, sub="https://example.org/agent/echo"),
        InvalidToken,
        "invalid_token",
        "not a valid SPIFFE ID",
    ),
    ("no aud", lambda i, t: _signed(i, aud=None), InvalidToken, "invalid_token", "no aud"),
    (
        "lifetime too long",
        lambda i, t: _signed(i, exp=int(time.time()) + 86_400),
        InvalidToken,
        "invalid_token",
        "lifetime exceeds",
    ),
    (
        "not yet valid",
        lambda i, t: _signed(i, nbf=int(time.time()) + 120),
        InvalidToken,
        "invalid_token",
        "not valid yet",
    ),
]


@pytest.mark.parametrize(
    ("craft", "error", "code", "fragment"),
    [r[1:] for r in REJECTIONS],
    ids=[r[0] for r in REJECTIONS],
)
def test_verify_rejects(
    issuer: SvidIssuer,
    verifier: TokenVerifier,
    tmp_path: Path,
    craft: Crafter,
    error: type[Unauthorized],
    code: str,
    fragment: str,
) -> None:
    token = craft(issuer, tmp_path)

    with pytest.raises(error) as info:
        verifier.verify(token)  # type: ignore[arg-type]

    assert info.value.code == code and info.value.status == 401
    assert fragment in info.value.message
    assert "Traceback" not in info.value.message
    if isinstance(info.value, InvalidToken):
        assert info.value.headers["WWW-Authenticate"] == f'Bearer error="{code}"'


@pytest.mark.parametrize(
    ("raised", "fragment"),
    [
        (KeyError("exp"), "token has no exp claim"),
        (RuntimeError("boom"), "token could not be validated"),
        (jwt.InvalidSignatureError("x"), "signature is invalid"),
    ],
)
def test_library_exceptions_are_translated(
    issuer: SvidIssuer,
    verifier: TokenVerifier,
    monkeypatch: pytest.MonkeyPatch,
    raised: Exception,
    fragment: str,
) -> None:
    def broken(*args: Any) -> JwtSvid:
        raise raised

    monkeypatch.setattr(identity.JwtSvid, "parse_and_validate", broken)

    with pytest.raises(InvalidToken, match=fragment) as info:
        verifier.verify(issuer.mint("echo", "c1").token)
    assert info.value.__cause__ is raised


def test_revoked_instance_is_refused_even_when_cached(
    issuer: SvidIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.mint("echo", "c1").token
    other = issuer.mint("echo", "c2").token
    verifier.verify(token)

    verifier.revoke_instance("c1")

    with pytest.raises(RevokedToken, match="no longer running") as info:
        verifier.verify(token)
    assert info.value.code == "token_revoked"
    assert verifier.verify(other).instance_id == "c2"


def test_revocations_are_kept_for_a_token_lifetime_and_pruned_from_the_oldest(
    issuer: SvidIssuer,
) -> None:
    """An entry guards its instance for max_ttl_s (no token outlives that), then goes; one
    revoked again gets a new end. Pruning looks at the oldest entries only."""
    now = [1000.0]
    verifier = TokenVerifier(AUD, {TD: issuer.jwks()}, clock=lambda: now[0], max_ttl_s=100)
    verifier.revoke_instance("a")  # at 1000: kept until 1100
    now[0] = 1060
    verifier.revoke_instance("b")  # until 1160
    now[0] = 1070
    verifier.revoke_instance("a")  # again: until 1170, behind b
    now[0] = 1110  # a's first end has passed; it is still revoked
    verifier.revoke_instance("c")
    assert list(verifier._revoked) == ["b", "a", "c"]
    now[0] = 1165  # b's end has passed, a's not
    verifier.revoke_instance("d")
    assert list(verifier._revoked) == ["a", "c", "d"]
    now[0] = 5000
    verifier.revoke_instance("e")
    assert list(verifier._revoked) == ["e"]


def test_instance_activity_hook_applies_before_and_after_caching(issuer: SvidIssuer) -> None:
    active = {"c1"}
    verifier = TokenVerifier(AUD, {TD: issuer.jwks()}, is_instance_active=active.__contains__)
    running = issuer.mint("echo", "c1").token
    stopped = issuer.mint("echo", "c2").token
    verifier.verify(running)

    with pytest.raises(RevokedToken):
        verifier.verify(stopped)
    active.discard("c1")
    with pytest.raises(RevokedToken):
        verifier.verify(running)


def test_extra_bundle_file_trusts_a_foreign_trust_domain(
    issuer: SvidIssuer, verifier: TokenVerifier, tmp_path: Path
) -> None:
    partner = SvidIssuer(tmp_path / "partner", "partner.org", AUD)
    token = partner.mint("planner", "p1").token
    bundle = partner.jwks()
    # SPIRE's SPIFFE bundles also carry X.509 roots without a kid; they must be skipped.
    bundle["keys"].append({"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"})
    path = tmp_path / "partner.jwks.json"
    path.write_text(json.dumps(bundle))
    with pytest.raises(InvalidToken, match=r"'partner\.org' is not trusted"):
        verifier.verify(token)

    verifier.load_bundle_file(path, "partner.org")

    ident = verifier.verify(token)
    assert (ident.trust_domain, ident.agent) == ("partner.org", "planner")
    assert ident.spiffe_id == "spiffe://partner.org/agent/planner"
    assert verifier.verify(issuer.mint("echo", "c1").token).trust_domain == TD


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "invalid JSON"),
        ('{"keys": 3}', "not a JWKS document"),
        ('{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}', "has no kid"),
        ('{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "k"}]}', "'k'"),
    ],
)
def test_bad_bundle_files_are_config_errors(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "bundle.json"
    path.write_text(content)

    with pytest.raises(ConfigError, match=fragment) as info:
        TokenVerifier(AUD).load_bundle_file(path, "partner.org")
    assert str(path) in (info.value.location or "")


def test_cache_skips_the_library_on_repeat(
    issuer: SvidIssuer, verifier: TokenVerifier, calls: list[str]
) -> None:
    token = issuer.mint("echo", "c1").token

    first = verifier.verify(token)
    second = verifier.verify(token)

    assert second is first
    assert calls == [token]


def test_failures_are_not_cached(issuer: SvidIssuer, calls: list[str]) -> None:
    verifier = TokenVerifier("agent-gateway", {TD: issuer.jwks()})
    token = SvidIssuer(issuer.key_dir, TD, "someone-else").mint("echo", "c1").token

    for _ in range(2):
        with pytest.raises(InvalidToken, match="audience"):
            verifier.verify(token)
    assert calls == [token, token]


def test_expired_cached_token_is_rejected(issuer: SvidIssuer, calls: list[str]) -> None:
    now = [time.time()]
    verifier = TokenVerifier(AUD, {TD: issuer.jwks()}, clock=lambda: now[0])
    svid = issuer.mint("echo", "c1", ttl_s=60)
    verifier.verify(svid.token)
    now[0] = svid.expires_at - 1
    verifier.verify(svid.token)

    now[0] = svid.expires_at

    with pytest.raises(ExpiredToken):
        verifier.verify(svid.token)
    with pytest.raises(ExpiredToken):
        verifier.verify(svid.token)
    assert calls == [svid.token]


def test_cache_is_bounded(issuer: SvidIssuer, calls: list[str]) -> None:
    verifier = TokenVerifier(AUD, {TD: issuer.jwks()}, cache_size=2)
    tokens = [issuer.mint("echo", f"c{i}").token for i in range(3)]

    for token in [*tokens, tokens[0], tokens[2]]:
        verifier.verify(token)

    # tokens[0] was evicted by tokens[2] and validated again; tokens[2] was still cached.
    assert calls == [*tokens, tokens[0]]


def test_new_bundle_drops_cached_tokens(
    issuer: SvidIssuer, verifier: TokenVerifier, tmp_path: Path
) -> None:
    token = issuer.mint("echo", "c1").token
    verifier.verify(token)

    verifier.add_bundle(TD, SvidIssuer(tmp_path / "replacement", TD, AUD).jwks())

    with pytest.raises(InvalidToken, match="unknown key id"):
        verifier.verify(token)


def test_token_validated_during_a_bundle_change_is_not_cached(
    issuer: SvidIssuer, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real = JwtSvid.parse_and_validate

    def refreshing(token: str, bundle: JwtBundle, audience: set[str]) -> JwtSvid:
        seen.append(token)
        verifier.add_bundle(TD, issuer.jwks())  # as another thread refreshing meanwhile
        return real(token, bundle, audience)

    monkeypatch.setattr(identity.JwtSvid, "parse_and_validate", refreshing)
    token = issuer.mint("echo", "c1").token

    verifier.verify(token)
    verifier.verify(token)

    assert seen == [token, token]
