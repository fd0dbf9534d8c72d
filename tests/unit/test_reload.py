"""Hot reload: revisions in every decision, the file watcher, refusals with file:line while
the old revision keeps serving, and no in-flight request failing across reloads.

Each test runs a hub (fake container backend, real example agents in-process) on a copy of
agents.yaml, schemas/ and policies/ that it edits.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.bundle.revision import split_revision
from gateway.cli import main
from gateway.http.app import HUB, create_app
from gateway.settings import Settings, SettingsError
from tests.conftest import FakeBackend, auth, make_settings

ECHO = {"capability": "debug.echo", "input": {"hello": "world"}}
# A valid policy change that the shipped policy tests still pass (they use other subjects).
PAUSE_DEVELOPERS = '\ndeny contains "developers are paused" if input.subject.id == "developer"\n'


@pytest.fixture
async def reload_hub(
    tmp_path: Path, keys: dict[str, str], aiohttp_client: Any, config_copy: Callable[[], Path]
) -> Any:
    """Make a hub over an editable copy of the files: ``await reload_hub(poll_s=...)``."""

    async def make(poll_s: float = 0.0) -> tuple[Any, Path]:
        root = config_copy()
        settings = make_settings(
            tmp_path,
            agents_file=root / "agents.yaml",
            schemas_dir=root / "schemas",
            policies_dir=root / "policies",
            reload_poll_s=poll_s,
        )
        client = await aiohttp_client(create_app(settings, backend=FakeBackend()))
        return client, root

    return make


async def status(client: Any, keys: dict[str, str]) -> dict[str, Any]:
    resp = await client.get("/v1/status", headers=auth(keys["operator"]))
    assert resp.status == 200
    return await resp.json()


async def submit(client: Any, key: str, body: dict[str, Any] = ECHO) -> tuple[int, Any]:
    resp = await client.post("/v1/tasks?wait=10", json=body, headers=auth(key))
    return resp.status, await resp.json()


async def decision(client: Any, keys: dict[str, str], decision_id: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/decisions/{decision_id}", headers=auth(keys["auditor"]))
    assert resp.status == 200
    return await resp.json()


async def until(check: Callable[[], Any], within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


def edit(path: Path, change: Callable[[str], str]) -> None:
    text = path.read_text()
    new = change(text)
    assert new != text, f"the edit changed nothing in {path}"
    path.write_text(new)


# --- revisions ------------------------------------------------------------------------------


async def test_every_decision_records_the_three_revisions(
    reload_hub: Any, keys: dict[str, str]
) -> None:
    client, root = await reload_hub()
    code, task = await submit(client, keys["user"])
    assert code == 200, task
    record = await decision(client, keys, task["decision_id"])
    revisions = (await status(client, keys))["revisions"]
    assert record["revision"] == revisions["combined"]
    parts = split_revision(record["revision"])
    assert parts == {
        "policies": revisions["policies"],
        "schemas": revisions["schemas"],
        "agents": revisions["registry"],
    }
    # Each part is its own files' revision: a schema edit changes only the schemas part.
    edit(root / "schemas" / "agents" / "echo.input.json", lambda s: s.replace("any JSON", "a"))
    await client.app[HUB].reload()
    code, task = await submit(client, keys["user"])
    after = split_revision((await decision(client, keys, task["decision_id"]))["revision"])
    assert after["schemas"] != parts["schemas"]
    assert (after["policies"], after["agents"]) == (parts["policies"], parts["agents"])
    assert "-dirty" in after["schemas"] or after["schemas"].startswith(("nogit", "uncommitted"))


# --- the watcher ----------------------------------------------------------------------------


async def test_watcher_applies_a_good_change_and_refuses_a_bad_one_once(
    reload_hub: Any, keys: dict[str, str]
) -> None:
    client, root = await reload_hub(poll_s=0.05)
    hub = client.app[HUB]
    before = hub.revisions()
    code, _ = await submit(client, keys["developer"])
    assert code == 200

    edit(root / "policies" / "dispatch.rego", lambda s: s + PAUSE_DEVELOPERS)
    await until(lambda: hub.reloader.reloads == 1)
    code, body = await submit(client, keys["developer"])
    assert code == 403, body
    assert body["error"]["details"]["reasons"] == ["developers are paused"]
    record = await decision(client, keys, body["error"]["decision_id"])
    assert split_revision(record["revision"])["policies"] == hub.revisions()["policies"]
    assert hub.revisions()["policies"] != before["policies"]
    assert (await status(client, keys))["reload"]["last_reload"]["trigger"] == "watch"

    # A broken file: refused once, alerted, and not retried while the files stay the same.
    edit(root / "policies" / "dispatch.rego", lambda s: s.replace("default allow := false", "x"))
    await until(lambda: hub.reloader.refusals == 1)
    await asyncio.sleep(0.4)
    assert hub.reloader.refusals == 1
    shown = await status(client, keys)
    assert shown["last_reload_error"]["trigger"] == "watch"
    assert re.match(r"policies/dispatch\.rego:\d+", shown["last_reload_error"]["location"])
    assert "reload_failed" in [a["name"] for a in shown["alerts"]["active"]]
    code, body = await submit(client, keys["developer"])
    assert body["error"]["details"]["reasons"] == ["developers are paused"]  # still in force

    # Fixed: the next round takes it, clears the error and resolves the alert.
    edit(root / "policies" / "dispatch.rego", lambda s: s.replace("\nx\n", "\n"))
    edit(root / "policies" / "dispatch.rego", lambda s: s.replace(PAUSE_DEVELOPERS, "\n"))
    await until(lambda: hub.reloader.reloads == 2)
    shown = await status(client, keys)
    assert shown["last_reload_error"] is None
    assert "reload_failed" not in [a["name"] for a in shown["alerts"]["active"]]
    code, _ = await submit(client, keys["developer"])
    assert code == 200


async def test_watcher_off_means_no_reload_until_asked(
    reload_hub: Any, keys: dict[str, str]
) -> None:
    client, root = await reload_hub(poll_s=0)
    hub = client.app[HUB]
    assert (await status(client, keys))["reload"]["watching"] is False
    edit(root / "policies" / "dispatch.rego", lambda s: s + PAUSE_DEVELOPERS)
    await asyncio.sleep(0.3)
    assert hub.reloader.reloads == 0
    assert (await submit(client, keys["developer"]))[0] == 200
    resp = await client.post("/v1/admin/reload", headers=auth(keys["operator"]))
    body = await resp.json()
    assert resp.status == 200, body
    assert body["reload"]["policy_tests_passed"] >= 20
    assert body["revisions"] == hub.revisions()
    assert (await submit(client, keys["developer"]))[0] == 403


# --- bad input: refused with file:line, the old revision keeps serving --------------------

CONFLICT = '\ndecision := {"allow": true, "reasons": ["forced"]}\n'
# A conflict only an input with task.input.force reaches: no policy test has one, but a
# logged decision does.
CONDITIONAL_CONFLICT = (
    '\ndecision := {"allow": true, "reasons": ["forced"]} if input.task.input.force == true\n'
)


def _line(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


BAD_INPUT = [
    (
        "policy syntax error",
        "policies/dispatch.rego",
        lambda s: s.replace("default allow := false", "default allow := "),
        # The parser stops at the next token: the rule after the broken one.
        "policies/dispatch.rego:{allow if count(deny) == 0}",
        "unexpected",
    ),
    (
        "rule conflict",
        "policies/dispatch.rego",
        lambda s: s + CONFLICT,
        'policies/dispatch.rego:{"reasons": ["forced"]}',
        "conflict",
    ),
    (
        "rule conflict only logged traffic reaches",
        "policies/dispatch.rego",
        lambda s: s + CONDITIONAL_CONFLICT,
        'policies/dispatch.rego:{"reasons": ["forced"]}',
        "on the input of logged decision",
    ),
    (
        "failing policy test",
        "policies/dispatch.rego",
        lambda s: s.replace('"read_only_root": true', '"read_only_root": false'),
        "policies/dispatch_test.rego:{test_user_may_run_echo}",
        "policy test data.gateway.dispatch_test.test_user_may_run_echo failed",
    ),
    (
        "agents.yaml breaks its schema",
        "agents.yaml",
        lambda s: s.replace("timeout_s: 30", "timeout_s: soon", 1),
        "agents.yaml:{timeout_s: soon}",
        "",
    ),
    (
        "schema is not a valid JSON Schema",
        "schemas/agents/echo.input.json",
        lambda s: s.replace('"maxProperties": 64', '"maxProperties": "many"'),
        "schemas/agents/echo.input.json:{maxProperties}",
        "not a valid JSON Schema at /maxProperties",
    ),
    (
        "invalid JSON in a schema",
        "schemas/agents/echo.input.json",
        lambda s: s.replace('"maxProperties": 64,', '"maxProperties": 64,,'),
        r"schemas/agents/echo\.input\.json:\d+:\d+",
        "invalid JSON",
    ),
    (
        "invalid JSON in policy data",
        "policies/data.json",
        lambda s: s[: len(s) // 2],
        r"policies/data\.json:\d+:\d+",
        "invalid JSON",
    ),
]


@pytest.mark.parametrize(
    ("file", "change", "location", "message"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
async def test_bad_input_is_refused_and_the_old_revision_keeps_serving(
    reload_hub: Any,
    keys: dict[str, str],
    file: str,
    change: Callable[[str], str],
    location: str,
    message: str,
) -> None:
    client, root = await reload_hub()
    hub = client.app[HUB]
    code, first = await submit(client, keys["user"], {**ECHO, "input": {"force": True}})
    assert code == 200, first
    old = hub.revisions()
    path = root / file
    edit(path, change)
    if location.endswith("}"):  # the line in the file where the text between {} is
        name, needle = location.split(":", 1)
        line = _line(root / name, needle[1:-1])
        location = re.escape(f"{name}:{line}") + r"(:\d+)?"

    resp = await client.post("/v1/admin/reload", headers=auth(keys["operator"]))
    body = await resp.json()
    assert resp.status == 422, body
    assert body["error"]["code"] == "invalid_config"
    where = body["error"]["details"]["location"]
    assert re.fullmatch(location, where), (where, body)
    assert message in body["error"]["message"]
    assert body["error"]["details"]["kept_revisions"] == old

    shown = await status(client, keys)
    assert shown["last_reload_error"]["location"] == where
    alerts = {a["name"]: a for a in shown["alerts"]["active"]}
    assert alerts["reload_failed"]["details"]["location"] == where
    assert shown["revisions"] == old

    # The old revision still decides, and says so in the log.
    code, task = await submit(client, keys["user"])
    assert code == 200, task
    assert task["sandbox"]["read_only_root"] is True
    assert (await decision(client, keys, task["decision_id"]))["revision"] == old["combined"]


async def test_failing_tests_are_all_listed(reload_hub: Any, keys: dict[str, str]) -> None:
    client, root = await reload_hub()
    edit(
        root / "policies" / "dispatch_test.rego",
        lambda s: s + "\ntest_one_more_failure if {\n\tfalse\n}\n",
    )
    edit(
        root / "policies" / "dispatch.rego",
        lambda s: s.replace('"read_only_root": true', '"read_only_root": false'),
    )
    resp = await client.post("/v1/admin/reload", headers=auth(keys["operator"]))
    details = (await resp.json())["error"]["details"]
    tests = [f["test"] for f in details["failures"]]
    assert "data.gateway.dispatch_test.test_one_more_failure" in tests
    assert "data.gateway.dispatch_test.test_user_may_run_echo" in tests
    assert all(
        re.fullmatch(r"policies/dispatch_test\.rego:\d+", f["location"])
        for f in details["failures"]
    )


# --- in-flight requests -----------------------------------------------------------------


async def test_reloads_never_fail_or_drop_in_flight_requests(
    reload_hub: Any, keys: dict[str, str]
) -> None:
    """Hammer submissions while the config is reloaded over and over."""
    client, root = await reload_hub()
    hub = client.app[HUB]
    policy = root / "policies" / "dispatch.rego"
    original = policy.read_text()
    done = asyncio.Event()
    reloads = completed = 0
    reloaded = asyncio.Condition()

    async def keep_reloading() -> None:
        nonlocal reloads, completed
        while not done.is_set():
            reloads += 1
            policy.write_text(original + f"\n# generation {reloads}\n")
            await hub.reload()
            async with reloaded:
                completed += 1
                reloaded.notify_all()
            await asyncio.sleep(0.01)

    async def one(i: int) -> tuple[int, Any]:
        # Spread over the reloads in time, and each group of 8 only once as many reloads
        # have completed: on a slow machine a reload takes longer than the spread.
        await asyncio.sleep(i * 0.04)
        async with reloaded:
            await reloaded.wait_for(lambda: completed >= i // 8)
        return await submit(client, keys["user"], {**ECHO, "input": {"i": i}})

    reloader = asyncio.create_task(keep_reloading())
    try:
        results = await asyncio.gather(*(one(i) for i in range(40)))
    finally:
        done.set()
        await reloader
    assert [code for code, _ in results] == [200] * 40, results
    assert {body["state"] for _, body in results} == {"succeeded"}
    assert sorted(body["result"]["echo"]["i"] for _, body in results) == list(range(40))
    revisions = {
        (await decision(client, keys, body["decision_id"]))["revision"] for _, body in results
    }
    assert len(revisions) >= 3, "the submissions did not overlap the reloads"


async def test_an_in_flight_task_keeps_the_contract_it_was_accepted_under(
    reload_hub: Any, keys: dict[str, str]
) -> None:
    client, root = await reload_hub()
    hub = client.app[HUB]
    slow = {"capability": "code.eval", "input": {"expression": "6*7", "spin_s": 0.8}}
    resp = await client.post("/v1/tasks", json=slow, headers=auth(keys["developer"]))
    task_id = (await resp.json())["task_id"]
    # While it runs, the output schema gains a field the agent never sends.
    schema = root / "schemas" / "agents" / "calc.output.json"
    doc = json.loads(schema.read_text())
    doc["required"] = [*doc["required"], "signature"]
    schema.write_text(json.dumps(doc))
    await hub.reload()
    got = await client.get(f"/v1/tasks/{task_id}?wait=10", headers=auth(keys["developer"]))
    body = await got.json()
    assert body["state"] == "succeeded", body
    # A task accepted after the reload is held to the new schema.
    _, later = await submit(client, keys["developer"], {**slow, "input": {"expression": "1"}})
    assert later["state"] == "failed", later
    assert later["error"]["code"] == "output_schema_violation"


# --- agent-gateway reload ------------------------------------------------------------------


async def test_reload_command(
    reload_hub: Any,
    keys: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, root = await reload_hub()
    url = str(client.make_url("/")).rstrip("/")

    rc = await asyncio.to_thread(main, ["reload", "--url", url, "--key", keys["operator"]])
    out = capsys.readouterr().out
    assert rc == 0
    assert json.loads(out)["reloaded"] is True

    edit(root / "agents.yaml", lambda s: s.replace("timeout_s: 30", "timeout_s: soon", 1))
    monkeypatch.setenv("AGENT_GATEWAY_KEY", keys["operator"])  # the key from the environment
    rc = await asyncio.to_thread(main, ["reload", "--url", url])
    err = capsys.readouterr().err
    assert rc == 1
    refusal = json.loads(err)["error"]
    assert refusal["code"] == "invalid_config"
    assert refusal["details"]["location"] == f"agents.yaml:{_line(root / 'agents.yaml', 'soon')}"

    rc = await asyncio.to_thread(main, ["reload", "--url", url, "--key", keys["user"]])
    assert rc == 1
    assert "operator" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "name"),
    [({"reload_poll_s": -1}, "reload_poll_s"), ({"mask": ("hide:/x",)}, "mask")],
)
def test_bad_settings_fail_fast_with_their_name(
    tmp_path: Path, overrides: dict[str, Any], name: str
) -> None:
    with pytest.raises(SettingsError) as info:
        make_settings(tmp_path, **overrides)
    assert str(info.value).startswith(f"{name}:")
    assert isinstance(make_settings(tmp_path), Settings)


@pytest.fixture
def foreign_drops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Unraisable errors from regorus objects freed off their thread, from now on.

    Garbage left by earlier tests is collected first, so only this test's objects count.
    """
    import gc
    import sys
    import threading

    gc.collect()
    seen: list[str] = []

    def hook(unraisable: Any) -> None:
        if "unsendable" in str(unraisable.exc_value):
            seen.append(f"{unraisable.exc_value} (on {threading.current_thread().name})")

    monkeypatch.setattr(sys, "unraisablehook", hook)
    return seen


