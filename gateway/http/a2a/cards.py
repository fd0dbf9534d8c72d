"""A2A Agent Cards for the registry's agents, signed by the hub (JWS, ES256).

Each agent's card offers its interface ``/a2a/{agent}`` (JSON-RPC, protocol 1.0 and 0.3 at
the same URL), streaming and push notifications, one skill per capability, the agent's input
and output JSON Schemas (in the ``SCHEMA_EXTENSION`` extension: A2A 1.0 skills have no schema
field) and a bearer security scheme (the hub's API keys). The card is signed with the SDK's
``create_agent_card_signer`` (RFC 8785 canonical JSON, detached JWS) with a P-256 key kept in
the state directory; its public half is served at ``/.well-known/jwks.json`` and named by the
signature's ``jku`` and ``kid``. Cards are built per registry revision and base URL and cached.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentExtension,
    AgentInterface,
    AgentProvider,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.signing import create_agent_card_signer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.struct_pb2 import Struct

from gateway import __version__
from gateway.bundle.config import Config
from gateway.bundle.registry import AgentSpec
from gateway.errors import ConfigError

SCHEMA_EXTENSION = "urn:agent-gateway:a2a:json-schema:v1"
JWKS_PATH = "/.well-known/jwks.json"
CARD_PATH = "/.well-known/agent-card.json"
INPUT_MODES = ["application/json", "text/plain"]
OUTPUT_MODES = ["application/json"]
KEY_FILE = "a2a-card-signing-key.pem"


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()


class CardSigner:
    """The hub's card-signing key (created once, mode 0600) and its JWKS."""

    def __init__(self, state_dir: Path) -> None:
        path = Path(state_dir) / KEY_FILE
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"not a usable private key: {e}", location=str(path)) from e
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError("the card-signing key must be a P-256 key", location=str(path))
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".a2a-key-")  # created 0600
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            os.replace(tmp, path)
        self._key = key
        nums = key.public_key().public_numbers()
        jwk = {"crv": "P-256", "kty": "EC", "x": _b64(nums.x), "y": _b64(nums.y)}
        canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
        self.kid = (
            base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
        )
        self.jwk = {**jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}
        self._pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def jwks(self) -> dict[str, Any]:
        """The public key set clients verify card signatures with."""
        return {"keys": [self.jwk]}

    def sign(self, card: AgentCard, base_url: str) -> AgentCard:
        """``card`` with the hub's signature appended."""
        signer = create_agent_card_signer(
            signing_key=self._pem,
            protected_header={
                "kid": self.kid,
                "alg": "ES256",
                "jku": base_url + JWKS_PATH,
                "typ": "JOSE",
            },
        )
        return signer(card)


def _struct(value: dict[str, Any]) -> Struct:
    out = Struct()
    out.update(value)
    return out


def _security() -> tuple[dict[str, SecurityScheme], list[SecurityRequirement]]:
    scheme = SecurityScheme(
        http_auth_security_scheme=HTTPAuthSecurityScheme(
            scheme="bearer",
            bearer_format="agent-gateway API key",
            description="An API key of this hub: Authorization: Bearer agk_...",
        )
    )
    return {"bearer": scheme}, [SecurityRequirement(schemes={"bearer": StringList()})]


def _interfaces(url: str) -> list[AgentInterface]:
    # 1.0 first: the SDK's client prefers it; 0.3 clients find theirs (same URL, the door
    # tells them apart by method name and A2A-Version header).
    return [
        AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0"),
        AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="0.3"),
    ]


