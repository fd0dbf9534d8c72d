"""The files a user edits, loaded together: schemas, agents.yaml and policies.

A ``Config`` is immutable; a reload builds a new one and swaps it in only if every part
loaded, so a bad edit never replaces the last good configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.policy.engine import DISPATCH_QUERY, MESSAGES_QUERY, RegorusPolicy
from gateway.registry import Registry, load_registry
from gateway.revision import revision_of
from gateway.schemas import SchemaSet

TASK_SCHEMA = "task.schema.json"
MESSAGE_SCHEMA = "messages/envelope.schema.json"
RESULT_SCHEMA = "task.result.schema.json"


@dataclass(frozen=True)
class Config:
    """One consistent generation of registry, schemas and policy, with their revisions."""

    registry: Registry
    schemas: SchemaSet
    policy: RegorusPolicy
    policy_revision: str
    schemas_revision: str
    registry_revision: str


def load_config(
    *,
    agents_file: Path,
    schemas_dir: Path,
    policies_dir: Path,
    policy_budget_ms: float = 50.0,
) -> Config:
    """Load and cross-check every file; raise ConfigError (file:line) on the first problem."""
    schemas = SchemaSet.load(schemas_dir)
    for required in (TASK_SCHEMA, MESSAGE_SCHEMA, RESULT_SCHEMA):
        if not schemas.has(required):
            from gateway.errors import ConfigError

            raise ConfigError(f"missing {required}", location=str(schemas_dir))
    registry = load_registry(agents_file, schemas, display=Path(agents_file).name)
    policy_revision = str(revision_of([Path(policies_dir)]))
    policy = RegorusPolicy.load(
        policies_dir,
        data={"agents": registry.to_json()},
        revision=policy_revision,
        budget_ms=policy_budget_ms,
        required=(DISPATCH_QUERY, MESSAGES_QUERY),
    )
    return Config(
        registry=registry,
        schemas=schemas,
        policy=policy,
        policy_revision=policy_revision,
        schemas_revision=str(revision_of([Path(schemas_dir)])),
        registry_revision=str(revision_of([Path(agents_file)])),
    )