@pytest.mark.parametrize(
    ("file", "change"),
    [
        ("policies/dispatch.rego", lambda s: s + CONFLICT),
        (
            "policies/dispatch.rego",
            lambda s: s.replace('"read_only_root": true', '"read_only_root": false'),
        ),
        ("policies/dispatch_test.rego", lambda s: s + "\ntest_broken if {\n"),
    ],
    ids=["compile", "tests fail", "test file does not parse"],
)
async def test_a_refused_engine_is_dropped_on_the_thread_that_made_it(
    reload_hub: Any,
    keys: dict[str, str],
    foreign_drops: list[str],
    file: str,
    change: Callable[[str], str],
) -> None:
    """regorus engines are thread-bound: a refusal must not leave one to the garbage
    collector, which may run on any thread (pyo3 then leaks it with an unraisable error)."""
    import gc

    client, root = await reload_hub()
    edit(root / file, change)
    for _ in range(3):
        resp = await client.post("/v1/admin/reload", headers=auth(keys["operator"]))
        assert resp.status == 422
        await asyncio.to_thread(gc.collect)
    gc.collect()
    assert foreign_drops == []


async def test_files_edited_before_the_watcher_started_are_picked_up(
    reload_hub: Any, keys: dict[str, str]
) -> None:
    client, root = await reload_hub(poll_s=0)
    reloader = client.app[HUB].reloader
    await reloader.start()  # the files are what is in force: nothing to do
    assert await reloader.poll_once() is False
    # Edited after the hub loaded them but before its watcher took its first look.
    edit(root / "policies" / "dispatch.rego", lambda s: s + PAUSE_DEVELOPERS)
    await reloader.start()
    assert await reloader.poll_once() is True
    assert reloader.reloads == 1
    assert (await submit(client, keys["developer"]))[0] == 403


async def test_a_replaced_engine_is_dropped_on_the_loop_thread(
    reload_hub: Any, keys: dict[str, str], foreign_drops: list[str]
) -> None:
    """A denial leaves a reference cycle (the exception's frames hold the config) that only
    the garbage collector frees, maybe on another thread; regorus engines are thread-bound."""
    import gc

    client, _ = await reload_hub()
    gc.collect()
    gc.disable()  # so that the cycle is still there when the worker thread collects
    try:
        for _ in range(3):
            code, _body = await submit(
                client, keys["user"], {"capability": "code.eval", "input": {"expression": "1"}}
            )
            assert code == 403
            await client.app[HUB].reload()
            await asyncio.to_thread(gc.collect)
            await asyncio.sleep(0.01)  # the loop drops what was handed back to it
    finally:
        gc.enable()
    assert foreign_drops == []
