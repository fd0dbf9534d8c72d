"""Guardrails refuse what they cannot enforce; API keys are stored hashed and checked."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gateway.bundle.registry import AgentSpec
from gateway.containers.docker import check_user
from gateway.containers.guardrails import build_spec
from gateway.errors import AgentUnavailable, GuardrailViolation, Unauthorized
from gateway.identity.apikeys import KeyStore

AGENT = AgentSpec(
    name="echo",
    image="agent-gateway/echo:dev",
    capabilities=("debug.echo",),
    input_schema="a.json",
    output_schema="b.json",
    port=8000,
)
GOOD = {
    "network": "internal",
    "memory_bytes": 64 * 2**20,
    "cpus": 0.5,
    "pids": 32,
    "read_only_root": True,
    "mounts": [],
}


def spec(sandbox: Any) -> Any:
    return build_spec(
        agent=AGENT,
        sandbox=sandbox,
        task_id="t" * 36,
        hub_id="hub-1",
        networks={"internal": "net-int", "egress": "net-egr"},
        timeout_s=10,
        ttl_grace_s=5,
        gateway_url="http://10.0.0.1:8080",
    )


def test_a_granted_sandbox_becomes_a_hardened_spec() -> None:
    s = spec(GOOD)
    assert (s.memory_bytes, s.nano_cpus, s.pids_limit) == (64 * 2**20, 500_000_000, 32)
    assert s.network == "net-int"
    assert s.cap_drop == ("ALL",)
    assert s.security_opt == ("no-new-privileges:true",)
    assert s.read_only
    assert {"noexec", "nosuid", "nodev"} <= set(s.tmpfs["/tmp"].split(","))
    assert s.user == "65534:65534"
    assert check_user(s.user) == s.user
    assert s.ttl_s == 15
    assert int(s.labels["io.agent-gateway.expires"]) <= time.time() + 16
    assert s.labels["io.agent-gateway.task"] == "t" * 36
    assert s.env["GATEWAY_URL"] == "http://10.0.0.1:8080"


@pytest.mark.parametrize("user", ["root", "0:0", "0", "65534:0", "0:65534", "app", "1000", ""])
def test_containers_never_run_as_root_or_a_named_user(user: str) -> None:
    with pytest.raises(AgentUnavailable, match="not a non-zero uid:gid"):
        check_user(user)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (None, "granted no sandbox"),
        ({"network": "host"}, "sandbox.network 'host'"),
        ({"read_only_root": False}, "read_only_root must be true"),
        ({"mounts": ["/etc:/etc"]}, "mounts are not supported"),
        ({"memory_bytes": 1024}, "memory_bytes=1024 is outside"),
        ({"cpus": "2"}, "cpus is missing or not a number"),
        ({"pids": True}, "pids is missing or not a number"),
        ({"privileged": True}, "cannot enforce"),
    ],
)
def test_guardrails_refuse_what_was_not_granted(change: Any, message: str) -> None:
    sandbox = None if change is None else {**GOOD, **change}
    with pytest.raises(GuardrailViolation, match=message.replace("(", r"\(")):
        spec(sandbox)


def test_keys_are_hashed_and_verified(tmp_path: Path) -> None:
    store = KeyStore.load(tmp_path / "keys.json")
    key = store.create("alice", ["user", "developer"])
    text = (tmp_path / "keys.json").read_text()
    # The secret may itself contain "_": split off the prefix and the id only.
    assert key not in text and key.split("_", 2)[2] not in text
    assert (tmp_path / "keys.json").stat().st_mode & 0o777 == 0o600
    subject = KeyStore.load(tmp_path / "keys.json").authenticate(key)
    assert (subject.id, subject.roles) == ("alice", ("user", "developer"))
    with pytest.raises(Unauthorized, match="unknown or revoked"):
        store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B"))
    with pytest.raises(Unauthorized, match="malformed"):
        store.authenticate("agk_short")
    with pytest.raises(Unauthorized, match="missing"):
        store.authenticate(None)
    with pytest.raises(ValueError, match="not a valid role"):
        store.create("bob", ["Root!"])


def test_a_running_store_picks_up_new_keys(tmp_path: Path) -> None:
    running = KeyStore.load(tmp_path / "keys.json")
    key = KeyStore.load(tmp_path / "keys.json").create("carol", ["user"])
    running.refresh(every_s=0)
    assert running.authenticate(key).id == "carol"
    (tmp_path / "keys.json").write_text("{broken")
    running.refresh(every_s=0)
    assert running.authenticate(key).id == "carol"  # a broken file keeps the old keys
