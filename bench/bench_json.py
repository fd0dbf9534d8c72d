"""orjson against the standard ``json`` module on the hub's hot path for one routed message.

The documents are the ones ``bench/bench_messages.py`` makes the hub handle for a ping: the
sender's envelope (decoded), the body handed to the target (encoded, compact), the target's
answer (decoded), the hub's answer to the sender (encoded), and the message's decision record
(canonical JSON for its chain hash: sorted keys, compact, UTF-8; and the stored row's JSON
columns, sorted keys). Each op is timed in batches, alternating the two libraries; the figure
is the median batch's µs per op. Whether orjson gives the same bytes is checked and printed:
the stored row's columns use json's default ``", "`` separators, which orjson cannot make.

Only a measurement: the hub keeps ``json`` until the lead decides from the figure.

Usage: python bench/bench_json.py [n]     (n ops per batch, default 20000; 15 batches)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import orjson
except ImportError:  # not a dependency of the hub
    raise SystemExit("orjson is not installed: .venv/bin/pip install 'orjson==3.13.0'") from None

from bench._stats import report

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
BATCHES = 15
SENDER = "spiffe://agent-gateway.local/agent/probe"
TASK = "484dbcd7-92db-41ec-987f-f2e523d63fed"
ENVELOPE = {"type": "request", "kind": "ping", "to": "probe", "payload": {"quiet": True}}
DELIVERY = {
    "message_id": "b1d45861-434c-443d-a823-1c55c1c774de",
    "type": "request",
    "kind": "ping",
    "payload": {"quiet": True},
    "from": {"spiffe_id": SENDER, "agent": "probe", "task_id": TASK},
}
AGENT_REPLY = {
    "reply": {"echo": {"quiet": True}, "agent": "probe", "task_id": TASK.replace("4", "5")}
}
HUB_ANSWER = {
    **AGENT_REPLY,
    "from": {"agent": "probe", "spiffe_id": SENDER},
    "message_id": DELIVERY["message_id"],
    "decision_id": "c8244593-8daa-41a4-b697-a7d7e51621fc",
}
# A message decision as the hub logged it in a run of bench_messages.py.
RECORD: dict[str, Any] = {
    "seq": 5,
    "decision_id": "c8244593-8daa-41a4-b697-a7d7e51621fc",
    "timestamp": "2026-12-01T20:40:27.569181Z",
    "path": "gateway/messages/decision",
    "input": {
        "message": ENVELOPE,
        "request": {"traceparent": "00-091d4a5cd662ed635943383c056ef90a-7c4b7573d313e6a4-01"},
        "source": {
            "agent": "probe",
            "depth": 0,
            "instance_id": "4c0dbdafa8244f08ad487a2fc0bf3cd0",
            "lineage": [],
            "local": True,
            "owner": "bench",
            "spiffe_id": SENDER,
            "task_id": TASK,
            "trust_domain": "agent-gateway.local",
        },
        "target": {
            "agent": {
                "capabilities": ["debug.probe"],
                "description": "Diagnostics: runs a script of messaging calls from inside its "
                "container (requests, events, broadcasts, delegation, a direct connection "
                "attempt) and reports each outcome and the messages it received. The default "
                "policy lets only developers run it.",
                "endpoint": "/task",
                "env": {},
                "image": "agent-gateway/probe:dev",
                "input_schema": "agents/probe.input.json",
                "labels": {},
                "name": "probe",
                "network": "internal",
                "output_schema": "agents/probe.output.json",
                "pool": {},
                "port": 8000,
                "protocol": "gateway",
                "resources": {
                    "cpus": 0.5,
                    "memory": "128m",
                    "memory_bytes": 134217728,
                    "pids": 64,
                },
                "reuse": False,
                "subscriptions": ["notices"],
                "timeout_s": 120.0,
            },
            "instances": [
                {
                    "agent": "probe",
                    "instance_id": "e63a6dcb9af04a2e9b94e3181cb2e47b",
                    "lineage": [],
                    "owner": "bench",
                    "task_id": TASK.replace("4", "5"),
                }
            ],
            "type": "agent",
        },
    },
    "result": {
        "allow": True,
        "deliver_to": ["e63a6dcb9af04a2e9b94e3181cb2e47b"],
        "reasons": ["allowed"],
    },
    "revision": "policies=efef9bc1b61c+sha256:8272a969de76 schemas=efef9bc1b61c+sha256:d6e35291"
    "9beb agents=efef9bc1b61c+sha256:156b548ea775",
    "labels": {"hub_id": "bench-963bc1", "version": "0.1.0"},
    "metrics": {"timer_rego_query_eval_ns": 370016},
    "erased": [],
    "masked": [],
    "kind": "message",
    "allow": True,
    "subject": SENDER,
    "agent": "probe",
    "task_id": TASK,
    "prev_hash": "2d5caa8bbb41d82ffc909f66306d0f5a9bdd51fda1b5afe60ad1b511f7399b5a",
}
ROW_JSON_FIELDS = ("input", "result", "labels", "metrics", "erased", "masked")


def canonical_json(doc: Any) -> bytes:
    """gateway.decisionlog.records.canonical_bytes."""
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def canonical_orjson(doc: Any) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def columns_json(doc: dict[str, Any]) -> list[str]:
    """gateway.decisionlog.records.record_to_row's JSON columns."""
    return [json.dumps(doc[name], sort_keys=True) for name in ROW_JSON_FIELDS]


