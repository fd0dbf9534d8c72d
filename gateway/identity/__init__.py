"""Who is calling: users' API keys and agents' SPIFFE JWT-SVIDs.

Parts:

- ``apikeys``: hashed API keys of users, each with a subject and roles (``KeyStore``);
- ``svid``: the JWT-SVID issuer and verifier (ES256, py-spiffe for the spec checks);
- ``service``: the hub's identity service (``AgentIdentities``): where the signing keys
  live, token lifetime, extra trust bundles, key rotation, revocation of closed instances.
"""

from gateway.identity.apikeys import KeyStore, Subject
from gateway.identity.service import KEY_DIR, SVID_ENV, AgentIdentities
from gateway.identity.svid import IssuedSvid, SvidIssuer, TokenVerifier, VerifiedIdentity

__all__ = [
    "KEY_DIR",
    "SVID_ENV",
    "AgentIdentities",
    "IssuedSvid",
    "KeyStore",
    "Subject",
    "SvidIssuer",
    "TokenVerifier",
    "VerifiedIdentity",
]
