"""Secrets stay secret and acknowledged writes are durable (issue 10, item 5).

- fields marked ``x-secret`` are masked in message and delegation decisions, not only in
  dispatch decisions, and reach no row of the decision log;
- registry ``env`` values never leave the hub (API, policy input and data, stored
  revisions); ``{secret: NAME}`` entries are read from a 0600 secrets file at container
  start, and a missing or exposed secret stops the start before any container exists;
- the state directory is 0700 and the database and its -wal/-shm 0600 whatever the umask;
- SQLite runs with ``synchronous=FULL``.

The Docker side (the engine gets the secret, nothing else does) is in
tests/integration/test_secrets_docker.py.
"""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.bundle.registry import load_registry
from gateway.bundle.schemas import SchemaSet
from gateway.cli import build_parser, persistent_hub_id
from gateway.containers.backend import LABEL_AGENT
from gateway.containers.docker import DockerBackend
from gateway.containers.guardrails import build_spec
from gateway.containers.secrets import read_secrets, resolve_env
from gateway.decisionlog.masking import REDACTED, SecretPointers
from gateway.errors import ConfigError, SecretUnavailable
from gateway.store import Store
from tests.conftest import REPO, auth, make_settings
from tests.unit.test_messages import AgentEnvBackend, Ctx

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cr3t-a7f0c2e9d41b"


@pytest.fixture
async def make_ctx(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any
) -> AsyncIterator[Callable[..., Awaitable[Ctx]]]:
    made: list[Ctx] = []

    async def make(**settings: Any) -> Ctx:
        from gateway.http.app import create_app

        backend = AgentEnvBackend()
        s = make_settings(tmp_path, **settings)
        client = await aiohttp_client(create_app(s, backend=backend))
        backend.gateway_url = str(client.make_url("")).rstrip("/")
        made.append(Ctx(client, backend, keys, s.state_dir))
        return made[-1]

    yield make
    for ctx in made:
        await ctx.client.close()
    made.clear()
    gc.collect()  # the regorus engine goes on this thread (see test_messages)


def dump_rows(db_path: Path) -> list[str]:
    """Every row of every table as SQL text (what a grep of the file would find)."""
    conn = sqlite3.connect(db_path)
    try:
        return [line for line in conn.iterdump() if line.startswith("INSERT INTO")]
    finally:
        conn.close()


def tables_holding(db_path: Path, text: str) -> set[str]:
    return {line.split('"')[1] for line in dump_rows(db_path) if text in line}


# --- x-secret in message and delegation decisions ----------------------------------------


async def test_a_delegated_secret_input_is_masked_in_every_decision(
    make_ctx: Callable[..., Awaitable[Ctx]],
) -> None:
    ctx = await make_ctx()
    parent = await ctx.probe(expect=0)
    envelope = {
        "type": "delegate",
        "to": "echo",
        "kind": "task.delegate",
        "payload": {"input": {"api_key": SECRET, "part": 1}, "timeout_s": 10},
    }

    status, body = await ctx.send(parent, envelope, "?wait=10")

    assert status == 200, body
    # The child agent got the value: masking is of the log, not of the task.
    assert body["result"]["echo"] == {"api_key": SECRET, "part": 1}
    message = await ctx.hub.decisions.get(body["message_decision_id"])
    assert message["input"]["message"]["payload"]["input"] == {"api_key": REDACTED, "part": 1}
    assert message["masked"] == ["/message/payload/input/api_key"]
    dispatch = await ctx.hub.decisions.get(body["decision_id"])
    assert dispatch["input"]["task"]["input"] == {"api_key": REDACTED, "part": 1}
    assert dispatch["masked"] == ["/task/input/api_key"]
    # Grep the database: the task store keeps what ran (input, result), no decision holds it.
    assert tables_holding(ctx.state_dir / "gateway.db", SECRET) == {"tasks"}
    assert tables_holding(ctx.state_dir / "gateway.db", REDACTED) >= {"decisions"}


async def test_a_secret_in_a_refused_delegation_is_masked_too(
    make_ctx: Callable[..., Awaitable[Ctx]],
) -> None:
    ctx = await make_ctx(max_delegation_depth=0)
    parent = await ctx.probe(expect=0)
    status, body = await ctx.send(
        parent,
        {
            "type": "delegate",
            "to": "echo",
            "kind": "task.delegate",
            "payload": {"input": {"api_key": SECRET}},
        },
    )
    assert status == 403 and body["error"]["code"] == "delegation_too_deep"
    record = await ctx.hub.decisions.get(body["error"]["decision_id"])
    assert record["input"]["message"]["payload"]["input"]["api_key"] == REDACTED
    assert SECRET not in json.dumps(record)
    assert "decisions" not in tables_holding(ctx.state_dir / "gateway.db", SECRET)


