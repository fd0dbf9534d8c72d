"""The Swarm backend's service spec, its refusals and its engine calls, on a fake client."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.bundle.registry import AgentSpec
from gateway.containers.backend import ContainerSpec
from gateway.containers.guardrails import SWARM_EQUIVALENTS, build_spec
from gateway.containers.swarm import (
    SwarmBackend,
    check_accepted,
    check_overlay,
    service_spec,
    tmpfs_size,
)
from gateway.errors import AgentUnavailable, GuardrailUnenforceable, GuardrailViolation

AGENT = AgentSpec(
    name="echo",
    image="agent-gateway/echo:dev",
    capabilities=("debug.echo",),
    input_schema="a.json",
    output_schema="b.json",
    port=8000,
)
ALL = ["no-new-privileges", "icc", "memory-swap"]
SANDBOX = {
    "network": "internal",
    "memory_bytes": 64 * 2**20,
    "cpus": 0.5,
    "pids": 32,
    "read_only_root": True,
    "mounts": [],
    "swarm_acceptable": ALL,
}
NETWORKS = {"internal": "ovl-int", "egress": "ovl-egr"}


def spec(**sandbox: Any) -> ContainerSpec:
    return build_spec(
        agent=AGENT,
        sandbox={**SANDBOX, **sandbox},
        task_id="t" * 36,
        hub_id="hub-1",
        networks=NETWORKS,
        timeout_s=10,
        ttl_grace_s=5,
        gateway_url="http://10.0.9.2:8080",
    )


def test_the_service_spec_carries_every_guardrail_a_service_can() -> None:
    s = spec()
    args = service_spec(s, ["python3", "/app/agent.py"], {"A": "1"})
    template = args["task_template"]
    c = template["ContainerSpec"]
    assert c["CapabilityDrop"] == ["ALL"]
    assert c["ReadOnly"] is True
    assert c["User"] == "65534:65534"
    assert c["Command"] == ["timeout", "-s", "TERM", "-k", "5", "15s"]
    assert c["Args"] == ["python3", "/app/agent.py"]
    assert c["Env"] == ["A=1"]
    assert c["StopGracePeriod"] == 10**9
    assert c["Mounts"] == [
        {
            "Target": "/tmp",
            "Source": None,
            "Type": "tmpfs",
            "ReadOnly": False,
            "TmpfsOptions": {"SizeBytes": 64 * 2**20, "Mode": 0o1777},
        }
    ]
    assert c["Labels"]["io.agent-gateway.task"] == "t" * 36
    assert template["Resources"]["Limits"] == {
        "NanoCPUs": 500_000_000,
        "MemoryBytes": 64 * 2**20,
        "Pids": 32,
    }
    assert template["RestartPolicy"]["Condition"] == "none"
    assert [n["Target"] for n in template["Networks"]] == ["ovl-int"]
    assert args["labels"] == s.labels and args["labels"]["io.agent-gateway.hub"] == "hub-1"
    assert args["endpoint_spec"]["Mode"] == "dnsrr"
    assert "Ports" not in args["endpoint_spec"]


def test_a_root_user_is_refused_in_the_service_spec() -> None:
    s = dataclasses.replace(spec(), user="0:0")
    with pytest.raises(AgentUnavailable, match="0:0"):
        service_spec(s, ["x"], {})


def test_an_equivalent_the_sandbox_did_not_accept_is_refused_by_name() -> None:
    with pytest.raises(GuardrailUnenforceable) as e:
        check_accepted(spec(swarm_acceptable=[]), egress_network="ovl-egr")
    assert e.value.details["guardrail"] == "no-new-privileges"
    assert "no-new-privileges" in e.value.message
    with pytest.raises(GuardrailUnenforceable, match="icc"):
        check_accepted(spec(swarm_acceptable=["no-new-privileges"]), egress_network="ovl-egr")
    assert check_accepted(spec(), egress_network="ovl-egr") == ALL
    # Without a swarm_acceptable key nothing is accepted.
    no_key = {k: v for k, v in SANDBOX.items() if k != "swarm_acceptable"}
    bare = build_spec(
        agent=AGENT,
        sandbox=no_key,
        task_id="t" * 36,
        hub_id="h",
        networks=NETWORKS,
        timeout_s=1,
        ttl_grace_s=1,
        gateway_url="http://x",
    )
    assert bare.accepted_equivalents == frozenset()
    with pytest.raises(GuardrailUnenforceable):
        check_accepted(bare, egress_network="ovl-egr")


def test_egress_also_needs_the_host_firewall_equivalent() -> None:
    with pytest.raises(GuardrailUnenforceable, match="host-firewall"):
        check_accepted(spec(network="egress"), egress_network="ovl-egr")
    accepted = spec(network="egress", swarm_acceptable=[*ALL, "host-firewall"])
    assert "host-firewall" in check_accepted(accepted, egress_network="ovl-egr")


def test_what_has_no_equivalent_is_refused_whatever_the_sandbox_accepts() -> None:
    everything = spec(swarm_acceptable=list(SWARM_EQUIVALENTS))
    for changed in (
        {"security_opt": ("seccomp=unconfined",)},
        {"stdin": True},
    ):
        with pytest.raises(GuardrailUnenforceable):
            check_accepted(dataclasses.replace(everything, **changed), egress_network="e")
    with pytest.raises(GuardrailUnenforceable, match="exec"):
        tmpfs_size("rw,exec,size=1m")
    assert tmpfs_size("rw,noexec,nosuid,nodev,size=8m") == 8 * 2**20


def test_an_unknown_equivalent_in_the_sandbox_is_a_guardrail_violation() -> None:
    with pytest.raises(GuardrailViolation, match="swarm_acceptable"):
        spec(swarm_acceptable=["seccomp"])
    with pytest.raises(GuardrailViolation, match="swarm_acceptable"):
        spec(swarm_acceptable=True)


def test_only_an_internal_encrypted_attachable_overlay_is_accepted() -> None:
    good = {
        "Name": "n",
        "Driver": "overlay",
        "Internal": True,
        "Attachable": True,
        "Options": {"encrypted": ""},
    }
    check_overlay(good, internal=True)
    for bad in ({"Driver": "bridge"}, {"Internal": False}, {"Attachable": False}, {"Options": {}}):
        with pytest.raises(AgentUnavailable):
            check_overlay({**good, **bad}, internal=True)
    check_overlay({**good, "Internal": False}, internal=False)


# --- the backend on a fake engine -----------------------------------------------------------


class FakeEngine:
    """Just enough of docker.APIClient for the Swarm backend; records the calls."""

    def __init__(self, *, states: list[str], api_version: str = "1.41") -> None:
        self.api_version = api_version
        self.states = states
        self.swarm = {"LocalNodeState": "active", "ControlAvailable": True}
        self.calls: list[str] = []
        self.created: dict[str, Any] = {}
        self.networks_made: list[dict[str, Any]] = []
        self.removed: list[str] = []

    def ping(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        return {"Swarm": self.swarm}

    def inspect_image(self, image: str) -> dict[str, Any]:
        return {"Config": {"Cmd": ["python3", "/app/agent.py"]}}

    def create_service(self, **kwargs: Any) -> dict[str, str]:
        self.calls.append("create_service")
        self.created = kwargs
        return {"ID": "svc1"}

    def tasks(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return [
            {
                "ServiceID": "svc1",
                "CreatedAt": "2026-01-01T00:00:00.123456789Z",
                "Status": {"State": state, "Err": "no such image" if state == "rejected" else ""},
                "NetworksAttachments": [
                    {
                        "Network": {"ID": "nid", "Spec": {"Name": "ovl-int"}},
                        "Addresses": ["10.0.9.7/24"],
                    }
                ],
            }
        ]

    def remove_service(self, sid: str) -> None:
        self.removed.append(sid)

    def containers(self, **kwargs: Any) -> list[Any]:
        return []

    def services(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "ID": "svc1",
                "CreatedAt": "2026-01-01T00:00:00.5Z",
                "Spec": {"Name": "agw-echo", "Labels": {"io.agent-gateway.managed": "true"}},
            }
        ]

    def networks(self, names: list[str]) -> list[dict[str, Any]]:
        return [n for n in self.networks_made if n["Name"] in names]

    def create_network(self, name: str, **kwargs: Any) -> dict[str, str]:
        self.networks_made.append({"Name": name, "Id": "id-" + name, **kwargs})
        return {"Id": "id-" + name}

    def inspect_network(self, ref: str) -> dict[str, Any]:
        made = next(n for n in self.networks_made if ref in (n["Name"], n["Id"]))
        name = made["Name"]
        return {
            "Name": name,
            "Id": "id-" + name,
            "Driver": made["driver"],
            "Internal": made["internal"],
            "Attachable": made["attachable"],
            "Options": made["options"],
            "Containers": {},
        }


def backend(engine: FakeEngine, **kwargs: Any) -> SwarmBackend:
    b = SwarmBackend(
        internal_network="ovl-int", egress_network="ovl-egr", agent_port=8080, poll_s=0, **kwargs
    )
    b._client = lambda: engine  # type: ignore[assignment,method-assign,return-value]
    return b


async def test_start_waits_for_the_task_and_returns_its_overlay_address() -> None:
    engine = FakeEngine(states=["pending", "starting", "running"])
    b = backend(engine)
    handle = await b.start(spec())
    assert (handle.id, handle.address, handle.port) == ("svc1", "10.0.9.7", 8000)
    assert engine.created["name"] == handle.name
    assert engine.removed == []
    await b.close()


async def test_a_refused_guardrail_creates_nothing() -> None:
    engine = FakeEngine(states=["running"])
    b = backend(engine)
    with pytest.raises(GuardrailUnenforceable, match="no-new-privileges"):
        await b.start(spec(swarm_acceptable=[]))
    assert engine.calls == []
    await b.close()


async def test_a_task_that_ends_before_running_removes_its_service() -> None:
    engine = FakeEngine(states=["pending", "rejected"])
    b = backend(engine)
    with pytest.raises(AgentUnavailable, match=r"rejected \(no such image"):
        await b.start(spec())
    assert engine.removed == ["svc1"]
    await b.close()


async def test_secrets_go_into_the_service_env(tmp_path: Path) -> None:
    file = tmp_path / "secrets.json"
    file.write_text(json.dumps({"tok": "s3cret"}))
    os.chmod(file, 0o600)
    engine = FakeEngine(states=["running"])
    b = backend(engine, secrets_file=file)
    await b.start(dataclasses.replace(spec(), secret_env={"TOKEN": "tok"}))
    assert "TOKEN=s3cret" in engine.created["task_template"]["ContainerSpec"]["Env"]
    await b.close()


async def test_ping_refuses_an_old_engine_and_a_non_manager() -> None:
    with pytest.raises(AgentUnavailable, match=r"older than 1\.41"):
        await backend(FakeEngine(states=["running"], api_version="1.40")).ping()
    engine = FakeEngine(states=["running"])
    engine.swarm = {"LocalNodeState": "inactive"}
    with pytest.raises(AgentUnavailable, match="not a Swarm manager"):
        await backend(engine).ping()


async def test_prepare_makes_encrypted_overlays_and_needs_the_hub_on_them() -> None:
    engine = FakeEngine(states=["running"])
    with pytest.raises(AgentUnavailable, match="not attached to the overlay 'ovl-int'"):
        await backend(engine).prepare()
    made = {n["Name"]: n for n in engine.networks_made}
    assert made["ovl-int"]["driver"] == "overlay"
    assert made["ovl-int"]["internal"] is True and made["ovl-egr"]["internal"] is False
    assert all(n["attachable"] and n["options"] == {"encrypted": ""} for n in made.values())
    facts = await backend(engine, agent_address="10.0.9.2").prepare()
    assert facts["internal_gateway"] == "10.0.9.2"
    assert len(engine.networks_made) == 2  # found, not made again


async def test_list_managed_reports_services_with_their_task_state() -> None:
    engine = FakeEngine(states=["running"])
    [found] = await backend(engine).list_managed("hub-1")
    assert (found["id"], found["name"], found["state"]) == ("svc1", "agw-echo", "running")
    assert found["created"] == 1767225600.0


async def test_limits_cannot_change_in_place() -> None:
    with pytest.raises(AgentUnavailable, match="warm pools"):
        await backend(FakeEngine(states=["running"])).update_limits(
            "svc1", memory_bytes=1, nano_cpus=1, pids_limit=8
        )
