"""Decision log, reload and verify figures (issue 5).

1. Per decision, CPU on the event loop: masking a copy of a dispatch input (two settings
   rules + one x-secret field) and the chain hash, against the policy evaluation itself.
2. Writes per second with 64 decisions in flight: ``DecisionLog.record`` (mask, read the
   chain head and hash inside the write transaction) against the same rows written to the
   same table without masking or chaining (a plain INSERT through the same store).
3. Decisions per second, policy + log against policy alone: the log's effect on how many
   dispatch decisions the hub can make.
4. Reload of the shipped policies, schemas and agents.yaml through ``hub.reload()``: git
   revisions, compile + validate, recent-input check, policy tests, swap; and its parts.
5. ``verify`` on a log of N records (default 50,000) in a real SQLite file, records per
   second, through ``DecisionLog.verify`` (rows in rowid order, on a reader thread).

Usage: python bench/bench_decisionlog.py [n_verify] [n_writes]
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import rate, report, summary
from gateway.bundle.config import file_revisions, load_config
from gateway.decisionlog import (
    ChainBuilder,
    Masker,
    chain_hash,
    pointers_marked_secret,
    record_to_json,
    record_to_row,
)
from gateway.decisionlog.log import DecisionLog
from gateway.hub import Hub
from gateway.policy.engine import DISPATCH_QUERY
from gateway.policy.testing import run_tests
from gateway.settings import REPO_ROOT, Settings
from gateway.store import Store
from tests.conftest import FakeBackend

N_VERIFY = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
N_WRITES = int(sys.argv[2]) if len(sys.argv) > 2 else 5_000
CONCURRENCY = 64
RULES = [("/request/remote_addr", "erase"), ("/subject/key_id", "mask")]


def dispatch_input(config: object) -> dict[str, object]:
    agent = config.registry.get("echo").to_json()  # type: ignore[attr-defined]
    return {
        "subject": {"id": "alice", "roles": ["user"], "key_id": "k1"},
        "task": {
            "capability": "debug.echo",
            "input": {"api_key": "s3cret", "text": "x" * 200},
            "id": str(uuid.uuid4()),
        },
        "agent": agent,
        "request": {
            "method": "POST",
            "path": "/v1/tasks",
            "remote_addr": "127.0.0.1",
            "time": "2025-01-01T00:00:00Z",
        },
    }


def cpu_costs(config: object, policy_input: dict[str, object], n: int = 5000) -> dict[str, object]:
    schema = config.schemas.documents["agents/echo.input.json"]  # type: ignore[attr-defined]
    secret = pointers_marked_secret(schema, "/task/input")
    masker = Masker([*RULES, *((p, "mask") for p in secret)])
    policy = config.policy  # type: ignore[attr-defined]
    decision = policy.evaluate(DISPATCH_QUERY, policy_input)
    assert decision.allow, decision
    masked, _, _ = masker.apply(policy_input)
    record = {
        "seq": 1,
        "decision_id": str(uuid.uuid4()),
        "timestamp": "2025-01-01T00:00:00.000000Z",
        "path": "gateway/dispatch/decision",
        "input": masked,
        "result": decision.to_json(),
        "revision": "policies=a schemas=b agents=c",
        "labels": {"hub_id": "bench", "version": "0"},
        "metrics": {"timer_rego_query_eval_ns": 1},
        "erased": [],
        "masked": [],
        "kind": "dispatch",
        "allow": True,
        "subject": "alice",
        "agent": "echo",
        "task_id": "t",
        "prev_hash": "0" * 64,
    }
    out: dict[str, list[float]] = {"policy": [], "mask": [], "hash": []}
    for _ in range(n):
        t0 = time.perf_counter_ns()
        policy.evaluate(DISPATCH_QUERY, policy_input)
        t1 = time.perf_counter_ns()
        masker.apply(policy_input)
        t2 = time.perf_counter_ns()
        chain_hash(record["prev_hash"], record)  # type: ignore[arg-type]
        t3 = time.perf_counter_ns()
        out["policy"].append((t1 - t0) / 1000)
        out["mask"].append((t2 - t1) / 1000)
        out["hash"].append((t3 - t2) / 1000)
    policy_us = statistics.median(out["policy"])
    log_us = statistics.median(out["mask"]) + statistics.median(out["hash"])
    return {
        "policy_eval_us": summary(out["policy"]),
        "mask_copy_us": summary(out["mask"]),
        "chain_hash_us": summary(out["hash"]),
        "log_cpu / policy (medians)": round(log_us / policy_us, 2),
    }


async def throughput(
    tmp: Path, config: object, policy_input: dict[str, object]
) -> dict[str, object]:
    schema = config.schemas.documents["agents/echo.input.json"]  # type: ignore[attr-defined]
    secret = pointers_marked_secret(schema, "/task/input")
    policy = config.policy  # type: ignore[attr-defined]
    decision = policy.evaluate(DISPATCH_QUERY, policy_input)

    store = Store(tmp / "log.db")
    log = DecisionLog(store, hub_id="bench", masking=RULES)

    async def logged(i: int) -> None:
        await log.record(
            kind="dispatch",
            path="gateway/dispatch/decision",
            input=policy_input,
            decision=decision,
            revision="policies=a schemas=b agents=c",
            subject="alice",
            agent="echo",
            task_id=str(i),
            secret_pointers=secret,
        )

    chained = await rate(N_WRITES, logged, CONCURRENCY)

    # The same row, unmasked and unchained, through the same single writer.
    row = {
        "decision_id": "",
        "timestamp": "2025-01-01T00:00:00.000000Z",
        "path": "gateway/dispatch/decision",
        "input": json.dumps(policy_input, sort_keys=True),
        "result": json.dumps(decision.to_json(), sort_keys=True),
        "revision": "policies=a schemas=b agents=c",
        "labels": "{}",
        "metrics": "{}",
        "erased": "[]",
        "masked": "[]",
        "kind": "dispatch",
        "allow": 1,
        "subject": "alice",
        "agent": "echo",
        "task_id": "t",
        "prev_hash": "",
        "hash": "",
    }

    async def plain(i: int) -> None:
        await store.write(lambda db: db["decisions"].insert({**row, "decision_id": f"p{i}"}))

    unchained = await rate(N_WRITES, plain, CONCURRENCY)

    # Dispatch decisions: the policy alone (one thread, as the hub evaluates), and the policy
    # followed by the log write, 64 in flight.
    n = N_WRITES
    start = time.perf_counter()
    for _ in range(n):
        policy.evaluate(DISPATCH_QUERY, policy_input)
    policy_alone = n / (time.perf_counter() - start)

    async def decide_and_log(i: int) -> None:
        d = policy.evaluate(DISPATCH_QUERY, policy_input)
        await log.record(
            kind="dispatch",
            path="gateway/dispatch/decision",
            input=policy_input,
            decision=d,
            revision="policies=a schemas=b agents=c",
            subject="alice",
            agent="echo",
            task_id=f"d{i}",
            secret_pointers=secret,
        )

    with_log = await rate(n, decide_and_log, CONCURRENCY)
    await store.close()
    return {
        "log_writes_per_s (masked, chained)": round(chained),
        "plain_writes_per_s (same rows, no mask, no chain)": round(unchained),
        "chained / plain": round(chained / unchained, 2),
        "policy_alone_decisions_per_s": round(policy_alone),
        "policy_plus_log_decisions_per_s": round(with_log),
        "policy+log / policy alone": round(with_log / policy_alone, 3),
    }


async def reload_time(tmp: Path, runs: int = 10) -> dict[str, object]:
    root = tmp / "repo"
    root.mkdir()
    shutil.copy(REPO_ROOT / "agents.yaml", root / "agents.yaml")
    shutil.copytree(REPO_ROOT / "schemas", root / "schemas")
    shutil.copytree(REPO_ROOT / "policies", root / "policies")
    settings = Settings(
        state_dir=tmp / "state",
        keys_file=tmp / "keys.json",
        agents_file=root / "agents.yaml",
        schemas_dir=root / "schemas",
        policies_dir=root / "policies",
        hub_id="bench-reload",
        probe_interval_s=0,
        reload_poll_s=0,
    )
    hub = Hub(settings, backend=FakeBackend())
    await hub.start()
    policy = root / "policies" / "dispatch.rego"
    original = policy.read_text()
    totals, revs, loads, tests = [], [], [], []
    for i in range(runs):
        policy.write_text(original + f"\n# run {i}\n")
        start = time.perf_counter()
        await hub.reload()
        totals.append((time.perf_counter() - start) * 1000)
        # The parts, measured alone (same files).
        t0 = time.perf_counter()
        revisions = file_revisions(
            agents_file=settings.agents_file,
            schemas_dir=settings.schemas_dir,
            policies_dir=settings.policies_dir,
        )
        t1 = time.perf_counter()
        load_config(
            agents_file=settings.agents_file,
            schemas_dir=settings.schemas_dir,
            policies_dir=settings.policies_dir,
            revisions=revisions,
        )
        t2 = time.perf_counter()
        report_ = run_tests(settings.policies_dir)
        t3 = time.perf_counter()
        assert report_.ok
        revs.append((t1 - t0) * 1000)
        loads.append((t2 - t1) * 1000)
        tests.append((t3 - t2) * 1000)
    await hub.stop()
    return {
        "reload_total_ms (hub.reload)": summary(totals),
        "git_revisions_ms (worker thread)": summary(revs),
        "compile_and_validate_ms (loop thread)": summary(loads),
        f"policy_tests_ms ({len(report_.results)} tests, worker thread)": summary(tests),
    }


async def verify_speed(
    tmp: Path, config: object, policy_input: dict[str, object]
) -> dict[str, object]:
    masker = Masker(RULES)
    masked, erased, masked_paths = masker.apply(policy_input)
    result = config.policy.evaluate(DISPATCH_QUERY, policy_input).to_json()  # type: ignore[attr-defined]
    builder = ChainBuilder()
    records = [
        builder.append(
            path="gateway/dispatch/decision",
            input=masked,
            result=result,
            revision="policies=a schemas=b agents=c",
            kind="dispatch",
            allow=True,
            labels={"hub_id": "bench"},
            metrics={"timer_rego_query_eval_ns": 80000},
            erased=erased,
            masked=masked_paths,
            subject="alice",
            agent="echo",
            task_id=str(i),
        )
        for i in range(N_VERIFY)
    ]
    store = Store(tmp / "verify.db")

    def bulk(db: object) -> None:
        rows = [record_to_row(record_to_json(r)) for r in records]
        db["decisions"].insert_all(rows, batch_size=1000)  # type: ignore[index]

    await store.write(bulk)
    log = DecisionLog(store, hub_id="bench")
    start = time.perf_counter()
    verified = await log.verify()
    elapsed = time.perf_counter() - start
    assert verified.ok and verified.checked == N_VERIFY, verified.problems[:3]
    await store.close()
    from gateway.decisionlog import verify_chain

    start = time.perf_counter()
    assert verify_chain(records).ok
    pure = time.perf_counter() - start
    return {
        "verify_records": N_VERIFY,
        "verify_s (DecisionLog.verify, SQLite file)": round(elapsed, 2),
        "verify_records_per_s": round(N_VERIFY / elapsed),
        "verify_chain_records_per_s (in memory, no parsing)": round(N_VERIFY / pure),
    }


async def main() -> None:
    config = load_config(
        agents_file=REPO_ROOT / "agents.yaml",
        schemas_dir=REPO_ROOT / "schemas",
        policies_dir=REPO_ROOT / "policies",
    )
    policy_input = dispatch_input(config)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        figures: dict[str, object] = {}
        figures.update(cpu_costs(config, policy_input))
        figures.update(await throughput(tmp, config, policy_input))
        figures.update(await reload_time(tmp))
        figures.update(await verify_speed(tmp, config, policy_input))
    report("decision log, reload, verify", figures)


if __name__ == "__main__":
    asyncio.run(main())