async def test_x_secret_fields_of_a_message_kind_are_masked(
    make_ctx: Callable[..., Awaitable[Ctx]], config_copy: Callable[[], Path]
) -> None:
    root = config_copy()
    kind = root / "schemas" / "messages" / "kinds" / "ping.json"
    schema = json.loads(kind.read_text())
    schema["properties"] = {"password": {"type": "string", "x-secret": True}}
    kind.write_text(json.dumps(schema))
    ctx = await make_ctx(schemas_dir=root / "schemas")
    target = await ctx.probe()
    sender = await ctx.probe(expect=0)

    status, body = await ctx.send(
        sender, {"type": "request", "to": "probe", "kind": "ping", "payload": {"password": SECRET}}
    )

    assert status == 200, body
    assert body["reply"]["echo"] == {"password": SECRET}  # delivered as sent
    record = await ctx.hub.decisions.get(body["decision_id"])
    assert record["input"]["message"]["payload"] == {"password": REDACTED}
    assert record["masked"] == ["/message/payload/password"]
    assert "decisions" not in tables_holding(ctx.state_dir / "gateway.db", SECRET)
    assert target.task_id


def test_secret_pointers_are_cached_per_schema_set() -> None:
    docs: dict[str, Any] = {"a.json": {"properties": {"k": {"x-secret": True}}}}
    cache = SecretPointers()
    assert cache.of(docs, "a.json", "/p") == ("/p/k",)
    docs["a.json"] = {"properties": {"other": {"x-secret": True}}}
    assert cache.of(docs, "a.json", "/p") == ("/p/k",)  # the same documents: cached
    reloaded = {"a.json": docs["a.json"]}
    assert cache.of(reloaded, "a.json", "/p") == ("/p/other",)  # a reload: computed again
    assert cache.of(reloaded, "missing.json", "/p") == ()


# --- registry env --------------------------------------------------------------------------

ENV_AGENT = """\
version: 1
agents:
  - name: echo
    image: agent-gateway/echo:dev
    capabilities: [debug.echo]
    input_schema: agents/echo.input.json
    output_schema: agents/echo.output.json
    port: 8000
    env:
      ECHO_MODE: literal-value-5e1d
      ECHO_TOKEN: {secret: echo-token}
"""


def test_env_values_are_hidden_in_the_registry_json(tmp_path: Path) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text(ENV_AGENT)
    spec = load_registry(path, SchemaSet.load(REPO / "schemas")).get("echo")
    assert spec.env == {"ECHO_MODE": "literal-value-5e1d"}
    assert spec.secret_env == {"ECHO_TOKEN": "echo-token"}
    assert spec.to_json()["env"] == {"ECHO_MODE": "***", "ECHO_TOKEN": "***"}
    assert "literal-value-5e1d" not in json.dumps(spec.to_json())


@pytest.mark.parametrize(
    "value",
    ["{secret: 'has space'}", "{secret: x, extra: 1}", "{}", "5", "{secret: ''}"],
)
def test_a_bad_env_entry_is_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text(ENV_AGENT.replace("{secret: echo-token}", value))
    with pytest.raises(ConfigError) as info:
        load_registry(path, SchemaSet.load(REPO / "schemas"))
    assert info.value.location == "agents.yaml:11", info.value
    assert "must be a string or {secret: NAME}" in info.value.message
    assert value not in info.value.message  # a value may be a credential: never quoted


def test_the_spec_carries_secret_names_not_values(tmp_path: Path) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text(ENV_AGENT)
    agent = load_registry(path, SchemaSet.load(REPO / "schemas")).get("echo")
    spec = build_spec(
        agent=agent,
        sandbox={
            "network": "internal",
            "memory_bytes": 64 * 1024 * 1024,
            "cpus": 0.5,
            "pids": 32,
            "read_only_root": True,
        },
        task_id="t1",
        hub_id="h",
        networks={"internal": "n"},
        timeout_s=5,
        ttl_grace_s=5,
        gateway_url="http://10.0.0.1:8080",
    )
    assert spec.env["ECHO_MODE"] == "literal-value-5e1d"
    assert "ECHO_TOKEN" not in spec.env
    assert spec.secret_env == {"ECHO_TOKEN": "echo-token"}


