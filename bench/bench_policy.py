"""Policy decision time for the shipped policies: regorus' Engine vs the compiled fast path.

For each query the hub asks (dispatch, messages, api, tools), an allowed and a denied input
shaped as the routers build them (gateway/routers/{tasks,messages,access,tools}.py) is
evaluated through the hub's own ``load_config`` policy, on one thread as the hub does:
``engine`` is the Engine alone (``_engine_decide``, what every decision cost before),
``fast`` is ``evaluate`` (the Rvm where the fast path is on, the Engine otherwise). Engine
and fast runs alternate in rounds so a load change on this shared machine hits both.

Usage: bench_policy.py [N per round] [rounds]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import report, summary
from gateway.bundle.config import load_config
from gateway.policy.engine import API_QUERY, DISPATCH_QUERY, MESSAGES_QUERY, TOOLS_QUERY
from gateway.settings import REPO_ROOT

N = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
REQUEST = {"method": "POST", "path": "/v1/tasks", "remote_addr": "127.0.0.1", "trace_id": "t" * 32}


def _subject(name: str, roles: list[str]) -> dict[str, Any]:
    return {"id": name, "roles": roles, "key_id": f"k-{name}"}


def _source(agent: str, task_id: str, owner: str) -> dict[str, Any]:
    return {
        "spiffe_id": f"spiffe://agent-gateway.local/agent/{agent}",
        "trust_domain": "agent-gateway.local",
        "agent": agent,
        "instance_id": f"i-{agent}",
        "task_id": task_id,
        "local": True,
        "depth": 0,
        "lineage": [],
        "owner": owner,
    }


def inputs(config: Any) -> dict[str, tuple[str, dict[str, Any], bool]]:
    """name: (query, input, expected allow)."""
    reg = config.registry
    calc, files = (reg.get(n).to_json() for n in ("calc", "files"))
    wordstats = {"type": "agent", "agent": reg.get("wordstats").to_json()}
    wordstats["instances"] = [
        {"instance_id": "i-w", "agent": "wordstats", "task_id": "t9", "owner": "dave"}
    ]
    task = {"agent": "calc", "input": {"expression": "1+1"}, "timeout_s": 10, "id": "t-1"}

    def api(subject: dict[str, Any] | None, method: str, owner: str) -> dict[str, Any]:
        return {
            "subject": {"authenticated": subject is not None, **(subject or {"roles": []})},
            "request": {
                "method": method,
                "route": "/v1/tasks/{task_id}",
                "params": {"task_id": "t1"},
                "protocol": "http",
                "remote_addr": "127.0.0.1",
            },
            "resource": {
                "kind": "task",
                "id": "t1",
                "owner": owner,
                "state": "running",
                "agent": "echo",
                "parent_id": None,
            },
        }

    def message(sender: str, kind: str) -> dict[str, Any]:
        return {
            "source": _source(sender, "t1", "dave"),
            "message": {
                "id": "m-1",
                "type": "request",
                "to": "wordstats",
                "kind": kind,
                "payload": {"text": "a b c"},
                "task_id": "t1",
            },
            "target": wordstats,
        }

    def tool(roles: list[str], path: str) -> dict[str, Any]:
        args = {"path": path}
        return {
            "subject": _subject("dave", roles),
            "task": {"agent": "files", "input": args, "id": "c-1", "labels": {"mcp_tool": "x"}},
            "agent": files,
            "request": {**REQUEST, "tool": "files.read"},
            "tool": {"name": "files.read", "server_tool": "read", "arguments": args},
        }

    return {
        "dispatch_allow": (
            DISPATCH_QUERY,
            {
                "subject": _subject("dave", ["user", "developer"]),
                "task": task,
                "agent": calc,
                "request": REQUEST,
            },
            True,
        ),
        "dispatch_deny": (
            DISPATCH_QUERY,
            {
                "subject": _subject("alice", ["user"]),
                "task": task,
                "agent": calc,
                "request": REQUEST,
            },
            False,
        ),
        "messages_allow": (MESSAGES_QUERY, message("coordinator", "text.stats"), True),
        "messages_deny": (MESSAGES_QUERY, message("relay", "text.stats"), False),
        "api_allow": (API_QUERY, api(_subject("alice", ["user"]), "GET", "alice"), True),
        "api_deny": (API_QUERY, api(_subject("bob", ["user"]), "DELETE", "alice"), False),
        "tools_allow": (TOOLS_QUERY, tool(["user"], "public/readme.txt"), True),
        "tools_deny": (TOOLS_QUERY, tool(["user"], "private/keys"), False),
    }


def _time(fn: Any, query: str, policy_input: dict[str, Any], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn(query, policy_input)
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def main() -> None:
    config = load_config(
        agents_file=REPO_ROOT / "agents.yaml",
        schemas_dir=REPO_ROOT / "schemas",
        policies_dir=REPO_ROOT / "policies",
    )
    policy = config.policy
    status = policy.fast_path_status() or {}
    figures: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    for name, (query, policy_input, allow) in inputs(config).items():
        engine_decision = policy._engine_decide(query, policy_input)
        fast_decision = policy.evaluate(query, policy_input)
        assert engine_decision.allow is allow, (name, engine_decision)
        assert fast_decision.to_json() == engine_decision.to_json(), (name, fast_decision)
        engine: list[float] = []
        fast: list[float] = []
        for fn in (policy._engine_decide, policy.evaluate):
            _time(fn, query, policy_input, 500)  # warm-up
        for _ in range(ROUNDS):
            engine += _time(policy._engine_decide, query, policy_input, N)
            fast += _time(policy.evaluate, query, policy_input, N)
        e, f = summary(engine), summary(fast)
        on = status.get("queries", {}).get(query, {}).get("on", False)
        figures[f"{name}_engine_us"] = e
        figures[f"{name}_fast_us"] = f
        figures[f"{name}_ratio"] = {
            "fast_path_on": on,
            "p50_engine_over_fast": round(e["median"] / f["median"], 2),
            "p99_engine_over_fast": round(e["p99"] / f["p99"], 2),
        }
    figures["load_after"] = os.getloadavg()[0]
    figures["fast_path"] = {
        q: v.get("excluded", "on" if v["on"] else "off")
        for q, v in status.get("queries", {}).items()
    }
    report("policy decision: regorus Engine vs compiled fast path (shipped policies)", figures)


if __name__ == "__main__":
    main()