def columns_orjson(doc: dict[str, Any]) -> list[str]:
    return [
        orjson.dumps(doc[name], option=orjson.OPT_SORT_KEYS).decode() for name in ROW_JSON_FIELDS
    ]


compact = {"separators": (",", ":")}
ENVELOPE_BYTES = json.dumps(ENVELOPE).encode()
REPLY_BYTES = json.dumps(AGENT_REPLY, **compact).encode()
# (name, json's op, orjson's op); each op as the hub does it, or as it would with orjson.
OPS: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
    (
        "decode sender envelope",
        lambda: json.loads(ENVELOPE_BYTES),
        lambda: orjson.loads(ENVELOPE_BYTES),
    ),
    (
        "encode hand-off body",
        lambda: json.dumps(DELIVERY, **compact).encode(),
        lambda: orjson.dumps(DELIVERY),
    ),
    ("decode agent reply", lambda: json.loads(REPLY_BYTES), lambda: orjson.loads(REPLY_BYTES)),
    (
        "encode answer to sender",
        lambda: json.dumps(HUB_ANSWER).encode(),
        lambda: orjson.dumps(HUB_ANSWER),
    ),
    (
        "record canonical JSON (hash)",
        lambda: canonical_json(RECORD),
        lambda: canonical_orjson(RECORD),
    ),
    ("record row JSON columns", lambda: columns_json(RECORD), lambda: columns_orjson(RECORD)),
]


def batch_us(op: Callable[[], Any], n: int) -> float:
    """µs per call of ``op`` over ``n`` calls."""
    start = time.perf_counter()
    for _ in range(n):
        op()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    figures: dict[str, Any] = {
        "sizes_bytes": {
            "envelope": len(ENVELOPE_BYTES),
            "hand_off": len(orjson.dumps(DELIVERY)),
            "agent_reply": len(REPLY_BYTES),
            "answer": len(orjson.dumps(HUB_ANSWER)),
            "record_canonical": len(canonical_json(RECORD)),
        },
        "same_bytes": {
            "record_canonical": canonical_json(RECORD) == canonical_orjson(RECORD),
            "hand_off": json.dumps(DELIVERY, **compact).encode() == orjson.dumps(DELIVERY),
            "row_columns": columns_json(RECORD) == columns_orjson(RECORD),
        },
    }
    total = {"json": 0.0, "orjson": 0.0}
    for name, with_json, with_orjson in OPS:
        samples: dict[str, list[float]] = {"json": [], "orjson": []}
        for _ in range(BATCHES):  # alternating, so drift hits both alike
            samples["json"].append(batch_us(with_json, N))
            samples["orjson"].append(batch_us(with_orjson, N))
        med = {lib: statistics.median(s) for lib, s in samples.items()}
        for lib in total:
            total[lib] += med[lib]
        figures[name] = {
            "json_us": round(med["json"], 3),
            "orjson_us": round(med["orjson"], 3),
            "json_over_orjson": round(med["json"] / med["orjson"], 2),
        }
    figures["per routed message, all of the above"] = {
        "json_us": round(total["json"], 2),
        "orjson_us": round(total["orjson"], 2),
        "saved_us": round(total["json"] - total["orjson"], 2),
        "json_over_orjson": round(total["json"] / total["orjson"], 2),
    }
    report(f"JSON on the hub's hot path, json vs orjson {orjson.__version__} (n={N})", figures)


if __name__ == "__main__":
    main()