async def test_env_values_reach_no_caller_policy_or_stored_revision(
    make_ctx: Callable[..., Awaitable[Ctx]], config_copy: Callable[[], Path], keys: dict[str, str]
) -> None:
    root = config_copy()
    text = (root / "agents.yaml").read_text()
    (root / "agents.yaml").write_text(
        text.replace(
            "    resources: {memory: 64m, cpus: 0.5, pids: 32}\n",
            "    resources: {memory: 64m, cpus: 0.5, pids: 32}\n"
            "    env:\n"
            "      ECHO_MODE: literal-value-5e1d\n"
            "      ECHO_TOKEN: {secret: echo-token}\n",
            1,
        )
    )
    ctx = await make_ctx(agents_file=root / "agents.yaml")
    hidden = {"ECHO_MODE": "***", "ECHO_TOKEN": "***"}

    one = await (await ctx.client.get("/v1/agents/echo", headers=auth(keys["user"]))).json()
    every = await (await ctx.client.get("/v1/agents", headers=auth(keys["user"]))).json()
    resp = await ctx.client.post(
        "/v1/tasks?wait=10", json={"agent": "echo", "input": {}}, headers=auth(keys["user"])
    )
    task = await resp.json()

    assert one["env"] == hidden
    assert next(a for a in every["agents"] if a["name"] == "echo")["env"] == hidden
    assert ctx.hub.config.policy.data["agents"]["echo"]["env"] == hidden
    decision = await ctx.hub.decisions.get(task["decision_id"])
    assert decision["input"]["agent"]["env"] == hidden
    # The fake engine got the literal (the secret is resolved by the Docker backend only).
    (spec,) = [s for s in ctx.backend.started if s.labels[LABEL_AGENT] == "echo"]
    assert spec.env["ECHO_MODE"] == "literal-value-5e1d"
    assert spec.secret_env == {"ECHO_TOKEN": "echo-token"}
    revisions = await ctx.hub.store.read(
        lambda db: [r["agents"] for r in db.execute("SELECT agents FROM registry_revisions")]
    )
    assert revisions and all("ECHO_TOKEN" in r for r in revisions)
    assert tables_holding(ctx.state_dir / "gateway.db", "literal-value-5e1d") == set()


# --- the secrets file ---------------------------------------------------------------------


def secrets_file(tmp_path: Path, data: Any, *, mode: int = 0o600, name: str = "s.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    path.chmod(mode)
    return path


def test_the_secrets_file_is_json_or_yaml(tmp_path: Path) -> None:
    as_json = secrets_file(tmp_path, {"a": "1", "b": "two"})
    as_yaml = secrets_file(tmp_path, "a: '1'\nb: two\n", name="s.yaml")
    assert read_secrets(as_json) == read_secrets(as_yaml) == {"a": "1", "b": "two"}
    assert resolve_env(as_yaml, {"VAR": "b"}) == {"VAR": "two"}
    assert resolve_env(None, {}) == {}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_a_secrets_file_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = secrets_file(tmp_path, {"a": SECRET}, mode=mode)
    with pytest.raises(SecretUnavailable) as info:
        read_secrets(path)
    assert str(path) in info.value.message
    assert f"{mode:04o}" in info.value.message
    assert SECRET not in info.value.message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "does not exist"),
        ({"a": 1234}, "secret 'a' in"),
        ([SECRET], "is not a mapping"),
        (f"a: {SECRET}\n  b: [\n", "is not valid JSON or YAML at line"),
    ],
    ids=["missing file", "not a string", "not a mapping", "syntax error"],
)
def test_an_unusable_secrets_file_is_named_never_shown(
    tmp_path: Path, content: Any, expected: str
) -> None:
    path = tmp_path / "s.json" if content is None else secrets_file(tmp_path, content)
    with pytest.raises(SecretUnavailable) as info:
        read_secrets(path)
    assert expected in info.value.message and str(path) in info.value.message
    assert SECRET not in info.value.message


def test_a_missing_secret_is_named(tmp_path: Path) -> None:
    path = secrets_file(tmp_path, {"present": SECRET})
    with pytest.raises(SecretUnavailable) as info:
        resolve_env(path, {"A": "present", "B": "absent", "C": "gone"})
    assert info.value.message == f"secrets absent, gone not in {path}"
    assert info.value.details == {"missing": ["absent", "gone"], "file": str(path)}
    with pytest.raises(SecretUnavailable, match="no secrets file is set"):
        resolve_env(None, {"A": "present"})


class RecordingClient:
    """The part of docker.APIClient that DockerBackend.start uses, recording creations."""

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []

    def inspect_image(self, image: str) -> dict[str, Any]:
        return {"Config": {"Entrypoint": ["python"], "Cmd": ["agent.py"]}}

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    def create_networking_config(self, config: Any) -> Any:
        return config

    def create_endpoint_config(self) -> dict[str, Any]:
        return {}

    def create_container(self, image: str, **kwargs: Any) -> dict[str, str]:
        self.created.append(kwargs)
        return {"Id": "c1"}

    def start(self, cid: str) -> None:
        pass

    def inspect_container(self, cid: str) -> dict[str, Any]:
        return {"NetworkSettings": {"Networks": {"n": {"IPAddress": "10.0.0.9"}}}}

    def remove_container(self, cid: str, force: bool = False) -> None:
        pass


