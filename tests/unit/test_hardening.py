"""Network flags the hub refuses, and a host firewall that cannot be set up is an error.

The rules themselves are checked against the real iptables and Docker engine in
tests/integration/test_hardening_docker.py.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from gateway.containers import firewall
from gateway.containers.docker import check_network
from gateway.errors import AgentUnavailable

GOOD: dict[str, Any] = {
    "Name": "agw-net",
    "Id": "0123456789abcdef" * 4,
    "Driver": "bridge",
    "Internal": True,
    "EnableIPv6": False,
    "Options": {"com.docker.network.bridge.enable_icc": "false"},
}


def test_a_network_with_the_right_flags_is_accepted() -> None:
    check_network(GOOD, internal=True)
    check_network({**GOOD, "Internal": False}, internal=False)  # the egress network


@pytest.mark.parametrize(
    ("change", "internal", "message"),
    [
        ({"Internal": False}, True, r"network 'agw-net' is not internal \(Internal=false\)"),
        ({"Options": {}}, True, r"'agw-net' allows .*enable_icc=unset, i.e. true"),
        (
            {"Options": {"com.docker.network.bridge.enable_icc": "true"}},
            False,
            r"'agw-net' allows inter-container traffic .*enable_icc=true",
        ),
        ({"Driver": "macvlan"}, True, r"'agw-net' has driver 'macvlan'"),
        ({"EnableIPv6": True}, True, r"'agw-net' has IPv6 enabled"),
    ],
)
def test_a_network_with_wrong_flags_is_refused(
    change: dict[str, Any], internal: bool, message: str
) -> None:
    with pytest.raises(AgentUnavailable, match=message) as e:
        check_network({**GOOD, **change}, internal=internal)
    assert "docker network rm agw-net" in e.value.message


def test_the_bridge_is_named_as_docker_names_it() -> None:
    assert firewall.bridge_interface(GOOD) == "br-0123456789ab"
    named = {**GOOD, "Options": {"com.docker.network.bridge.name": "agw0"}}
    assert firewall.bridge_interface(named) == "agw0"


def test_a_missing_iptables_is_an_error_not_a_skip() -> None:
    ipt = firewall.Iptables("agw-no-such-iptables")
    with pytest.raises(AgentUnavailable, match="'agw-no-such-iptables' is not installed"):
        firewall.install(["br-x"], "10.0.0.1", 8080, ipt=ipt)


def test_a_failing_iptables_is_an_error_with_its_reason(tmp_path: Path) -> None:
    fake = tmp_path / "iptables"
    fake.write_text("#!/bin/sh\necho 'Permission denied (you must be root)' >&2\nexit 4\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(AgentUnavailable, match=r"exit 4\): Permission denied") as e:
        firewall.install(["br-x"], "10.0.0.1", 8080, ipt=firewall.Iptables(str(fake)))
    assert e.value.message.startswith("host firewall: ")


def test_an_unexpected_check_failure_is_not_read_as_absent(tmp_path: Path) -> None:
    """``-C`` failing for another reason than "no such rule" must not lead to an insert."""
    fake = tmp_path / "iptables"
    log = tmp_path / "calls"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$3" in -C) echo "iptables: Permission denied." >&2; exit 1;; esac\n'
        "exit 0\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(AgentUnavailable, match="Permission denied"):
        firewall.install(["br-x"], "10.0.0.1", 8080, ipt=firewall.Iptables(str(fake)))
    assert not [c for c in log.read_text().splitlines() if " -I " in f" {c} "]
