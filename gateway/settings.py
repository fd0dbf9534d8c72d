"""Settings, read once at start-up and validated; a bad value fails fast with its name.

``Settings`` is flat (the CLI and the tests set any field by keyword); each component is
handed its own section whole (``settings.monitor``, ``settings.containers``...), the way
httpx passes a ``Timeout`` or ``Limits``, so the hub never copies fields one by one.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from gateway.decisionlog.masking import parse_mask_rule
from gateway.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE_IMAGE = "agent-gateway/python-base:bookworm"


class SettingsError(ValueError):
    """A setting has an invalid value; the message names it."""


# --- sections: what each component is handed ---------------------------------------------


@dataclass(frozen=True)
class BundleSettings:
    """The files a user edits, and how often (s) the reloader looks at them (0: never)."""

    agents_file: Path
    schemas_dir: Path
    policies_dir: Path
    reload_poll_s: float
    limits_file: Path | None = None  # None: no quotas or rate limits


@dataclass(frozen=True)
class MonitorSettings:
    """The monitor's round interval (0: no background rounds), the throughput watchdog's
    window, and the orphan scan's interval and grace for containers of tasks just ended."""

    probe_interval_s: float
    watchdog_window_s: float
    orphan_scan_interval_s: float
    orphan_grace_s: float


@dataclass(frozen=True)
class RecoverySettings:
    """Restart recovery: how many attempts a task gets before it fails."""

    max_attempts: int


@dataclass(frozen=True)
class IdentitySettings:
    """Agent identities (JWT-SVIDs): trust domain, audience, lifetime, extra trusted bundles."""

    trust_domain: str
    audience: str
    ttl_s: int
    bundles: tuple[tuple[str, Path], ...]


@dataclass(frozen=True)
class MessageSettings:
    """Agent-to-agent messages: default and maximum wait for a reply, how deep delegated
    tasks may nest, and how long one hand-off to an agent may take."""

    timeout_s: float
    max_timeout_s: float
    max_delegation_depth: int
    delivery_timeout_s: float = 5.0


@dataclass(frozen=True)
class ContainerSettings:
    """The container backend and the limits the task router applies to containers; the
    secrets file agents' ``env: {VAR: {secret: NAME}}`` entries are read from."""

    internal_network: str
    egress_network: str
    docker_workers: int
    ttl_grace_s: int
    max_running: int
    secrets_file: Path | None = None
    # "docker" (the local engine) or "swarm" (a service per container on a Swarm manager).
    backend: str = "docker"

    @property
    def networks(self) -> dict[str, str]:
        """The networks a sandbox names (``internal``, ``egress``) and their engine names."""
        return {"internal": self.internal_network, "egress": self.egress_network}


