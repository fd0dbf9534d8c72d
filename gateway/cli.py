"""The ``agent-gateway`` command (``python -m gateway`` is the same)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import ConfigError
from gateway.settings import REPO_ROOT, Settings, SettingsError

if TYPE_CHECKING:
    from gateway.decisionlog.log import DecisionLog
    from gateway.decisionlog.replay import ReplayReport
    from gateway.decisionlog.verify import VerifyReport


def _paths(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agents", type=Path, default=REPO_ROOT / "agents.yaml", help="agents.yaml")
    p.add_argument("--schemas", type=Path, default=REPO_ROOT / "schemas", help="schemas folder")
    p.add_argument("--policies", type=Path, default=REPO_ROOT / "policies", help="policies folder")


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("AGENT_GATEWAY_STATE_DIR", REPO_ROOT / ".state")),
        help="where the database and keys live",
    )


def _store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=os.environ.get("AGENT_GATEWAY_STORE") or None,
        metavar="URL",
        help="the state database: postgresql://... (hubs may share it) or a SQLite path "
        "(default: <state-dir>/gateway.db)",
    )


def _remote(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("AGENT_GATEWAY_URL", "http://127.0.0.1:8080"))
    p.add_argument(
        "--key", default=os.environ.get("AGENT_GATEWAY_KEY"), help="API key (operator role)"
    )


def call_hub(args: argparse.Namespace, method: str, path: str, body: Any = None) -> int:
    """One request to a running hub; prints the JSON answer; exit 0 on 2xx."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if args.key:
        request.add_header("Authorization", f"Bearer {args.key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            print(json.dumps(json.loads(resp.read() or b"{}"), indent=2))
            return 0
    except urllib.error.HTTPError as e:
        print(e.read().decode(errors="replace"), file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"error: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2


def _replay_parser(dsub: Any) -> None:
    replay = dsub.add_parser(
        "replay", help="re-evaluate logged inputs under other policies; report what would change"
    )
    _state(replay)
    replay.add_argument(
        "--policies",
        required=True,
        metavar="PATH_OR_REV",
        help="a policies folder, or a git revision whose policies/ to use",
    )
    replay.add_argument(
        "--repo", type=Path, default=REPO_ROOT, help="the git checkout a revision is taken from"
    )
    replay.add_argument(
        "--policies-path", default="policies", help="the policies folder inside the checkout"
    )
    replay.add_argument(
        "--agents",
        type=Path,
        default=None,
        help="agents.yaml for policy data when the log's registry revision is not stored",
    )
    replay.add_argument("--decision", choices=["allow", "deny"])
    replay.add_argument("--agent")
    replay.add_argument("--subject")
    replay.add_argument("--kind", choices=["dispatch", "message"])
    replay.add_argument("--since")
    replay.add_argument("--until")
    replay.add_argument("--limit", type=int, default=None, help="at most this many (newest)")
    replay.add_argument("--json", action="store_true", help="one JSON document")


def _trust_bundle(value: str) -> tuple[str, Path]:
    domain, sep, path = value.partition("=")
    if not sep or not domain or not path:
        raise argparse.ArgumentTypeError("expected DOMAIN=FILE, e.g. partner.example=bundle.json")
    return domain, Path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-gateway", description="A policy-first gateway for agents in containers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the hub")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--keys", type=Path, default=None, help="API keys file")
    serve.add_argument(
        "--secrets",
        type=Path,
        default=None,
        help="secrets file (JSON or YAML, mode 0600) for env {secret: NAME} "
        "(default: <state-dir>/secrets.json)",
    )
    serve.add_argument(
        "--max-body", type=int, default=1024 * 1024, help="request body limit (bytes)"
    )
    serve.add_argument(
        "--hub-id", default=None, help="id for this hub's containers (default: kept in state dir)"
    )
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--probe-interval", type=float, default=2.0, help="monitor period (s)")
    serve.add_argument("--watchdog-window", type=float, default=60.0, help="stall alert (s)")
    serve.add_argument("--ttl-grace", type=int, default=60, help="container TTL past timeout")
    serve.add_argument("--max-attempts", type=int, default=3, help="dispatch retry budget")
    serve.add_argument("--alert-webhook", default=None, help="Alertmanager-compatible URL")
    serve.add_argument("--network", default=None, help="hub-only network (default per backend)")
    serve.add_argument("--egress-network", default=None)
    serve.add_argument(
        "--backend",
        choices=["docker", "swarm"],
        default="docker",
        help="where agents run: the local engine, or Swarm services on a manager (README)",
    )
    serve.add_argument(
        "--trust-domain", default="agent-gateway.local", help="SPIFFE trust domain of agents"
    )
    serve.add_argument(
        "--trust-bundle",
        action="append",
        default=[],
        type=_trust_bundle,
        metavar="DOMAIN=FILE",
        help="also accept JWT-SVIDs of DOMAIN, signed by keys in the JWKS FILE (repeat)",
    )
    serve.add_argument(
        "--reload-poll",
        type=float,
        default=1.0,
        help="seconds between checks of policies/, schemas/, agents.yaml for changes (0: off)",
    )
    serve.add_argument(
        "--mask",
        action="append",
        default=[],
        metavar="RULE",
        help="decision-log masking rule 'mask:/json/pointer' or 'erase:/json/pointer' (repeat)",
    )
    serve.add_argument(
        "--limits",
        type=Path,
        default=REPO_ROOT / "limits.yaml",
        help="quotas and rate limits file (README: Quotas and rate limits)",
    )
    serve.add_argument(
        "--lease",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on a PostgreSQL store: how long a hub's tasks stay its own without a heartbeat"
        " before another hub takes them over (default 10)",
    )
    serve.add_argument(
        "--idempotency-ttl",
        type=float,
        default=24 * 3600.0,
        metavar="SECONDS",
        help="how long an Idempotency-Key replays its task (default 24 h)",
    )
    serve.add_argument(
        "--no-log-api-reads",
        dest="log_api_reads",
        action="store_false",
        help="do not log allowed API reads (denials and state changes are always logged)",
    )

    reload = sub.add_parser(
        "reload", help="make a running hub reload (validate, test, then swap) its files"
    )
    _remote(reload)

    identity = sub.add_parser("identity", help="a running hub's JWT-SVID signing key")
    isub = identity.add_subparsers(dest="identity_command", required=True)
    rotate = isub.add_parser(
        "rotate", help="sign new tokens with a new key; tokens already issued stay valid"
    )
    _remote(rotate)

    mode = sub.add_parser("mode", help="put a running hub in normal or degraded mode")
    mode.add_argument("mode", choices=["normal", "degraded", "auto"])
    _remote(mode)
    _state(serve)
    _store(serve)
    _paths(serve)

    check = sub.add_parser("check", help="validate agents.yaml, schemas, policies and limits.yaml")
    _paths(check)
    check.add_argument("--limits", type=Path, default=REPO_ROOT / "limits.yaml", help="limits file")

    policy = sub.add_parser("policy", help="policy tools")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    ptest = psub.add_parser("test", help="run the *_test.rego tests, like 'opa test'")
    ptest.add_argument("path", type=Path, nargs="?", default=REPO_ROOT / "policies")
    ptest.add_argument("-v", "--verbose", action="store_true")
    ptest.add_argument("--coverage", action="store_true")
    ptest.add_argument("-r", "--run", default=None, help="only tests whose data.pkg.test_x matches")
    ptest.add_argument("--format", choices=["pretty", "json"], default="pretty")

    keys = sub.add_parser("keys", help="API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    kcreate = ksub.add_parser("create", help="create a key and print it once")
    kcreate.add_argument("--subject", required=True)
    kcreate.add_argument("--roles", default="user", help="comma-separated roles")
    kcreate.add_argument("--keys", type=Path, default=None, help="keys file")
    _state(kcreate)

    images = sub.add_parser("images", help="agent images")
    isub = images.add_subparsers(dest="images_command", required=True)
    ibuild = isub.add_parser("build", help="build the example agent images")
    ibuild.add_argument(
        "--base-image",
        default=os.environ.get("AGENT_GATEWAY_BASE_IMAGE", "agent-gateway/python-base:bookworm"),
    )
    ibuild.add_argument("--tag", default="dev")
    ibuild.add_argument("names", nargs="*")

    agents = sub.add_parser("agents", help="print the registry")
    _paths(agents)

    tasks = sub.add_parser("tasks", help="list tasks in the state database")
    _state(tasks)
    _store(tasks)
    tasks.add_argument("--state", default=None)
    tasks.add_argument("--limit", type=int, default=20)

    decisions = sub.add_parser("decisions", help="the decision log")
    dsub = decisions.add_subparsers(dest="decisions_command", required=True)
    for name, help_text in (
        ("list", "list decisions"),
        ("show", "show one decision"),
        ("verify", "verify the hash chain"),
        ("export", "export as JSON Lines"),
    ):
        d = dsub.add_parser(name, help=help_text)
        _state(d)
        _store(d)
        if name == "show":
            d.add_argument("decision_id")
        if name in ("list", "export"):
            d.add_argument("--decision", choices=["allow", "deny"])
            d.add_argument("--agent")
            d.add_argument("--subject")
            d.add_argument("--kind")
            d.add_argument("--since")
            d.add_argument("--until")
            d.add_argument("--limit", type=int, default=50 if name == "list" else 1_000_000)
        if name == "verify":
            d.add_argument(
                "--export",
                type=Path,
                metavar="FILE",
                help="check this export of a prune against its checkpoint instead of the log",
            )
            d.add_argument(
                "--checkpoint",
                type=int,
                metavar="ID",
                help="with --export: the checkpoint to check against (default: the one it matches)",
            )
    _prune_parser(dsub)
    _replay_parser(dsub)
    return parser


def _prune_parser(dsub: Any) -> None:
    prune = dsub.add_parser(
        "prune", help="export the oldest decisions to a file, then replace them with a checkpoint"
    )
    _state(prune)
    _store(prune)
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--before", type=int, metavar="SEQ", help="the records before seq SEQ")
    which.add_argument(
        "--until", metavar="TIMESTAMP", help="the oldest records up to this RFC 3339 time"
    )
    prune.add_argument(
        "--export", type=Path, required=True, metavar="FILE", help="a new JSON Lines file"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        handler = COMMANDS[args.command]
        return handler(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SettingsError as e:
        print(f"error: setting {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


NETWORKS = {
    "docker": ("agent-gateway-internal", "agent-gateway-egress"),
    "swarm": ("agent-gateway-swarm", "agent-gateway-swarm-egress"),
}


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.http.agent_app import start_listeners
    from gateway.http.app import create_app

    logs.configure(args.log_level)
    settings = Settings(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        keys_file=args.keys,
        secrets_file=args.secrets,
        agents_file=args.agents,
        schemas_dir=args.schemas,
        policies_dir=args.policies,
        max_body_bytes=args.max_body,
        hub_id=args.hub_id or persistent_hub_id(args.state_dir),
        probe_interval_s=args.probe_interval,
        watchdog_window_s=args.watchdog_window,
        container_ttl_grace_s=args.ttl_grace,
        max_attempts=args.max_attempts,
        alert_webhook_url=args.alert_webhook,
        # Swarm overlays get their own names: a bridge of the Docker backend's may exist.
        network=args.network or NETWORKS[args.backend][0],
        egress_network=args.egress_network or NETWORKS[args.backend][1],
        backend=args.backend,
        trust_domain=args.trust_domain,
        trust_bundles=tuple(args.trust_bundle),
        reload_poll_s=args.reload_poll,
        mask=tuple(args.mask),
        log_api_reads=args.log_api_reads,
        limits_file=args.limits,
        idempotency_ttl_s=args.idempotency_ttl,
        store=args.store,
        lease_s=args.lease,
    )
    app = create_app(settings)

    async def run() -> None:
        # Agents reach the hub at the internal network's gateway address, where a second
        # app on the same hub serves only the agent routes (gateway.http.agent_app).
        listeners = await start_listeners(app, host=settings.host, port=settings.port)
        print(json.dumps({"msg": "listening", "urls": listeners.urls}), file=sys.stderr)
        # SIGTERM (docker stop, systemd, Kubernetes) stops the hub as Ctrl-C does: runners
        # detached, idle warm containers removed, the store closed. Without a handler the
        # process would die on the spot and leave all of that to the next start.
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        try:
            await stopping.wait()
        finally:
            await listeners.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


def persistent_hub_id(state_dir: Path) -> str:
    """The hub id kept in the state directory, so a restart recognises its containers."""
    import secrets

    path = Path(state_dir) / "hub-id"
    if path.exists():
        return path.read_text().strip()
    # Private from the start; the store sets the exact mode (0700) whatever the umask.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    hub_id = "hub-" + secrets.token_hex(4)
    path.write_text(hub_id + "\n")
    return hub_id


def cmd_reload(args: argparse.Namespace) -> int:
    return call_hub(args, "POST", "/v1/admin/reload")


def cmd_identity(args: argparse.Namespace) -> int:
    return call_hub(args, "POST", "/v1/admin/identity/rotate")


def cmd_mode(args: argparse.Namespace) -> int:
    return call_hub(args, "POST", "/v1/admin/mode", {"mode": args.mode})


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.bundle.config import load_config

    config = load_config(
        agents_file=args.agents,
        schemas_dir=args.schemas,
        policies_dir=args.policies,
        limits_file=args.limits,
    )
    print(f"schemas:  {len(config.schemas.documents)} ok ({config.schemas_revision})")
    print(f"agents:   {len(config.registry.agents)} ok ({config.registry_revision})")
    print(f"policies: {len(config.policy.modules)} modules ok ({config.policy_revision})")
    print(f"limits:   {config.limits.source} ok ({config.limits_revision})")
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    from gateway.policy.testing import format_report, report_to_json, run_tests

    report = run_tests(args.path, coverage=args.coverage, run=args.run)
    if args.format == "json":
        print(json.dumps(report_to_json(report), indent=2))
    else:
        sys.stdout.write(format_report(report, verbose=args.verbose))
    failed = [r for r in report.results if r.outcome != "pass"]
    return 1 if failed or not report.results else 0


def cmd_keys(args: argparse.Namespace) -> int:
    from gateway.identity.apikeys import KeyStore

    path = args.keys or args.state_dir / "keys.json"
    store = KeyStore.load(path)
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    try:
        key = store.create(args.subject, roles)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(key)
    print(f"# subject={args.subject} roles={','.join(roles)} file={path}", file=sys.stderr)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from gateway.containers.images import build_examples
    from gateway.errors import AgentUnavailable

    try:
        built = build_examples(base_image=args.base_image, tag=args.tag, names=args.names or None)
    except AgentUnavailable as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    for name, image_id in built.items():
        print(f"agent-gateway/{name}:{args.tag} {image_id[:19]}")
    return 0


def cmd_agents(args: argparse.Namespace) -> int:
    from gateway.bundle.registry import load_registry
    from gateway.bundle.schemas import SchemaSet

    registry = load_registry(args.agents, SchemaSet.load(args.schemas))
    for spec in registry.agents.values():
        print(f"{spec.name:12} {spec.image:32} {', '.join(spec.capabilities)}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from gateway.store import Task, open_store

    async def run() -> list[Task]:
        store = open_store(args.store or args.state_dir / "gateway.db")
        try:
            tasks, _ = await store.list_tasks(state=args.state, limit=args.limit)
            return tasks
        finally:
            await store.close()

    for t in asyncio.run(run()):
        print(f"{t.id}  {t.state:10} {t.agent:12} {t.created_at}")
    return 0


# --- agent-gateway decisions list|show|verify|export|prune|replay ---------------------------


def cmd_decisions(args: argparse.Namespace) -> int:
    """Run a ``decisions`` subcommand against the state directory's database."""
    db_path = args.state_dir / "gateway.db"
    store_at = getattr(args, "store", None) or db_path
    if store_at == db_path and not db_path.exists():
        print(f"error: no database at {db_path}", file=sys.stderr)
        return 2
    if args.decisions_command == "replay":
        return _decisions_replay(args, db_path)
    if args.decisions_command == "verify" and args.checkpoint is not None and not args.export:
        print("error: --checkpoint goes with --export", file=sys.stderr)
        return 2

    from gateway.decisionlog.log import DecisionLog
    from gateway.store import open_store

    async def run() -> int:
        store = open_store(store_at)
        log = DecisionLog(store, hub_id="cli")
        try:
            if args.decisions_command == "show":
                return await _decisions_show(log, args.decision_id)
            if args.decisions_command == "verify" and args.export:
                return await _decisions_verify_export(log, args.export, args.checkpoint)
            if args.decisions_command == "verify":
                return await _decisions_verify(log)
            if args.decisions_command == "prune":
                return await _decisions_prune(log, args)
            return await _decisions_list(log, args)
        finally:
            await store.close()

    from gateway.errors import StoreUnavailable

    try:
        return asyncio.run(run())
    except StoreUnavailable as e:  # a PostgreSQL store that cannot be reached
        print(f"error: {e.message}", file=sys.stderr)
        return 1


async def _decisions_show(log: DecisionLog, decision_id: str) -> int:
    from gateway.errors import UnknownDecision

    try:
        print(json.dumps(await log.get(decision_id), indent=2))
    except UnknownDecision as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    return 0


def _print_problems(report: VerifyReport) -> None:
    for problem in report.problems:
        print(
            f"{problem['kind'].upper()}: seq {problem['seq']} "
            f"({problem['decision_id']}): {problem['message']}"
        )


async def _decisions_verify(log: DecisionLog) -> int:
    report = await log.verify()
    _print_problems(report)
    cp = report.checkpoint
    if cp is not None:
        print(
            f"CHECKPOINT: records seq 1..{cp['through_seq']} were pruned (the last prune, "
            f"checkpoint {cp['id']}: seq {cp['first_seq']}..{cp['through_seq']}, exported to "
            f"{cp['export_name']}, sha256 {cp['export_sha256']}); the chain continues from "
            f"seq {cp['through_seq']} {cp['head_hash'][:12]}. Check an export with: "
            f"agent-gateway decisions verify --export FILE"
        )
    state = "OK" if report.ok else "TAMPERED"
    print(f"{state}: {report.checked} records checked, head {report.head}")
    return 0 if report.ok else 1


async def _decisions_verify_export(
    log: DecisionLog, export: Path, checkpoint_id: int | None
) -> int:
    """``verify --export``: 0 the export is the one its checkpoint recorded, 1 it is not, 2
    it cannot be read or no checkpoint fits."""
    from gateway.decisionlog.checkpoint import UnknownCheckpoint

    try:
        report = await log.verify_export(export, checkpoint_id=checkpoint_id)
    except OSError as e:
        print(f"error: cannot read {export}: {e.strerror or e}", file=sys.stderr)
        return 2
    except UnknownCheckpoint as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_problems(report)
    cp = report.checkpoint or {}
    state = "OK" if report.ok else "TAMPERED"
    print(
        f"{state}: {report.checked} records checked in {export} against checkpoint "
        f"{cp.get('id')} (records seq {cp.get('first_seq')}..{cp.get('through_seq')}, "
        f"sha256 {cp.get('export_sha256')})"
    )
    return 0 if report.ok else 1


async def _decisions_prune(log: DecisionLog, args: argparse.Namespace) -> int:
    """``prune``: 0 pruned (the checkpoint on stdout), 1 refused with nothing deleted."""
    from gateway.decisionlog.prune import PruneError

    try:
        checkpoint = await log.prune(args.export, before=args.before, until=args.until)
    except PruneError as e:
        print(f"error: prune refused: {e}", file=sys.stderr)
        return 1
    print(json.dumps(checkpoint, indent=2))
    return 0


async def _decisions_list(log: DecisionLog, args: argparse.Namespace) -> int:
    """``list`` (newest first, one line each) and ``export`` (JSON Lines, oldest first)."""
    allow = None if args.decision is None else args.decision == "allow"
    records: list[dict[str, Any]] = []
    before = None
    while len(records) < args.limit:
        page, before = await log.list(
            allow=allow,
            agent=args.agent,
            subject=args.subject,
            kind=args.kind,
            since=args.since,
            until=args.until,
            limit=min(500, args.limit - len(records)),
            before=before,
        )
        records.extend(page)
        if before is None:
            break
    if args.decisions_command == "export":
        for rec in reversed(records):
            sys.stdout.write(json.dumps(rec, sort_keys=True) + "\n")
        return 0
    for rec in records:
        verdict = "allow" if rec["result"].get("allow") is True else "deny "
        reasons = "; ".join(str(r) for r in rec["result"].get("reasons") or [])
        if "malformed" in rec:
            reasons = f"MALFORMED ROW ({rec['malformed']})"
        print(
            f"{rec.get('timestamp')}  {verdict}  {rec.get('kind') or '-':8}  "
            f"{rec.get('subject') or '-':10} {rec.get('agent') or '-':10} "
            f"{rec.get('decision_id')}  {reasons}"
        )
    return 0


def _decisions_replay(args: argparse.Namespace, db_path: Path) -> int:
    """``decisions replay``: 0 nothing would change, 1 something would, 2 an error."""
    from gateway.decisionlog.replay import ReplayError, replay_log
    from gateway.errors import StoreUnavailable

    try:
        report = replay_log(
            db_path,
            args.policies,
            repo=args.repo,
            policies_path=args.policies_path,
            agents_file=args.agents,
            allow=None if args.decision is None else args.decision == "allow",
            agent=args.agent,
            subject=args.subject,
            kind=args.kind,
            since=args.since,
            until=args.until,
            limit=args.limit,
        )
    except (ReplayError, StoreUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: the replayed policies do not load: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(format_replay_report(report))
    return 1 if report.changes else 0


def _verdict(result: dict[str, Any]) -> str:
    allowed = "allow" if result.get("allow") is True else "deny"
    reasons = "; ".join(str(r) for r in result.get("reasons") or [])
    sandbox = result.get("sandbox")
    extra = f" sandbox={json.dumps(sandbox, sort_keys=True)}" if sandbox else ""
    return f"{allowed} ({reasons}){extra}"


def format_replay_report(report: ReplayReport) -> str:
    """A replay report as text: one block per change, then the summary."""
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


COMMANDS = {
    "serve": cmd_serve,
    "check": cmd_check,
    "policy": cmd_policy,
    "keys": cmd_keys,
    "images": cmd_images,
    "agents": cmd_agents,
    "tasks": cmd_tasks,
    "decisions": cmd_decisions,
    "mode": cmd_mode,
    "reload": cmd_reload,
    "identity": cmd_identity,
}

if __name__ == "__main__":
    raise SystemExit(main())
