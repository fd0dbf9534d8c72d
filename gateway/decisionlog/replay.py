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

The command itself (arguments, the text report, exit status) is in ``gateway.cli``; this
module is the replay: ``replay_log`` and its parts.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.bundle.revision import revision_of, split_revision
from gateway.decisionlog.records import row_to_json
from gateway.policy.engine import Decision, RegorusPolicy
from gateway.store.sqlite import read_decisions_file

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


def read_log(
    db_path: Path,
    *,
    allow: bool | None = None,
    agent: str | None = None,
    subject: str | None = None,
    kind: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    """(the newest ``limit`` matching decisions, oldest first; {registry revision: agents};
    the latest stored registry) from the database file, opened read-only."""
    rows, revisions = read_decisions_file(
        db_path,
        allow=allow,
        agent=agent,
        subject=subject,
        kind=kind,
        since=since,
        until=until,
        limit=limit,
    )
    registries: dict[str, Any] = {}
    latest: Any = None
    for revision, agents in revisions:
        with contextlib.suppress(ValueError, TypeError):
            registries[revision] = latest = json.loads(agents)
    return [row_to_json(r) for r in rows], registries, latest


def fallback_registry(agents_file: Path | None, latest: Any) -> dict[str, Any]:
    """``data.agents`` for decisions whose registry revision is not stored: ``agents_file``
    when given, else the latest stored registry."""
    if agents_file is not None:
        from gateway.bundle.registry import load_registry
        from gateway.bundle.schemas import SchemaSet

        schemas = SchemaSet.load(Path(agents_file).parent / "schemas")
        return load_registry(Path(agents_file), schemas).to_json()
    return latest if isinstance(latest, dict) else {}


def replay_log(
    db_path: Path,
    spec: str,
    *,
    repo: Path,
    policies_path: str = "policies",
    agents_file: Path | None = None,
    allow: bool | None = None,
    agent: str | None = None,
    subject: str | None = None,
    kind: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
) -> ReplayReport:
    """Replay the logged decisions the filters select (as ``read_log``) under the policies
    ``spec`` names (as ``resolve_policies``).

    Raises ReplayError, StoreUnavailable (an unreadable log) or ConfigError (policies that
    do not load).
    """
    records, registries, latest = read_log(
        db_path,
        allow=allow,
        agent=agent,
        subject=subject,
        kind=kind,
        since=since,
        until=until,
        limit=limit,
    )
    fallback = fallback_registry(agents_file, latest)
    with resolve_policies(spec, repo=repo, policies_path=policies_path) as (folder, revision):
        report = ReplayReport(policies=spec, revision=revision)
        replay(records, _Policies(folder, registries, fallback), report)
    return report
