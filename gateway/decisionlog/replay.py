"""Replay: re-evaluate logged decision inputs under other policies; report what would change.

``agent-gateway decisions replay --policies PATH_OR_REV`` takes the inputs the decision log
recorded, evaluates each under the given policies (a folder, or the ``policies/`` of a git
revision, extracted with ``git archive``) and reports every decision whose answer would
differ: allow to deny, deny to allow, other reasons, another sandbox. It is a way to review
a policy change against real traffic before merging it.

What it can and cannot see:

- Inputs are logged **after masking**: a masked field reads ``"**REDACTED**"`` and an erased
  one is absent, so a rule that reads such a field may decide differently than it would have
  on the real input. The report counts the replayed inputs that carry masked fields.
- ``data.agents`` is the registry the decision was made with (the log's revision names it and
  the store keeps every registry revision it loaded); when that revision is not stored, the
  latest stored registry, or ``--agents``, stands in.
- A logged deny that came from the guardrails (not the policy) is replayed through the
  policy alone; such changes are marked.

Exit status: 0 when no decision would change, 1 when some would, 2 on an error (no
database, an unknown revision, policies that do not compile).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.bundle.revision import revision_of, split_revision
from gateway.decisionlog.log import row_to_json
from gateway.errors import ConfigError
from gateway.policy.engine import Decision, RegorusPolicy

GIT_TIMEOUT_S = 30.0
CHANGE_KINDS = ("allow→deny", "deny→allow", "reasons", "sandbox")


class ReplayError(Exception):
    """The replay cannot run (bad revision, no such folder); the message says why."""


@dataclass(frozen=True)
class Change:
    """One logged decision that the other policies would decide differently."""

    decision_id: str
    timestamp: str
    kind: str
    subject: str | None
    agent: str | None
    change: str
    before: dict[str, Any]
    after: dict[str, Any]
    note: str = ""


@dataclass
class ReplayReport:
    """Every change, with counts; ``masked_inputs`` replayed inputs had masked fields."""

    policies: str
    revision: str
    replayed: int = 0
    unchanged: int = 0
    masked_inputs: int = 0
    changes: list[Change] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many changes of each kind."""
        found = Counter(c.change for c in self.changes)
        return {kind: found.get(kind, 0) for kind in CHANGE_KINDS}

    def to_json(self) -> dict[str, Any]:
        """The report as one JSON document."""
        return {**asdict(self), "counts": self.counts(), "inputs_are_masked": True}


# --- which policies ---------------------------------------------------------------------


def _git(repo: Path, *args: str) -> bytes:
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ReplayError(f"git {args[0]} failed: {e}") from e
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        raise ReplayError(f"git {args[0]}: {message[-1] if message else 'failed'}")
    return proc.stdout


