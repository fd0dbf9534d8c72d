"""Policy decision time for the shipped dispatch policy (µs per decision).

Evaluates ``data.gateway.dispatch.decision`` through the same RegorusPolicy the hub uses,
for an allowed and a denied input, on one thread as the hub does.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import report, summary
from gateway.bundle.config import load_config
from gateway.policy.engine import DISPATCH_QUERY
from gateway.settings import REPO_ROOT

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000


def main() -> None:
    config = load_config(
        agents_file=REPO_ROOT / "agents.yaml",
        schemas_dir=REPO_ROOT / "schemas",
        policies_dir=REPO_ROOT / "policies",
    )
    agent = config.registry.get("calc").to_json()
    inputs = {
        "allow": {
            "subject": {"id": "dave", "roles": ["user", "developer"]},
            "task": {"capability": "code.eval", "input": {"expression": "1+1"}},
            "agent": agent,
            "request": {"method": "POST", "path": "/v1/tasks", "remote_addr": "127.0.0.1"},
        },
        "deny": {
            "subject": {"id": "alice", "roles": ["user"]},
            "task": {"capability": "code.eval", "input": {"expression": "1+1"}},
            "agent": agent,
            "request": {"method": "POST", "path": "/v1/tasks", "remote_addr": "127.0.0.1"},
        },
    }
    figures = {}
    for name, policy_input in inputs.items():
        for _ in range(500):
            config.policy.evaluate(DISPATCH_QUERY, policy_input)
        samples = []
        for _ in range(N):
            start = time.perf_counter_ns()
            decision = config.policy.evaluate(DISPATCH_QUERY, policy_input)
            samples.append((time.perf_counter_ns() - start) / 1000)
        assert decision.allow == (name == "allow"), decision
        figures[f"dispatch_{name}_us"] = summary(samples)
    report("policy decision (regorus Engine, shipped dispatch.rego)", figures)


if __name__ == "__main__":
    main()
