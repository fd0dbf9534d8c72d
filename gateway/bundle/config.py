"""The files a user edits, loaded together: schemas, agents.yaml, policies and limits.yaml.

A ``Config`` is immutable; a reload builds a new one and swaps it in only if every part
loaded, so a bad edit never replaces the last good configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.bundle.registry import Registry, load_registry
from gateway.bundle.revision import combined_revision, revision_of
from gateway.bundle.schemas import SchemaSet
from gateway.limits.model import NO_LIMITS, Limits, load_limits
from gateway.policy.engine import API_QUERY, DISPATCH_QUERY, MESSAGES_QUERY, RegorusPolicy
from gateway.policy.testing import policy_test_inputs

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
    # Quotas and rate limits (gateway.limits); none when the hub runs without a limits file.
    limits: Limits = NO_LIMITS
    limits_revision: str = ""

    @property
    def revision(self) -> str:
        """The combined revision every decision made under this config records."""
        return combined_revision(
            policies=self.policy_revision,
            schemas=self.schemas_revision,
            agents=self.registry_revision,
        )


@dataclass(frozen=True)
class Revisions:
    """The revisions of the three parts, computed before loading (git runs in a thread)."""

    policies: str
    schemas: str
    agents: str
    limits: str = ""


def file_revisions(
    *, agents_file: Path, schemas_dir: Path, policies_dir: Path, limits_file: Path | None = None
) -> Revisions:
    """Revisions (last commit + content hash) of the files; runs git, so call it off-loop."""
    return Revisions(
        policies=str(revision_of([Path(policies_dir)])),
        schemas=str(revision_of([Path(schemas_dir)])),
        agents=str(revision_of([Path(agents_file)])),
        limits=str(revision_of([Path(limits_file)])) if limits_file is not None else "",
    )


def load_config(
    *,
    agents_file: Path,
    schemas_dir: Path,
    policies_dir: Path,
    limits_file: Path | None = None,
    policy_budget_ms: float = 50.0,
    revisions: Revisions | None = None,
    fast_path_check: bool = True,
) -> Config:
    """Load and cross-check every file; raise ConfigError (file:line) on the first problem.

    ``revisions`` (from ``file_revisions``) saves running git here, on the caller's thread.
    Without ``limits_file`` nothing is rate limited. ``fast_path_check=False`` leaves the
    policy's compiled fast path off until its caller cross-checks it (the reload does, off
    the loop).
    """
    schemas = SchemaSet.load(schemas_dir)
    for required in (TASK_SCHEMA, MESSAGE_SCHEMA, RESULT_SCHEMA):
        if not schemas.has(required):
            from gateway.errors import ConfigError

            raise ConfigError(f"missing {required}", location=str(schemas_dir))
    registry = load_registry(agents_file, schemas, display=Path(agents_file).name)
    limits = NO_LIMITS
    if limits_file is not None:
        limits = load_limits(limits_file, schemas, display=Path(limits_file).name)
    if revisions is None:
        revisions = file_revisions(
            agents_file=agents_file,
            schemas_dir=schemas_dir,
            policies_dir=policies_dir,
            limits_file=limits_file,
        )
    policy = RegorusPolicy.load(
        policies_dir,
        data={"agents": registry.to_json()},
        revision=revisions.policies,
        budget_ms=policy_budget_ms,
        required=(DISPATCH_QUERY, MESSAGES_QUERY, API_QUERY),
        fast_path=True,
    )
    if fast_path_check:
        policy.cross_check(policy_test_inputs(Path(policies_dir)), source="policy tests")
    return Config(
        registry=registry,
        schemas=schemas,
        policy=policy,
        policy_revision=revisions.policies,
        schemas_revision=revisions.schemas,
        registry_revision=revisions.agents,
        limits=limits,
        limits_revision=revisions.limits,
    )