@contextlib.contextmanager
def resolve_policies(
    spec: str, *, repo: Path, policies_path: str = "policies"
) -> Iterator[tuple[Path, str]]:
    """(folder, revision) for a policies folder, or for a git revision's policies folder.

    A revision's files are extracted with ``git archive`` into a temporary folder that is
    removed afterwards; the working tree is not touched.
    """
    folder = Path(spec)
    if folder.is_dir():
        yield folder, str(revision_of([folder]))
        return
    try:
        commit = _git(repo, "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
    except ReplayError:
        raise ReplayError(f"{spec!r} is neither a folder nor a git revision in {repo}") from None
    sha = commit.decode().strip()
    archive = _git(repo, "archive", "--format=tar", sha, "--", policies_path)
    with tempfile.TemporaryDirectory(prefix="agw-replay-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        extracted = Path(tmp) / policies_path
        if not extracted.is_dir():
            raise ReplayError(f"{spec} has no folder {policies_path}/")
        yield extracted, f"{sha[:12]} ({spec})"


# --- comparing ----------------------------------------------------------------------------


def compare(before: dict[str, Any], after: Decision) -> str | None:
    """The kind of change from a logged result to a new decision, or None."""
    was_allowed = before.get("allow") is True
    if was_allowed != after.allow:
        return "allow→deny" if was_allowed else "deny→allow"
    old_reasons = sorted(str(r) for r in before.get("reasons") or [])
    if old_reasons != sorted(after.reasons):
        return "reasons"
    if after.allow and (before.get("sandbox") or None) != (after.sandbox or None):
        return "sandbox"
    return None


def _query(path: str) -> str:
    return "data." + path.strip("/").replace("/", ".")


class _Policies:
    """The replayed policies compiled once per registry revision they are evaluated with."""

    def __init__(self, folder: Path, registries: dict[str, Any], fallback: dict[str, Any]):
        self.folder = folder
        self.registries = registries
        self.fallback = fallback
        self._engines: dict[str, RegorusPolicy] = {}

    def for_revision(self, revision: str) -> RegorusPolicy:
        agents_rev = split_revision(revision).get("agents", "")
        key = agents_rev if agents_rev in self.registries else ""
        policy = self._engines.get(key)
        if policy is None:
            agents = self.registries[key] if key else self.fallback
            policy = RegorusPolicy.load(self.folder, data={"agents": agents}, required=())
            self._engines[key] = policy
        return policy


def replay(records: list[dict[str, Any]], policies: _Policies, report: ReplayReport) -> None:
    """Evaluate every record's input under ``policies`` and add what changed to ``report``."""
    for rec in records:
        if "malformed" in rec or not isinstance(rec.get("input"), dict):
            report.skipped.append(
                {"decision_id": str(rec.get("decision_id")), "why": "malformed row"}
            )
            continue
        policy = policies.for_revision(str(rec.get("revision") or ""))
        after = policy.evaluate(_query(str(rec["path"])), rec["input"])
        report.replayed += 1
        if rec.get("masked") or rec.get("erased"):
            report.masked_inputs += 1
        before = rec["result"] if isinstance(rec.get("result"), dict) else {}
        kind = compare(before, after)
        if kind is None:
            report.unchanged += 1
            continue
        note = ""
        if before.get("error") == "guardrails":
            note = "the logged deny came from the guardrails, which would still apply"
        report.changes.append(
            Change(
                decision_id=str(rec["decision_id"]),
                timestamp=str(rec.get("timestamp")),
                kind=str(rec.get("kind")),
                subject=rec.get("subject"),
                agent=rec.get("agent"),
                change=kind,
                before=before,
                after=after.to_json(),
                note=note,
            )
        )


# --- reading the log ----------------------------------------------------------------------


def read_log(db_path: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], Any]:
    """(decisions oldest first, filtered, {registry revision: agents}) from the database."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        where, params = [], []
        allow = None if args.decision is None else int(args.decision == "allow")
        for sql, value in (
            ("allow = ?", allow),
            ("agent = ?", args.agent),
            ("subject = ?", args.subject),
            ("kind = ?", args.kind),
            ("timestamp >= ?", args.since),
            ("timestamp <= ?", args.until),
        ):
            if value is not None:
                where.append(sql)
                params.append(value)
        sql = "SELECT * FROM decisions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC"
        if args.limit is not None:
            sql += " LIMIT ?"
            params.append(args.limit)
        rows = conn.execute(sql, params).fetchall()
        registries: dict[str, Any] = {}
        latest: Any = None
        for row in conn.execute(
            "SELECT revision, agents FROM registry_revisions ORDER BY loaded_at"
        ):
            with contextlib.suppress(ValueError, TypeError):
                registries[row["revision"]] = latest = json.loads(row["agents"])
    finally:
        conn.close()
    return [row_to_json(r) for r in reversed(rows)], (registries, latest)


def _fallback_registry(args: argparse.Namespace, latest: Any) -> dict[str, Any]:
    if args.agents is not None:
        from gateway.bundle.registry import load_registry
        from gateway.bundle.schemas import SchemaSet

        schemas = SchemaSet.load(Path(args.agents).parent / "schemas")
        return load_registry(Path(args.agents), schemas).to_json()
    return latest if isinstance(latest, dict) else {}


# --- output -------------------------------------------------------------------------------


def _verdict(result: dict[str, Any]) -> str:
    allowed = "allow" if result.get("allow") is True else "deny"
    reasons = "; ".join(str(r) for r in result.get("reasons") or [])
    sandbox = result.get("sandbox")
    extra = f" sandbox={json.dumps(sandbox, sort_keys=True)}" if sandbox else ""
    return f"{allowed} ({reasons}){extra}"


def format_report(report: ReplayReport) -> str:
    """The report as text: one block per change, then the summary."""
    lines = [f"replayed the decision log under {report.policies} at {report.revision}"]
    lines.append(
        "note: inputs are replayed as logged, after masking: masked fields read "
        '"**REDACTED**" and erased ones are absent'
        + (f" ({report.masked_inputs} of these inputs have some)" if report.masked_inputs else "")
    )
    for c in report.changes:
        lines.append("")
        lines.append(
            f"{c.change.upper():11} {c.timestamp}  {c.kind:8} {c.subject or '-'}  "
            f"{c.agent or '-'}  {c.decision_id}"
        )
        lines.append(f"    logged:   {_verdict(c.before)}")
        lines.append(f"    replayed: {_verdict(c.after)}")
        if c.note:
            lines.append(f"    note: {c.note}")
    counts = ", ".join(f"{k} {v}" for k, v in report.counts().items())
    lines.append("")
    lines.append(
        f"{report.replayed} replayed, {report.unchanged} unchanged, "
        f"{len(report.changes)} would change ({counts})"
        + (f", {len(report.skipped)} malformed rows skipped" if report.skipped else "")
    )
    return "\n".join(lines) + "\n"


def run_replay(args: argparse.Namespace, db_path: Path) -> int:
    """``agent-gateway decisions replay``: 0 nothing changes, 1 something would, 2 error."""
    try:
        records, (registries, latest) = read_log(db_path, args)
        fallback = _fallback_registry(args, latest)
        with resolve_policies(args.policies, repo=args.repo, policies_path=args.policies_path) as (
            folder,
            revision,
        ):
            report = ReplayReport(policies=args.policies, revision=revision)
            replay(records, _Policies(folder, registries, fallback), report)
    except (ReplayError, sqlite3.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: the replayed policies do not load: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(format_report(report))
    return 1 if report.changes else 0
