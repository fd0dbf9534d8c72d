"""Render the Kubernetes objects that are made from the repository (deploy/k8s/README.md).

    python3 deploy/k8s/render.py config      # ConfigMap agent-gateway-config (stdout)
    python3 deploy/k8s/render.py agent-pod   # the example agent pod (stdout)

``config`` holds agents.yaml, limits.yaml, schemas/ and policies/ as they are in the
checkout. A ConfigMap's keys are flat, so each file's key is its path with ``/`` spelled
``__``; the hub Deployment's projected volume (hub.yaml) puts each key back at its path.
``agent-pod`` is the pod a Kubernetes backend would create for the echo agent under the
sandbox dispatch.rego grants it: ``gateway.containers.guardrails.build_spec`` makes the
container spec, exactly as for the Docker backend, and ``agent_pod`` maps it onto a pod
spec, one guardrail at a time as the README's table says. The committed
``examples/agent-pod.yaml`` is this output; tests/unit/test_deploy_manifests.py checks that
it still is, and that it carries every row of the table.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.bundle.registry import load_registry  # noqa: E402
from gateway.bundle.schemas import SchemaSet  # noqa: E402
from gateway.containers.backend import ContainerSpec  # noqa: E402
from gateway.containers.guardrails import build_spec  # noqa: E402

HUB_NAMESPACE = "agent-gateway"
AGENT_NAMESPACE = "agent-gateway-agents"
HUB_URL = f"http://agent-gateway.{HUB_NAMESPACE}.svc:8080"
NETWORK_LABEL = "io.agent-gateway.network"
# The files the hub reads, relative to the checkout; the Deployment mounts them at
# /etc/agent-gateway/<path>.
CONFIG_FILES = ("agents.yaml", "limits.yaml")
CONFIG_DIRS = ("schemas", "policies")
# What dispatch.rego grants the echo agent for a plain user (GET /v1/tasks/{id}: sandbox).
EXAMPLE_SANDBOX = {
    "network": "internal",
    "memory_bytes": 64 * 1024 * 1024,
    "cpus": 0.5,
    "pids": 32,
    "read_only_root": True,
    "mounts": [],
}
EXAMPLE_TASK = "0f6c2a9e-4b1d-4c55-9a57-3d2f1e8b7c60"
EXAMPLE_HUB = "hub-0"
EXAMPLE_EXPIRES = "1767225600"
# The engine networks a sandbox names, as the Kubernetes backend would call them: the
# NetworkPolicies in agents-networkpolicy.yaml select pods by this label.
NETWORKS = {"internal": "internal", "egress": "egress"}
SECRETS = "agent-gateway-agent-secrets"


def config_paths(root: Path = ROOT) -> list[str]:
    """The files of the ConfigMap, as paths relative to ``root``, sorted."""
    paths = [name for name in CONFIG_FILES if (root / name).is_file()]
    for d in CONFIG_DIRS:
        paths += [p.relative_to(root).as_posix() for p in (root / d).rglob("*") if p.is_file()]
    return sorted(paths)


def config_key(path: str) -> str:
    """A file's ConfigMap key: its path with ``/`` spelled ``__``."""
    key = path.replace("/", "__")
    if not re.fullmatch(r"[-._a-zA-Z0-9]+", key) or len(key) > 253:
        raise ValueError(f"{path}: not a valid ConfigMap key once flattened ({key!r})")
    return key


