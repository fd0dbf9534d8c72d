"""Host firewall rules that keep agent containers away from the host's other services.

Docker isolates an internal network from the outside (FORWARD chain) but not from the host:
a container can connect to the bridge's gateway address, or any other address of the host,
on every port where something listens. The hub therefore jumps from the INPUT chain to a
chain of its own for traffic arriving on each agent network's bridge interface::

    -A INPUT -i <bridge> -j AGENT-GATEWAY-INPUT                      (one per bridge)
    -A AGENT-GATEWAY-INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    -A AGENT-GATEWAY-INPUT -i <bridge> -d <hub address> -p tcp --dport <hub port> -j ACCEPT
    -A AGENT-GATEWAY-INPUT -j DROP

Accept rules are inserted after the first rule and DROP is appended, so with several hubs
(or networks) sharing the chain every accept stays ahead of the DROP. Installing is
idempotent and never deletes another hub's rules; rules for bridges that no longer exist
(their network was removed) are pruned. A missing or failing ``iptables`` is an error, never
skipped: the hub then starts degraded with the reason and dispatches nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.errors import AgentUnavailable

CHAIN = "AGENT-GATEWAY-INPUT"
COMMENT = ["-m", "comment", "--comment", "agent-gateway"]
ESTABLISHED = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", *COMMENT, "-j", "ACCEPT"]
DROP = [*COMMENT, "-j", "DROP"]
LOCK_FILE = Path("/run/lock/agent-gateway-iptables.lock")
SYS_NET = Path("/sys/class/net")
_thread_lock = threading.Lock()


class Iptables:
    """``iptables`` run as a subprocess; every failure is an AgentUnavailable naming the call."""

    def __init__(self, binary: str = "iptables", timeout_s: float = 30.0) -> None:
        self.binary = binary
        self.timeout_s = timeout_s

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        path = shutil.which(self.binary)
        if path is None:
            raise AgentUnavailable(
                f"host firewall: {self.binary!r} is not installed; the hub needs it to keep "
                "agent containers from the host's other services (apt-get install iptables)"
            )
        # -w: wait for the xtables lock that dockerd and other hubs also take.
        cmd = [path, "-w", "10", *args]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=self.timeout_s, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AgentUnavailable(f"host firewall: {shlex.join(cmd)} failed: {e}") from e
        if check and done.returncode != 0:
            raise AgentUnavailable(
                f"host firewall: {shlex.join(cmd)} failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}"
            )
        return done

    def has(self, chain: str, rule: list[str]) -> bool:
        done = self.run("-C", chain, *rule, check=False)
        if done.returncode == 0:
            return True
        # -C exits 1 when the rule is absent; anything else (no permission, bad arguments)
        # must not read as "absent" and be glossed over.
        if done.returncode == 1 and "does a matching rule exist" in done.stderr:
            return False
        self.run("-C", chain, *rule)  # raises with the reason
        return True

    def rules(self, chain: str) -> list[list[str]]:
        """The chain's rules as ``-S`` prints them, split into arguments (without ``-A``)."""
        out = self.run("-S", chain).stdout
        return [shlex.split(line)[2:] for line in out.splitlines() if line.startswith("-A ")]


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise check-then-insert sequences across threads and hub processes."""
    with _thread_lock:
        try:
            LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
            handle = open(LOCK_FILE, "a")  # noqa: SIM115 - held for the block
        except OSError:
            # No writable /run/lock: iptables -w still serialises each call; the worst case
            # of a race between two hubs is a duplicate rule, which is harmless.
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


def accept_rule(bridge: str, address: str, port: int) -> list[str]:
    """The rule that lets a bridge's containers reach the hub's agent listener."""
    return ["-i", bridge, "-d", address, "-p", "tcp", "--dport", str(port), *COMMENT]


def _interface(rule: list[str]) -> str | None:
    return rule[rule.index("-i") + 1] if "-i" in rule[:-1] else None


def install(bridges: list[str], address: str, port: int, *, ipt: Iptables) -> None:
    """Make sure traffic from ``bridges`` to the host reaches only ``address:port`` (TCP)."""
    with _locked():
        if ipt.run("-S", CHAIN, check=False).returncode != 0:
            ipt.run("-N", CHAIN)
        _prune(ipt)
        if not ipt.has(CHAIN, ESTABLISHED):
            ipt.run("-I", CHAIN, "1", *ESTABLISHED)
        for bridge in bridges:
            rule = [*accept_rule(bridge, address, port), "-j", "ACCEPT"]
            if not ipt.has(CHAIN, rule):
                ipt.run("-I", CHAIN, "2", *rule)
        if not ipt.has(CHAIN, DROP):
            ipt.run("-A", CHAIN, *DROP)
        for bridge in bridges:
            # First in INPUT, ahead of any host rule that would accept the traffic.
            jump = ["-i", bridge, *COMMENT, "-j", CHAIN]
            if not ipt.has("INPUT", jump):
                ipt.run("-I", "INPUT", "1", *jump)


def remove(bridges: list[str], *, ipt: Iptables) -> None:
    """Delete the jumps and accept rules of ``bridges`` (the shared rules stay)."""
    with _locked():
        _delete_where(ipt, lambda iface: iface in bridges)


def _prune(ipt: Iptables) -> None:
    # A removed network's bridge is gone for good (a new network gets a new name), so its
    # rules help nobody; rules of bridges that exist are left alone, whoever made them.
    _delete_where(ipt, lambda iface: not (SYS_NET / iface).exists())


def _delete_where(ipt: Iptables, doomed: Callable[[str], bool]) -> None:
    for rule in ipt.rules("INPUT"):
        iface = _interface(rule)
        if iface and rule[-2:] == ["-j", CHAIN] and doomed(iface):
            ipt.run("-D", "INPUT", *rule)
    if ipt.run("-S", CHAIN, check=False).returncode != 0:
        return
    for rule in ipt.rules(CHAIN):
        iface = _interface(rule)
        if iface and doomed(iface):
            ipt.run("-D", CHAIN, *rule)


def bridge_interface(network: dict[str, object]) -> str:
    """The host interface of a bridge network, as Docker names it."""
    options = network.get("Options") or {}
    assert isinstance(options, dict)
    name = options.get("com.docker.network.bridge.name")
    return str(name) if name else f"br-{str(network['Id'])[:12]}"


def interface_exists(name: str) -> bool:
    """Whether the host has a network interface of that name."""
    return os.path.exists(SYS_NET / name)