async def test_the_docker_backend_resolves_secrets_before_it_creates_anything(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text(ENV_AGENT)
    agent = load_registry(path, SchemaSet.load(REPO / "schemas")).get("echo")
    sandbox = {
        "network": "internal",
        "memory_bytes": 64 * 1024 * 1024,
        "cpus": 0.5,
        "pids": 32,
        "read_only_root": True,
    }
    spec = build_spec(
        agent=agent,
        sandbox=sandbox,
        task_id="t1",
        hub_id="h",
        networks={"internal": "n"},
        timeout_s=5,
        ttl_grace_s=5,
        gateway_url="http://10.0.0.1:8080",
    )
    file = tmp_path / "secrets.json"
    backend = DockerBackend(agent_port=8080, secrets_file=file)
    client = RecordingClient()
    backend._client = lambda: client  # type: ignore[method-assign, assignment, return-value]
    try:
        with pytest.raises(SecretUnavailable, match="does not exist"):
            await backend.start(spec)
        secrets_file(tmp_path, {"other": "x"}, name="secrets.json")
        with pytest.raises(SecretUnavailable, match="secret echo-token not in"):
            await backend.start(spec)
        assert client.created == []  # no container for a start that could not be set up
        secrets_file(tmp_path, {"echo-token": SECRET}, name="secrets.json")
        await backend.start(spec)
        (created,) = client.created
        assert created["environment"]["ECHO_TOKEN"] == SECRET
        assert created["environment"]["ECHO_MODE"] == "literal-value-5e1d"
        assert "ECHO_TOKEN" not in spec.env  # the spec the hub keeps never held the value
    finally:
        await backend.close()


def test_the_secrets_setting_and_flag() -> None:
    settings = make_settings(Path("/nonexistent-test-state"))
    assert settings.effective_secrets_file == Path("/nonexistent-test-state/state/secrets.json")
    assert settings.containers.secrets_file == settings.effective_secrets_file
    other = make_settings(Path("/x"), secrets_file=Path("/etc/hub/secrets.yaml"))
    assert other.containers.secrets_file == Path("/etc/hub/secrets.yaml")
    args = build_parser().parse_args(["serve", "--secrets", "/etc/hub/secrets.yaml"])
    assert args.secrets == Path("/etc/hub/secrets.yaml")
    assert build_parser().parse_args(["serve"]).secrets is None


# --- file modes and durability ----------------------------------------------------------


def mode_of(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask() -> Any:
    """Run with umask 000: whatever is private is so by the hub's doing, not the umask's."""
    old = os.umask(0)
    yield
    os.umask(old)


async def test_a_new_state_dir_and_database_are_private(tmp_path: Path, open_umask: Any) -> None:
    db = tmp_path / "state" / "gateway.db"
    store = Store(db)
    try:
        await store.write(lambda d: d.execute("CREATE TABLE t (x)"))
        assert mode_of(db.parent) == 0o700
        assert mode_of(db) == 0o600
        # Created by SQLite after the database file, with the database file's mode.
        assert mode_of(f"{db}-wal") == 0o600
        assert mode_of(f"{db}-shm") == 0o600
    finally:
        await store.close()


async def test_an_existing_state_dir_and_database_are_made_private(
    tmp_path: Path, open_umask: Any
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    db = state / "gateway.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        path.chmod(0o644)
    store = Store(db)
    try:
        assert mode_of(state) == 0o700
        assert [mode_of(p) for p in (db, f"{db}-wal", f"{db}-shm")] == [0o600] * 3
    finally:
        await store.close()
        conn.close()


def test_the_hub_id_file_is_made_in_a_private_dir(tmp_path: Path) -> None:
    persistent_hub_id(tmp_path / "state")
    assert mode_of(tmp_path / "state") & 0o077 == 0


async def test_the_store_runs_synchronous_full(tmp_path: Path) -> None:
    full = Store(tmp_path / "a.db")
    normal = Store(tmp_path / "b.db", synchronous="NORMAL")  # for the benchmark's baseline
    try:

        def pragma(d: Any) -> int:
            return int(d.execute("PRAGMA synchronous").fetchone()[0])

        assert await full.write(pragma) == 2  # FULL
        assert await normal.write(pragma) == 1  # NORMAL
    finally:
        await full.close()
        await normal.close()


def test_an_unknown_synchronous_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        Store(tmp_path / "gateway.db", synchronous="OFF")


def test_yaml_is_what_the_docs_show() -> None:
    # The README's example secrets file parses to the mapping it describes.
    readme = (REPO / "README.md").read_text()
    example = readme.split("```yaml\n# secrets.yaml", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(example) == {"calc-token": "replace-me", "db-password": "also-me"}
