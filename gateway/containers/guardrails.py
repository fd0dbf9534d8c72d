"""Guardrails: turn a policy decision's sandbox into a hardened container spec.

The decision is the only source of limits: a sandbox that is missing a limit, asks for an
unknown network or grants mounts is refused (fail closed) rather than filled in with
something more permissive. The hardening that is not negotiable (all capabilities dropped,
no-new-privileges, read-only root with a tmpfs /tmp, non-root user, hub-only network,
labels, TTL) is applied here to every container.

A backend that cannot enforce one of these (Docker Swarm services take no
``no-new-privileges``, ``gateway.containers.swarm``) refuses to start the container unless
the sandbox lists the guardrail in ``swarm_acceptable``: the decision accepts that backend's
equivalent, described in ``SWARM_EQUIVALENTS``. Absent, nothing is accepted.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from gateway.bundle.registry import AgentSpec
from gateway.containers.backend import (
    LABEL_AGENT,
    LABEL_EXPIRES,
    LABEL_HUB,
    LABEL_MANAGED,
    LABEL_TASK,
    ContainerSpec,
)
from gateway.errors import GuardrailViolation

MIN_MEMORY = 16 * 1024 * 1024
MAX_MEMORY = 8 * 1024**3
SANDBOX_KEYS = {
    "network",
    "memory_bytes",
    "cpus",
    "pids",
    "read_only_root",
    "mounts",
    "swarm_acceptable",
}
# The guardrails a Swarm service cannot carry and what the Swarm backend does instead; a
# sandbox's ``swarm_acceptable`` names those whose equivalent the decision accepts.
SWARM_EQUIVALENTS = {
    "no-new-privileges": (
        "services take no security options (engine API 1.41): the process keeps an empty "
        "capability bounding set (all dropped) and a non-root uid, so a setuid binary in the "
        "image changes its uid but gains no capability"
    ),
    "icc": (
        "an overlay network has no inter-container switch: agents on it can connect to each "
        "other's ports (the host and the outside stay unreachable on an internal overlay)"
    ),
    "memory-swap": (
        "the engine sets a service's memory+swap limit to twice its memory limit, not equal "
        "to it: on a node with swap the container may swap up to its memory limit"
    ),
    "host-firewall": (
        "an egress overlay reaches its node through docker_gwbridge, shared by every service "
        "on the node, so the hub cannot fence the node's own services off from it"
    ),
}


def _number(sandbox: dict[str, Any], key: str, low: float, high: float) -> float:
    value = sandbox.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GuardrailViolation(f"sandbox.{key} is missing or not a number")
    if not low <= value <= high:
        raise GuardrailViolation(f"sandbox.{key}={value} is outside [{low}, {high}]")
    return float(value)


def build_spec(
    *,
    agent: AgentSpec,
    sandbox: dict[str, Any] | None,
    task_id: str,
    hub_id: str,
    networks: dict[str, str],
    timeout_s: float,
    ttl_grace_s: int,
    gateway_url: str,
    extra_env: dict[str, str] | None = None,
) -> ContainerSpec:
    """The container spec for running ``agent`` under ``sandbox``; GuardrailViolation if unsafe.

    ``networks`` maps a sandbox network name (``internal``, ``egress``) to a Docker network.
    """
    if not isinstance(sandbox, dict):
        raise GuardrailViolation("the decision granted no sandbox")
    unknown = set(sandbox) - SANDBOX_KEYS
    if unknown:
        raise GuardrailViolation(
            f"sandbox has fields the guardrails cannot enforce: {sorted(unknown)}"
        )
    network = sandbox.get("network")
    if network not in networks:
        raise GuardrailViolation(f"sandbox.network {network!r} is not one of {sorted(networks)}")
    if sandbox.get("read_only_root") is not True:
        raise GuardrailViolation("sandbox.read_only_root must be true")
    if sandbox.get("mounts"):
        # No mount support yet: refusing is the only safe answer to a grant we cannot apply.
        raise GuardrailViolation("sandbox.mounts are not supported")
    memory = int(_number(sandbox, "memory_bytes", MIN_MEMORY, MAX_MEMORY))
    cpus = _number(sandbox, "cpus", 0.01, 64)
    pids = int(_number(sandbox, "pids", 8, 4096))
    accepted = sandbox.get("swarm_acceptable", [])
    if not isinstance(accepted, list) or not set(accepted) <= set(SWARM_EQUIVALENTS):
        raise GuardrailViolation(
            f"sandbox.swarm_acceptable must be a list of {sorted(SWARM_EQUIVALENTS)}"
        )

    ttl = int(timeout_s) + ttl_grace_s
    env = {
        **dict(agent.env),
        **(extra_env or {}),
        "GATEWAY_URL": gateway_url,
        "AGENT_NAME": agent.name,
        "AGENT_PORT": str(agent.port),
        "AGENT_TASK_ID": task_id,
    }
    labels = {
        **dict(agent.labels),
        LABEL_MANAGED: "true",
        LABEL_HUB: hub_id,
        LABEL_TASK: task_id,
        LABEL_AGENT: agent.name,
        LABEL_EXPIRES: str(int(time.time()) + ttl),
    }
    return ContainerSpec(
        # A fresh suffix per start: a container left by a hub killed mid-create must not
        # block the task's re-dispatch with a name conflict.
        name=f"agw-{agent.name}-{task_id[:8]}-{secrets.token_hex(3)}",
        image=agent.image,
        port=agent.port,
        env=env,
        secret_env=dict(agent.secret_env),
        labels=labels,
        network=networks[network],
        memory_bytes=memory,
        nano_cpus=int(cpus * 1e9),
        pids_limit=pids,
        ttl_s=ttl,
        accepted_equivalents=frozenset(accepted),
    )