def config_map(root: Path = ROOT) -> dict[str, Any]:
    """ConfigMap agent-gateway-config with the hub's files."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "agent-gateway-config",
            "namespace": HUB_NAMESPACE,
            "labels": {"app.kubernetes.io/name": "agent-gateway"},
        },
        "data": {config_key(p): (root / p).read_text(encoding="utf-8") for p in config_paths(root)},
    }


def _quantity_bytes(value: str) -> str:
    """A tmpfs ``size=64m`` as a Kubernetes quantity."""
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", value.lower()).groups()  # type: ignore[union-attr]
    return number + {"": "", "k": "Ki", "m": "Mi", "g": "Gi"}[unit]


def _tmpfs_volumes(spec: ContainerSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes, mounts = [], []
    for i, (path, options) in enumerate(sorted(spec.tmpfs.items())):
        opts = dict(o.partition("=")[::2] for o in options.split(","))
        empty: dict[str, Any] = {"medium": "Memory"}
        if opts.get("size"):
            empty["sizeLimit"] = _quantity_bytes(opts["size"])
        name = f"tmpfs-{i}"
        volumes.append({"name": name, "emptyDir": empty})
        mounts.append({"name": name, "mountPath": path})
    return volumes, mounts


def agent_pod(spec: ContainerSpec, *, network: str) -> dict[str, Any]:
    """The pod for ``spec`` (a guardrailed container spec); ValueError for a guardrail that
    has no pod-spec form, so none is dropped silently."""
    unknown = [o for o in spec.security_opt if o != "no-new-privileges:true"]
    if unknown:
        raise ValueError(f"security options with no pod-spec form: {unknown}")
    uid, _, gid = spec.user.partition(":")
    volumes, mounts = _tmpfs_volumes(spec)
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    env += [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": SECRETS, "key": secret}}}
        for var, secret in sorted(spec.secret_env.items())
    ]
    limits = {"cpu": f"{spec.nano_cpus // 1_000_000}m", "memory": str(spec.memory_bytes)}
    container: dict[str, Any] = {
        "name": "agent",
        "image": spec.image,
        "ports": [{"name": "agent", "containerPort": spec.port, "protocol": "TCP"}],
        "env": env,
        "resources": {"limits": limits, "requests": dict(limits)},
        "securityContext": {
            # no-new-privileges, spelled the other way round.
            "allowPrivilegeEscalation": "no-new-privileges:true" not in spec.security_opt,
            "capabilities": {"drop": list(spec.cap_drop)},
            "privileged": False,
            "readOnlyRootFilesystem": spec.read_only,
            "runAsNonRoot": True,
        },
        "volumeMounts": mounts,
    }
    if spec.stdin:
        container["stdin"] = True
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": spec.name,
            "namespace": AGENT_NAMESPACE,
            "labels": {**spec.labels, NETWORK_LABEL: network},
        },
        "spec": {
            "restartPolicy": "Never",
            # The TTL, enforced by the kubelet even when no hub is left.
            "activeDeadlineSeconds": spec.ttl_s,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "hostNetwork": False,
            "hostPID": False,
            "hostIPC": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": int(uid),
                "runAsGroup": int(gid),
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": volumes,
        },
    }


def example_agent_pod(root: Path = ROOT) -> dict[str, Any]:
    """The echo agent's pod under ``EXAMPLE_SANDBOX``, with fixed task, hub and expiry."""
    registry = load_registry(root / "agents.yaml", SchemaSet.load(root / "schemas"))
    spec = build_spec(
        agent=registry.get("echo"),
        sandbox=dict(EXAMPLE_SANDBOX),
        task_id=EXAMPLE_TASK,
        hub_id=EXAMPLE_HUB,
        networks=NETWORKS,
        timeout_s=registry.get("echo").timeout_s,
        ttl_grace_s=60,
        gateway_url=HUB_URL,
    )
    pod = agent_pod(spec, network=str(EXAMPLE_SANDBOX["network"]))
    # The two values that differ per start (a random suffix, the clock): fixed, so the
    # committed file can be compared with a fresh rendering.
    pod["metadata"]["name"] = f"agw-echo-{EXAMPLE_TASK[:8]}-000000"
    pod["metadata"]["labels"]["io.agent-gateway.expires"] = EXAMPLE_EXPIRES
    return pod


HEADER = {
    "agent-pod": (
        "# Generated by `python3 deploy/k8s/render.py agent-pod`: the echo agent's pod under the\n"
        "# sandbox dispatch.rego grants it (deploy/k8s/README.md, 'The sandbox as a pod').\n"
    ),
    "config": "# Generated by `python3 deploy/k8s/render.py config` from this checkout.\n",
}


def render(what: str, root: Path = ROOT) -> str:
    """The YAML text of ``what`` (``config`` or ``agent-pod``)."""
    doc = config_map(root) if what == "config" else example_agent_pod(root)
    return HEADER[what] + yaml.safe_dump(doc, sort_keys=False, width=100)


def main(argv: list[str]) -> int:
    """Print the object named on the command line."""
    if len(argv) != 1 or argv[0] not in HEADER:
        print(f"usage: render.py {{{'|'.join(HEADER)}}}", file=sys.stderr)
        return 2
    sys.stdout.write(render(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
