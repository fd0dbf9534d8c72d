"""``agent-gateway decisions replay``: logged inputs under other policies, from a folder or
from a git revision; every change is reported and the exit status says whether any.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.decisionlog.replay import compare
from gateway.http.app import HUB, create_app
from gateway.policy.engine import Decision
from tests.conftest import REPO, FakeBackend, git, make_settings, submit_through_router

# (key, body, allowed): seq 1..5.
SUBMISSIONS = [
    ("user", {"capability": "debug.echo", "input": {"n": 1}}, True),
    ("user", {"capability": "code.eval", "input": {"expression": "1+1"}}, False),
    ("developer", {"capability": "code.eval", "input": {"expression": "2*3"}}, True),
    ("developer", {"capability": "debug.echo", "input": {"n": 4}}, True),
    ("nobody", {"capability": "debug.echo", "input": {"n": 5}}, False),
]


@pytest.fixture
async def state(tmp_path: Path, keys: dict[str, str], aiohttp_client: Any) -> Any:
    """The state dir of a hub that made the five decisions above, and their ids by seq
    (submitted past the HTTP door, so that the log holds exactly these five)."""
    settings = make_settings(tmp_path, reload_poll_s=0, mask=("mask:/task/input/expression",))
    client = await aiohttp_client(create_app(settings, backend=FakeBackend()))
    ids = {}
    for seq, (who, body, allowed) in enumerate(SUBMISSIONS, 1):
        ids[seq], done = await submit_through_router(client.app[HUB], keys[who], body)
        assert (done is not None) == allowed, (seq, done)
    await client.close()
    return settings.state_dir, ids


def policies_copy(tmp_path: Path, name: str, *edits: tuple[str, Callable[[str], str]]) -> Path:
    folder = tmp_path / name / "policies"
    shutil.copytree(REPO / "policies", folder)
    for file, change in edits:
        path = folder / file
        text = path.read_text()
        assert change(text) != text
        path.write_text(change(text))
    return folder


async def replay(state_dir: Path, *args: str) -> int:
    argv = ["decisions", "replay", "--state-dir", str(state_dir), *args]
    return await asyncio.to_thread(main, argv)


PAUSE_DEVELOPERS = (
    "dispatch.rego",
    lambda s: s + '\ndeny contains "developers are paused" if "developer" in roles\n',
)
USERS_MAY_EVAL = (
    "data.json",
    lambda s: s.replace('"developer"\n        ]', '"user"\n        ]', 2),
)
SMALLER_EVAL_SANDBOX = (
    "data.json",
    lambda s: s.replace('"memory_bytes": 67108864', '"memory_bytes": 33554432'),
)
REWORDED = ("dispatch.rego", lambda s: s.replace("caller has no 'user' role", "no user role"))


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        ((PAUSE_DEVELOPERS,), {3: "allow→deny", 4: "allow→deny"}),
        ((USERS_MAY_EVAL,), {2: "deny→allow"}),
        ((SMALLER_EVAL_SANDBOX,), {3: "sandbox"}),
        ((REWORDED,), {5: "reasons"}),
        ((PAUSE_DEVELOPERS, REWORDED), {3: "allow→deny", 4: "allow→deny", 5: "reasons"}),
    ],
    ids=["allow to deny", "deny to allow", "sandbox", "reasons", "several"],
)
async def test_replay_reports_every_change(
    state: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edits: tuple[Any, ...],
    expected: dict[int, str],
) -> None:
    state_dir, ids = state
    folder = policies_copy(tmp_path, "changed", *edits)
    assert await replay(state_dir, "--policies", str(folder), "--json") == 1
    report = json.loads(capsys.readouterr().out)
    got = {
        next(s for s, i in ids.items() if i == c["decision_id"]): c["change"]
        for c in report["changes"]
    }
    assert got == expected
    assert (report["replayed"], report["unchanged"]) == (5, 5 - len(expected))
    assert report["inputs_are_masked"] is True
    assert report["masked_inputs"] == 2  # the two code.eval inputs
    # The text form names each changed decision and says the inputs were masked.
    assert await replay(state_dir, "--policies", str(folder)) == 1
    text = capsys.readouterr().out
    assert "after masking" in text
    for seq, change in expected.items():
        assert f"{change.upper()}" in text and ids[seq] in text
    assert f"{len(expected)} would change" in text


async def test_unchanged_policies_change_nothing(
    state: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir, _ = state
    # A rule that needs data.agents: the registry the decisions were made with is used.
    needs_registry = (
        "dispatch.rego",
        lambda s: s + '\ndeny contains "unregistered" if not data.agents[input.agent.name]\n',
    )
    folder = policies_copy(tmp_path, "same", needs_registry)
    assert await replay(state_dir, "--policies", str(folder)) == 0
    out = capsys.readouterr().out
    assert "5 replayed, 5 unchanged, 0 would change" in out
    # Filters narrow what is replayed.
    assert await replay(state_dir, "--policies", str(folder), "--decision", "deny") == 0
    assert "2 replayed" in capsys.readouterr().out
    assert await replay(state_dir, "--policies", str(folder), "--subject", "developer") == 0
    assert "2 replayed" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
async def test_replay_a_git_revision(
    state: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir, ids = state
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "policies", repo / "policies")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "as shipped")
    shipped = git(repo, "rev-parse", "HEAD")
    policy = repo / "policies" / "dispatch.rego"
    policy.write_text(PAUSE_DEVELOPERS[1](policy.read_text()))
    git(repo, "commit", "-q", "-am", "pause developers")
    # The working tree differs from both commits: only the revision's files count.
    policy.write_text("this is not rego")

    assert await replay(state_dir, "--repo", str(repo), "--policies", shipped) == 0
    assert f"at {shipped[:12]} ({shipped})" in capsys.readouterr().out
    assert await replay(state_dir, "--repo", str(repo), "--policies", "HEAD", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert sorted(c["decision_id"] for c in report["changes"]) == sorted([ids[3], ids[4]])
    assert report["revision"].startswith(git(repo, "rev-parse", "HEAD")[:12])
    assert policy.read_text() == "this is not rego"  # the working tree was not touched

    assert await replay(state_dir, "--repo", str(repo), "--policies", "no-such-rev") == 2
    assert "neither a folder nor a git revision" in capsys.readouterr().err
    args = ["--repo", str(repo), "--policies", "HEAD", "--policies-path", "nope"]
    assert await replay(state_dir, *args) == 2
    assert "nope" in capsys.readouterr().err


async def test_policies_that_do_not_load_are_an_error(
    state: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir, _ = state
    broken = policies_copy(
        tmp_path, "broken", ("dispatch.rego", lambda s: s + "\nthis is not rego\n")
    )
    assert await replay(state_dir, "--policies", str(broken)) == 2
    err = capsys.readouterr().err
    assert "do not load" in err and "policies/dispatch.rego:" in err
    assert await replay(tmp_path / "no-state", "--policies", str(broken)) == 2


@pytest.mark.parametrize(
    ("before", "after", "change"),
    [
        ({"allow": True, "reasons": ["allowed"]}, Decision(True, ("allowed",)), None),
        ({"allow": True, "reasons": ["allowed"]}, Decision(False, ("no",)), "allow→deny"),
        ({"allow": False, "reasons": ["no"]}, Decision(True, ("allowed",)), "deny→allow"),
        ({"allow": False, "reasons": ["a", "b"]}, Decision(False, ("b", "a")), None),
        ({"allow": False, "reasons": ["a"]}, Decision(False, ("a", "b")), "reasons"),
        (
            {"allow": True, "reasons": ["ok"], "sandbox": {"pids": 1}},
            Decision(True, ("ok",), {"pids": 2}),
            "sandbox",
        ),
        ({"reasons": []}, Decision(False, ("x",)), "reasons"),  # no allow logged: a deny
    ],
    ids=["same", "to deny", "to allow", "reason order", "reasons", "sandbox", "no allow"],
)
def test_compare(before: dict[str, Any], after: Decision, change: str | None) -> None:
    assert compare(before, after) == change
