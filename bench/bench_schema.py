"""Schema validation time for a task envelope plus the agent input, per request.

Compares the validator the hub uses (jsonschema-rs) with the pure-Python ``jsonschema``
on the same schemas (same $ref registry) in the same run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jsonschema
import referencing

from bench._stats import report, summary
from gateway.bundle.schemas import BASE_URI, SchemaSet
from gateway.settings import REPO_ROOT

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
ENVELOPE = {
    "capability": "text.summarize",
    "input": {"text": "A sentence. " * 40, "top": 5, "summary_sentences": 2},
    "timeout_s": 10,
    "labels": {"team": "docs"},
}


def time_it(func, n: int) -> list[float]:
    for _ in range(200):
        func()
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        func()
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def main() -> None:
    schemas = SchemaSet.load(REPO_ROOT / "schemas")
    task_v = schemas.validator("task.schema.json")
    input_v = schemas.validator("agents/wordstats.input.json")

    def rs() -> None:
        assert task_v.is_valid(ENVELOPE) and input_v.is_valid(ENVELOPE["input"])

    registry = referencing.Registry().with_resources(
        (BASE_URI + rel, referencing.Resource.from_contents(json.loads(json.dumps(doc))))
        for rel, doc in schemas.documents.items()
    )
    py_task = jsonschema.Draft202012Validator(
        schemas.documents["task.schema.json"], registry=registry
    )
    py_input = jsonschema.Draft202012Validator(
        schemas.documents["agents/wordstats.input.json"], registry=registry
    )

    def py() -> None:
        assert py_task.is_valid(ENVELOPE) and py_input.is_valid(ENVELOPE["input"])

    fast = summary(time_it(rs, N))
    slow = summary(time_it(py, max(1000, N // 10)))
    report(
        "schema validation (task envelope + agent input)",
        {
            "jsonschema_rs_us": fast,
            "jsonschema_py_us": slow,
            "speedup_median": slow["median"] / fast["median"],
        },
    )


if __name__ == "__main__":
    main()