# --- settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything the hub needs to start. Paths default to the repository's files."""

    host: str = "127.0.0.1"
    port: int = 8080
    state_dir: Path = field(default_factory=lambda: REPO_ROOT / ".state")
    keys_file: Path | None = None
    # The secrets file (JSON or YAML, mode 0600) for env entries {secret: NAME}; None means
    # <state-dir>/secrets.json.
    secrets_file: Path | None = None
    agents_file: Path = field(default_factory=lambda: REPO_ROOT / "agents.yaml")
    schemas_dir: Path = field(default_factory=lambda: REPO_ROOT / "schemas")
    policies_dir: Path = field(default_factory=lambda: REPO_ROOT / "policies")
    max_body_bytes: int = 1024 * 1024
    hub_id: str = field(default_factory=lambda: "hub-" + secrets.token_hex(4))
    network: str = "agent-gateway-internal"
    egress_network: str = "agent-gateway-egress"
    trust_domain: str = "agent-gateway.local"
    # Containers get this long past their task's deadline before they stop by themselves,
    # so a dead hub never leaves them running for ever.
    container_ttl_grace_s: int = 60
    max_running_containers: int = 16
    default_timeout_s: float = 60.0
    max_wait_s: float = 60.0
    docker_workers: int = 4
    # The container backend: "docker" or "swarm" (gateway.containers.swarm).
    backend: str = "docker"
    # Extra address the hub listens on for agents (the internal network's gateway); None
    # means "discover it from the Docker network".
    agent_listen_host: str | None = None
    # Recovery and monitoring.
    max_attempts: int = 3
    probe_interval_s: float = 2.0
    watchdog_window_s: float = 60.0
    orphan_scan_interval_s: float = 30.0
    orphan_grace_s: float = 30.0
    # Alertmanager-compatible endpoint (e.g. http://alertmanager:9093/api/v2/alerts).
    alert_webhook_url: str | None = None
    # Agent identities (JWT-SVIDs): the audience tokens are minted for, their lifetime
    # (agents renew through the hub), and extra trusted bundles as (trust domain, JWKS file).
    svid_audience: str = "agent-gateway"
    svid_ttl_s: int = 300
    trust_bundles: tuple[tuple[str, Path], ...] = ()
    # Agent-to-agent messages: default and maximum wait for a reply, and how deep
    # delegated tasks may nest below the task a user submitted.
    message_timeout_s: float = 10.0
    max_message_timeout_s: float = 120.0
    max_delegation_depth: int = 3
    # Hot reload: how often (s) the hub looks for changes in policies/, schemas/ and
    # agents.yaml; 0 turns the watcher off (POST /v1/admin/reload still works).
    reload_poll_s: float = 1.0
    # Decision-log masking rules, each "mask:/json/pointer" (value replaced) or
    # "erase:/json/pointer" (field removed); "*" matches any key or index. Applied to a copy
    # of every policy input before it is logged, with the paths recorded in masked/erased.
    mask: tuple[str, ...] = ()
    # API authorization (policies/api.rego): denials and state-changing calls are always
    # logged; allowed reads by an authenticated caller too, unless this is off.
    log_api_reads: bool = True
    # Quotas and rate limits (limits.yaml; README "Quotas and rate limits"). None: none, as
    # for the benchmarks of raw throughput; ``agent-gateway serve`` loads the file in git.
    limits_file: Path | None = None
    # How long an Idempotency-Key replays its task; older keys are pruned and reusable.
    idempotency_ttl_s: float = 24 * 3600.0
    # Where the state is (gateway.store.open_store): None for <state-dir>/gateway.db (SQLite),
    # a postgresql:// URL (several hubs may share it), or a SQLite path / sqlite:/// URL.
    store: str | None = None
    # On a PostgreSQL store the hubs form a cluster (gateway.cluster): each beats every
    # lease/5 s, and another hub takes over its tasks once it missed a whole lease.
    lease_s: float = 10.0

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_rules()
        self._check_paths()
        schemes = ("postgresql://", "postgres://", "sqlite:///")
        if self.store and "://" in self.store and not self.store.startswith(schemes):
            raise SettingsError(f"store: {self.store!r} is neither postgresql:// nor sqlite:///")

    def _check_numbers(self) -> None:
        # (holds, message): each message names the setting, as the CLI flag does.
        checks = (
            (0 < self.port < 65536, f"port: {self.port} is not a TCP port"),
            (self.max_body_bytes >= 1024, f"max_body_bytes: {self.max_body_bytes} is below 1024"),
            (self.max_running_containers >= 1, "max_running_containers: must be at least 1"),
            (self.default_timeout_s > 0, "default_timeout_s: must be positive"),
            (self.docker_workers >= 1, "docker_workers: must be at least 1"),
            (1 <= self.svid_ttl_s <= 3600, "svid_ttl_s: must be within 1..3600"),
            (
                0 < self.message_timeout_s <= self.max_message_timeout_s,
                "message_timeout_s: must be positive and <= max_message_timeout_s",
            ),
            (self.max_delegation_depth >= 0, "max_delegation_depth: must be 0 or more"),
            (0 <= self.reload_poll_s <= 3600, "reload_poll_s: must be within 0..3600 (0 = off)"),
            (self.idempotency_ttl_s > 0, "idempotency_ttl_s: must be positive"),
            (0.5 <= self.lease_s <= 600, "lease_s: must be within 0.5..600"),
        )
        for holds, message in checks:
            if not holds:
                raise SettingsError(message)

    def _check_rules(self) -> None:
        for rule in self.mask:
            try:
                parse_mask_rule(rule)
            except ConfigError as e:
                raise SettingsError(f"mask: {e}") from None

    def _check_paths(self) -> None:
        for domain, bundle in self.trust_bundles:
            if not Path(bundle).is_file():
                raise SettingsError(f"trust_bundles: {bundle} (for {domain}) is not a file")
        if self.limits_file is not None and not Path(self.limits_file).is_file():
            raise SettingsError(f"limits_file: {self.limits_file} is not a file")
        if not Path(self.agents_file).is_file():
            raise SettingsError(f"agents_file: {self.agents_file} is not a file")
        for name in ("schemas_dir", "policies_dir"):
            path = getattr(self, name)
            if not Path(path).is_dir():
                raise SettingsError(f"{name}: {path} is not a directory")

    @property
    def db_path(self) -> Path:
        """The SQLite database file inside the state directory."""
        return Path(self.state_dir) / "gateway.db"

    @property
    def store_target(self) -> str | Path:
        """What ``open_store`` opens: ``store`` if set, else ``db_path``."""
        return self.store or self.db_path

    @property
    def effective_keys_file(self) -> Path:
        """The API keys file: ``--keys`` or ``<state-dir>/keys.json``."""
        return Path(self.keys_file) if self.keys_file else Path(self.state_dir) / "keys.json"

    @property
    def effective_secrets_file(self) -> Path:
        """The secrets file: ``--secrets`` or ``<state-dir>/secrets.json``."""
        if self.secrets_file:
            return Path(self.secrets_file)
        return Path(self.state_dir) / "secrets.json"

    # -- sections

    @property
    def bundle(self) -> BundleSettings:
        """The files and the reload poll (the reloader's section)."""
        return BundleSettings(
            agents_file=Path(self.agents_file),
            schemas_dir=Path(self.schemas_dir),
            policies_dir=Path(self.policies_dir),
            reload_poll_s=self.reload_poll_s,
            limits_file=Path(self.limits_file) if self.limits_file is not None else None,
        )

    @property
    def monitor(self) -> MonitorSettings:
        """The monitor's intervals and the watchdog's window."""
        return MonitorSettings(
            probe_interval_s=self.probe_interval_s,
            watchdog_window_s=self.watchdog_window_s,
            orphan_scan_interval_s=self.orphan_scan_interval_s,
            orphan_grace_s=self.orphan_grace_s,
        )

    @property
    def recovery(self) -> RecoverySettings:
        """Restart recovery's retry budget."""
        return RecoverySettings(max_attempts=self.max_attempts)

    @property
    def identity(self) -> IdentitySettings:
        """What agent identities (JWT-SVIDs) are minted and trusted with."""
        return IdentitySettings(
            trust_domain=self.trust_domain,
            audience=self.svid_audience,
            ttl_s=self.svid_ttl_s,
            bundles=self.trust_bundles,
        )

    @property
    def messages(self) -> MessageSettings:
        """The message router's timeouts and delegation depth limit."""
        return MessageSettings(
            timeout_s=self.message_timeout_s,
            max_timeout_s=self.max_message_timeout_s,
            max_delegation_depth=self.max_delegation_depth,
        )

    @property
    def containers(self) -> ContainerSettings:
        """The container backend's networks and workers, and the router's container limits."""
        return ContainerSettings(
            internal_network=self.network,
            egress_network=self.egress_network,
            docker_workers=self.docker_workers,
            ttl_grace_s=self.container_ttl_grace_s,
            max_running=self.max_running_containers,
            secrets_file=self.effective_secrets_file,
            backend=self.backend,
        )


def env_int(name: str, default: int) -> int:
    """An integer from the environment, failing with the variable's name when malformed."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} is not an integer") from None
