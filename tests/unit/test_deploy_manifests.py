"""deploy/: the Kubernetes manifests against Kubernetes' schemas, the sandbox-as-a-pod
mapping against its example, and the Swarm stack file against the hub's CLI and the
Swarm backend's network checks."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.cli import NETWORKS, build_parser
from gateway.containers.backend import ContainerSpec
from gateway.containers.swarm import check_overlay
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes still supported upstream when these were written; the fields used
# are all older than it.
K8S_VERSION = "1.30"
# ContainerSpec fields that say what runs, not how it is fenced in: every other field is a
# guardrail and must have a row in deploy/k8s/README.md's table.
NOT_GUARDRAILS = {"name", "image", "port", "env", "secret_env", "stdin", "accepted_equivalents"}


def load_render() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_k8s_render", K8S / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_render()


def manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted([*K8S.glob("*.yaml"), *K8S.glob("examples/*.yaml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append(
                    (f"{path.relative_to(REPO)}:{doc['kind']}/{doc['metadata']['name']}", doc)
                )
    docs.append(("render.py config", render.config_map()))
    return docs


def validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pointer(doc: Any, ptr: str) -> Any:
    """The value at a JSON pointer (RFC 6901)."""
    for raw in ptr.lstrip("/").split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def parse_serve(argv: list[str]) -> Any:
    """``argv`` parsed by the hub's own CLI; a flag it does not know fails with its name."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"agent-gateway does not accept {argv} (see its stderr above)")


def mapping_rows() -> list[dict[str, str]]:
    """The rows of the sandbox table in deploy/k8s/README.md."""
    text = (K8S / "README.md").read_text()
    section = text.split("## The sandbox as a pod", 1)[1]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("guardrail", "---"):
            continue
        guardrail, what, docker_form, pod, value = cells
        rows.append(
            {
                "guardrail": guardrail,
                "what": what,
                "docker": docker_form,
                "pod": pod,
                "value": value,
            }
        )
    return rows


# --- Kubernetes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "doc"), manifests(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_manifest_is_valid_kubernetes(name: str, doc: dict[str, Any]) -> None:
    validate(doc)


def test_the_validator_refuses_what_kubernetes_would() -> None:
    pod = render.example_agent_pod()
    validate(pod)
    typo = copy.deepcopy(pod)
    typo["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(typo)
    wrong_type = copy.deepcopy(pod)
    wrong_type["spec"]["activeDeadlineSeconds"] = "ninety"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong_type)


def test_the_example_agent_pod_is_what_render_makes() -> None:
    committed = (K8S / "examples" / "agent-pod.yaml").read_text()
    assert committed == render.render("agent-pod"), (
        "deploy/k8s/examples/agent-pod.yaml is stale: "
        "python3 deploy/k8s/render.py agent-pod > deploy/k8s/examples/agent-pod.yaml"
    )


def test_the_agent_pod_carries_every_row_of_the_sandbox_table() -> None:
    pod = yaml.safe_load((K8S / "examples" / "agent-pod.yaml").read_text())
    rows = mapping_rows()
    assert len(rows) >= 20, rows
    checked = 0
    for row in rows:
        ptr = re.fullmatch(r"`(/[^`]+)`", row["pod"])
        if ptr is None:
            # A guardrail the pod spec cannot carry: the row says so and why.
            assert row["pod"].startswith("none: ") and len(row["pod"]) > 20, row
            assert row["value"] == "", row
            continue
        value = re.fullmatch(r"`(.+)`", row["value"])
        assert value is not None, row
        assert pointer(pod, ptr.group(1)) == json.loads(value.group(1)), row
        checked += 1
    assert checked >= 20


def test_every_guardrail_of_the_container_spec_has_a_row() -> None:
    guardrails = {f.name for f in dataclasses.fields(ContainerSpec)} - NOT_GUARDRAILS
    mapped = {row["guardrail"].strip("`") for row in mapping_rows()}
    missing = guardrails - mapped
    assert not missing, f"ContainerSpec guardrails with no row in deploy/k8s/README.md: {missing}"


def test_the_agent_pod_meets_pod_security_restricted() -> None:
    # The profile's rules, so the namespace's admission would take the pod.
    pod = render.example_agent_pod()
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "add" not in sc["capabilities"]
    assert all(set(v) <= {"name", "emptyDir"} for v in spec["volumes"])
    assert not (spec["hostNetwork"] or spec["hostPID"] or spec["hostIPC"])


