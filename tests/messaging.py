"""Helpers for the messaging tests: tokens forged every wrong way, and hub polling."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.agents.instances import Instance
from gateway.identity.service import KEY_DIR

AUDIENCE = "agent-gateway"
TRUST_DOMAIN = "agent-gateway.local"


def svid_auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hub_key(state_dir: Path) -> tuple[Any, str]:
    """The hub's current signing key and kid, read from its key directory."""
    (path,) = sorted((Path(state_dir) / KEY_DIR).glob("jwt-svid-*.pem"))[-1:]
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    kid = path.stem.split("-", 3)[3]
    return key, kid


def claims(agent: str = "probe", instance: str = "i-0", **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": f"spiffe://{TRUST_DOMAIN}/agent/{agent}",
        "aud": [AUDIENCE],
        "iat": now,
        "exp": now + 300,
        "jti": "forged",
        "gw_instance": instance,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def _b64(doc: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def bad_tokens(state_dir: Path, instance: Instance) -> dict[str, tuple[str | None, str]]:
    """name -> (Authorization header value or None, expected error code); each one is refused.

    Tokens that would otherwise be valid name a live ``instance``, so only the one defect
    makes them fail.
    """
    key, kid = hub_key(state_dir)
    good = claims(instance.agent, instance.instance_id)

    def signed(body: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(body, key, algorithm="ES256", headers={"kid": kid, **(headers or {})})

    stranger = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    return {
        "no token": (None, "unauthorized"),
        "wrong scheme": ("Basic cHJvYmU6cHJvYmU=", "unauthorized"),
        "empty bearer": ("Bearer ", "unauthorized"),
        "malformed": ("Bearer not.a.jwt", "invalid_token"),
        "api key instead of svid": ("Bearer agk_000000000000_" + "A" * 43, "invalid_token"),
        "expired": (
            "Bearer " + signed({**good, "iat": now - 600, "exp": now - 300}),
            "token_expired",
        ),
        "unknown key": (
            "Bearer "
            + jwt.encode(good, stranger, algorithm="ES256", headers={"kid": "not-our-key"}),
            "invalid_token",
        ),
        "unknown key under our kid": (
            "Bearer " + jwt.encode(good, stranger, algorithm="ES256", headers={"kid": kid}),
            "invalid_token",
        ),
        "alg none": (
            "Bearer " + _b64({"alg": "none", "typ": "JWT", "kid": kid}) + "." + _b64(good) + ".",
            "invalid_token",
        ),
        "hs256 with the public key as secret": (
            "Bearer " + _hs256(good, kid, state_dir),
            "invalid_token",
        ),
        "wrong audience": (
            "Bearer " + signed({**good, "aud": ["someone-else"]}),
            "invalid_token",
        ),
        "wrong trust domain": (
            "Bearer " + signed({**good, "sub": f"spiffe://evil.example/agent/{instance.agent}"}),
            "invalid_token",
        ),
        "missing exp": (
            "Bearer " + signed({k: v for k, v in good.items() if k != "exp"}),
            "invalid_token",
        ),
        "instance never started": (
            "Bearer " + signed(claims(instance.agent, "no-such-instance")),
            "token_revoked",
        ),
    }


def _hs256(body: dict[str, Any], kid: str, state_dir: Path) -> str:
    """An HS256 token keyed with the hub's public key (the classic algorithm confusion)."""
    key, _ = hub_key(state_dir)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64({"alg": "HS256", "typ": "JWT", "kid": kid})
    payload = _b64(body)
    sig = hmac.new(public, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


async def until(check: Callable[[], Any], within_s: float = 10.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; return that."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {within_s} s")
        await asyncio.sleep(0.02)