def agent_card(config: Config, agent: AgentSpec, base_url: str) -> AgentCard:
    """The unsigned card of one registered agent."""
    docs = config.schemas.documents
    schemas = {
        cap: {
            "input_schema": docs.get(agent.input_schema),
            "output_schema": docs.get(agent.output_schema),
        }
        for cap in agent.capabilities
    }
    schemes, requirements = _security()
    return AgentCard(
        name=agent.name,
        description=agent.description or f"Agent {agent.name} behind agent-gateway",
        version=__version__,
        provider=AgentProvider(organization="agent-gateway", url=base_url),
        supported_interfaces=_interfaces(f"{base_url}/a2a/{agent.name}"),
        capabilities=AgentCapabilities(
            streaming=True,
            push_notifications=True,
            extensions=[
                AgentExtension(
                    uri=SCHEMA_EXTENSION,
                    description=(
                        "JSON Schemas of each skill's input (a data part, or a text part "
                        "holding JSON) and output (the result artifact's data part)"
                    ),
                    params=_struct(
                        {
                            "registry_revision": config.registry_revision,
                            "input_schema": agent.input_schema,
                            "output_schema": agent.output_schema,
                            "skills": schemas,
                        }
                    ),
                )
            ],
        ),
        security_schemes=schemes,
        security_requirements=requirements,
        default_input_modes=INPUT_MODES,
        default_output_modes=OUTPUT_MODES,
        skills=[
            AgentSkill(
                id=cap,
                name=cap,
                description=f"{cap} ({agent.description or agent.name})",
                tags=[cap.split(".")[0], agent.name],
                input_modes=INPUT_MODES,
                output_modes=OUTPUT_MODES,
            )
            for cap in agent.capabilities
        ],
    )


def hub_card(config: Config, agents: list[AgentSpec], base_url: str, hub_id: str) -> AgentCard:
    """The hub's card: a directory with one skill per agent the caller may use, and each
    agent's interface (call an agent through its own card)."""
    schemes, requirements = _security()
    interfaces = [
        AgentInterface(
            url=f"{base_url}/a2a/{a.name}", protocol_binding="JSONRPC", protocol_version="1.0"
        )
        for a in agents
    ]
    return AgentCard(
        name="agent-gateway",
        description=(
            "A policy-first hub: every agent below runs in a sandboxed container, every call is "
            "decided by Rego policy and logged. Each skill is an agent; its card is at "
            f"/a2a/{{agent}}{CARD_PATH}."
        ),
        version=__version__,
        provider=AgentProvider(organization="agent-gateway", url=base_url),
        supported_interfaces=interfaces,
        capabilities=AgentCapabilities(
            streaming=True,
            push_notifications=True,
            extensions=[
                AgentExtension(
                    uri=SCHEMA_EXTENSION,
                    params=_struct(
                        {
                            "hub_id": hub_id,
                            "registry_revision": config.registry_revision,
                            "agents": {
                                a.name: f"{base_url}/a2a/{a.name}{CARD_PATH}" for a in agents
                            },
                        }
                    ),
                )
            ],
        ),
        security_schemes=schemes,
        security_requirements=requirements,
        default_input_modes=INPUT_MODES,
        default_output_modes=OUTPUT_MODES,
        skills=[
            AgentSkill(
                id=a.name,
                name=a.name,
                description=a.description or a.name,
                tags=list(a.capabilities),
                input_modes=INPUT_MODES,
                output_modes=OUTPUT_MODES,
            )
            for a in agents
        ],
    )


class CardCache:
    """Signed card documents (JSON, with the 0.3 fields too) by registry revision and URL."""

    def __init__(self, signer: CardSigner, size: int = 256) -> None:
        self.signer = signer
        self._size = size
        self._docs: dict[tuple[str, ...], dict[str, Any]] = {}

    def agent(self, config: Config, agent: AgentSpec, base_url: str) -> dict[str, Any]:
        """The signed card of ``agent`` as served."""
        key = (config.registry_revision, base_url, agent.name)
        doc = self._docs.get(key)
        if doc is None:
            card = self.signer.sign(agent_card(config, agent, base_url), base_url)
            doc = self._put(key, agent_card_to_dict(card))
        return doc

    def hub(
        self, config: Config, agents: list[AgentSpec], base_url: str, hub_id: str
    ) -> dict[str, Any]:
        """The signed hub card listing ``agents``."""
        key = (config.registry_revision, base_url, "", *(a.name for a in agents))
        doc = self._docs.get(key)
        if doc is None:
            card = self.signer.sign(hub_card(config, agents, base_url, hub_id), base_url)
            doc = self._put(key, agent_card_to_dict(card))
        return doc

    def _put(self, key: tuple[str, ...], doc: dict[str, Any]) -> dict[str, Any]:
        if len(self._docs) >= self._size:
            self._docs.pop(next(iter(self._docs)))
        self._docs[key] = doc
        return doc