def test_a_guardrail_with_no_pod_form_is_refused_not_dropped() -> None:
    spec = ContainerSpec(
        name="agw-x",
        image="img",
        port=8000,
        env={},
        labels={},
        network="internal",
        memory_bytes=64 * 1024 * 1024,
        nano_cpus=500_000_000,
        pids_limit=32,
        ttl_s=90,
        security_opt=("no-new-privileges:true", "apparmor=agent"),
    )
    with pytest.raises(ValueError, match="apparmor"):
        render.agent_pod(spec, network="internal")


def test_the_hub_mounts_every_config_file_of_the_checkout() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / "hub.yaml").read_text())}
    volumes = docs["Deployment"]["spec"]["template"]["spec"]["volumes"]
    config = next(v for v in volumes if v["name"] == "config")
    (source,) = config["projected"]["sources"]
    items = [(i["key"], i["path"]) for i in source["configMap"]["items"]]
    expected = [(render.config_key(p), p) for p in render.config_paths()]
    assert items == expected, (
        "the hub Deployment's config items differ from the checkout's files "
        "(deploy/k8s/hub.yaml, volume 'config')"
    )
    assert set(render.config_map()["data"]) == {k for k, _ in items}


def test_the_hub_deployment_runs_the_documented_command() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / "hub.yaml").read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (hub,) = pod["containers"]
    args = parse_serve(hub["args"])
    assert args.store.startswith("postgresql://")
    assert args.hub_id == "$(POD_NAME)"
    assert hub["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in hub["volumeMounts"]}
    for path in (args.agents, args.schemas, args.policies, args.limits, args.keys):
        assert any(str(path).startswith(m + "/") for m in mounts), path


# --- Swarm -----------------------------------------------------------------------------


def stack() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_the_stack_runs_two_hubs_on_postgresql_with_the_swarm_backend() -> None:
    doc = stack()
    hubs = {name: s for name, s in doc["services"].items() if name.startswith("hub-")}
    assert len(hubs) == 2
    ids = set()
    for name, service in hubs.items():
        args = parse_serve(service["command"])
        assert args.backend == "swarm", name
        assert args.store.startswith("postgresql://") and "@postgres:" in args.store, name
        ids.add(args.hub_id)
        assert args.keys == Path("/run/secrets/agw-keys"), name
        assert "agents" in service["networks"] and "store" in service["networks"]
        targets = {
            v["target"] if isinstance(v, dict) else v.split(":")[1] for v in service["volumes"]
        }
        assert {"/var/run/docker.sock", "/var/lib/agent-gateway"} <= targets, name
        assert service["deploy"]["placement"]["constraints"] == ["node.role == manager"]
        for secret in service["secrets"]:
            assert secret["source"] in doc["secrets"]
    assert len(ids) == 2, "each hub needs its own --hub-id"
    assert "agents" not in doc["services"]["postgres"]["networks"]


def test_the_agents_overlay_is_the_one_the_swarm_backend_accepts() -> None:
    net = stack()["networks"]["agents"]
    assert net["name"] == NETWORKS["swarm"][0]
    # The flags as `docker network inspect` will show them.
    check_overlay(
        {
            "Name": net["name"],
            "Driver": net["driver"],
            "Internal": net.get("internal", False),
            "Attachable": net.get("attachable", False),
            "Options": net.get("driver_opts") or {},
        },
        internal=True,
    )


def test_the_stack_file_parses_as_docker_stack_deploy_would() -> None:
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        pytest.skip("no docker CLI: the structure is checked by the tests above")
    env = {**os.environ, "DOCKER_GID": "999"}
    done = subprocess.run(
        [docker_cli, "stack", "config", "-c", str(DEPLOY / "compose.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    if done.returncode != 0 and "unknown command" in (done.stderr + done.stdout):
        pytest.skip("this docker CLI has no 'stack config'")
    assert done.returncode == 0, done.stdout + done.stderr
    merged = yaml.safe_load(done.stdout)
    # The x-hub anchor merged into both hubs, the user's group interpolated.
    assert merged["services"]["hub-1"]["user"] == "10001:999"
    assert merged["services"]["hub-2"]["environment"]["PGPASSFILE"] == "/run/secrets/agw-pgpass"
    missing = subprocess.run(
        [docker_cli, "stack", "config", "-c", str(DEPLOY / "compose.yaml")],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "DOCKER_GID"},
        timeout=60,
        check=False,
    )
    assert missing.returncode != 0 and "DOCKER_GID" in missing.stderr + missing.stdout
