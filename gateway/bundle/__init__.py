"""The files a user edits in git, loaded together as one generation.

Parts:

- ``registry``: ``agents.yaml``, validated against ``schemas/agents.schema.json``
  (``Registry``, ``AgentSpec``);
- ``schemas``: the JSON Schemas under ``schemas/`` with cross-file ``$ref`` (``SchemaSet``);
- ``revision``: the git revision and content hash of each folder (``Revision``);
- ``config``: one loaded generation of all three plus the compiled policy (``Config``);
- ``reload``: the watcher that validates, tests and swaps a new generation (``Reloader``).
"""

from gateway.bundle.config import (
    MESSAGE_SCHEMA,
    RESULT_SCHEMA,
    TASK_SCHEMA,
    Config,
    file_revisions,
    load_config,
)
from gateway.bundle.registry import AgentSpec, Registry, load_registry
from gateway.bundle.reload import Reloader
from gateway.bundle.revision import Revision, content_hash, revision_of, split_revision
from gateway.bundle.schemas import SchemaSet

__all__ = [
    "MESSAGE_SCHEMA",
    "RESULT_SCHEMA",
    "TASK_SCHEMA",
    "AgentSpec",
    "Config",
    "Registry",
    "Reloader",
    "Revision",
    "SchemaSet",
    "content_hash",
    "file_revisions",
    "load_config",
    "load_registry",
    "revision_of",
    "split_revision",
]
