"""The hub's identity service: mint, verify, renew and revoke agents' JWT-SVIDs.

Wraps ``gateway.identity.svid`` (issuer and verifier) with what the hub decides: where the
signing keys live (``<state-dir>/svid-keys``), the audience, the token lifetime, which other
trust domains are trusted (JWKS files, e.g. from a SPIRE server), and which container
instances are alive (a token is refused once its instance is closed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, Degraded, InvalidToken, RevokedToken, Unauthorized
from gateway.identity.svid import IssuedSvid, SvidIssuer, TokenVerifier, VerifiedIdentity
from gateway.logs import get_logger

log = get_logger(__name__)
KEY_DIR = "svid-keys"
# The environment variable that hands a container its JWT-SVID (read by the agent SDK).
SVID_ENV = "AGENT_SVID"


class AgentIdentities:
    """One issuer (this hub's trust domain) and one verifier (it plus extra bundles)."""

    def __init__(
        self,
        issuer: SvidIssuer,
        verifier: TokenVerifier,
        *,
        ttl_s: int = 300,
        recovering: Callable[[], bool] | None = None,
    ) -> None:
        if not 0 < ttl_s <= issuer.max_ttl_s:
            raise ValueError(f"ttl_s must be in 1..{issuer.max_ttl_s}")
        self.issuer = issuer
        self.verifier = verifier
        self.ttl_s = ttl_s
        self._recovering = recovering
        self._peer_keys: list[dict[str, Any]] = []
        self._tracking = False

    @classmethod
    def create(
        cls,
        state_dir: Path,
        *,
        trust_domain: str,
        audience: str,
        ttl_s: int,
        bundles: tuple[tuple[str, Path], ...] = (),
        is_active: Callable[[str], bool] | None = None,
        recovering: Callable[[], bool] | None = None,
    ) -> AgentIdentities:
        """Load (or make) the signing key under ``state_dir`` and trust the extra bundles.

        ``recovering()`` is true until the hub has re-attached the containers of its last run.
        """
        issuer = SvidIssuer(Path(state_dir) / KEY_DIR, trust_domain, audience)
        verifier = TokenVerifier(audience, is_instance_active=is_active)
        verifier.track_issuer(issuer)
        for domain, path in bundles:
            if domain == issuer.trust_domain:
                # A second bundle for our own domain would replace the hub's keys.
                raise ConfigError(
                    f"trust bundle for {domain!r} is the hub's own trust domain", location=str(path)
                )
            verifier.load_bundle_file(Path(path), domain)
        return cls(issuer, verifier, ttl_s=ttl_s, recovering=recovering)

    @property
    def trust_domain(self) -> str:
        return self.issuer.trust_domain

    def mint_env(self, agent: str, instance_id: str) -> tuple[str, dict[str, str]]:
        """A token for a container about to start: (its SPIFFE id, env vars carrying it)."""
        svid = self.issuer.mint(agent, instance_id, ttl_s=self.ttl_s)
        return svid.spiffe_id, {SVID_ENV: svid.token}

    def verify(self, token: str | None) -> VerifiedIdentity:
        """The verified identity in ``token``; an Unauthorized subclass otherwise.

        Degraded (503, retry) instead of RevokedToken while the hub is recovering: the
        token's container may be one about to be re-attached.
        """
        if not token:
            raise Unauthorized("no token was presented (send 'Authorization: Bearer <JWT-SVID>')")
        try:
            return self.verifier.verify(token)
        except RevokedToken:
            if self._recovering is not None and self._recovering():
                raise Degraded(
                    "the hub is re-attaching the containers of its last run; retry",
                    headers={"Retry-After": "2"},
                ) from None
            raise

    def is_local(self, ident: VerifiedIdentity) -> bool:
        """Whether this hub minted the token (for one of its containers)."""
        return ident.trust_domain == self.trust_domain and ident.instance_id is not None

    def renew(self, token: str | None) -> IssuedSvid:
        """A fresh token for the same agent and instance, given a still-valid one."""
        ident = self.verify(token)
        if not self.is_local(ident) or ident.agent is None or ident.instance_id is None:
            raise InvalidToken("only tokens this hub issued to its containers can be renewed")
        svid = self.issuer.mint(ident.agent, ident.instance_id, ttl_s=self.ttl_s)
        log.info("svid renewed", extra={"agent": ident.agent, "instance_id": ident.instance_id})
        return svid

    def revoke(self, instance_id: str) -> None:
        """Refuse every token of ``instance_id`` (its container stopped)."""
        self.verifier.revoke_instance(instance_id)

    def rotate(self) -> dict[str, Any]:
        """Sign with a new key from now on; the old one stays published while its tokens live."""
        previous = self.issuer.kid
        kid = self.issuer.rotate()
        published = [k["kid"] for k in self.issuer.jwks()["keys"]]
        log.info("svid signing key rotated", extra={"kid": kid, "previous_kid": previous})
        return {"kid": kid, "previous_kid": previous, "published": published}

    def trust_peer_keys(self, keys: list[dict[str, Any]]) -> None:
        """Trust, beside this hub's own keys, the keys other hubs of its cluster sign this
        trust domain's tokens with (a token any hub issued verifies on all)."""
        own = self.issuer.jwks()["keys"]
        known = {k["kid"] for k in own}
        peers = [k for k in keys if k.get("kid") not in known]
        if peers == self._peer_keys:
            return  # unchanged: keep the verifier's cache of checked tokens
        self._peer_keys = peers
        self._trust_all()
        if not self._tracking:
            # A rotation re-publishes the own keys: keep the peers' beside them.
            self.issuer.on_rotate(self._trust_all)
            self._tracking = True

    def _trust_all(self) -> None:
        own = self.issuer.jwks()["keys"]
        self.verifier.add_bundle(self.trust_domain, {"keys": [*own, *self._peer_keys]})

    def bundle(self) -> dict[str, Any]:
        """The trust domain's JWT bundle as a SPIFFE JWKS document: this hub's keys and,
        in a cluster, every other hub's (the bundle each hub verifies against)."""
        keys = [*self.issuer.jwks()["keys"], *self._peer_keys]
        return {"keys": keys, "spiffe_refresh_hint": self.ttl_s // 2}
