"""The hub's identity service (gateway.identity.service) and its settings and flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import build_parser
from gateway.errors import ConfigError, InvalidToken, RevokedToken, Unauthorized
from gateway.identity.service import KEY_DIR, AgentIdentities
from gateway.identity.svid import SvidIssuer
from gateway.settings import SettingsError
from tests.conftest import make_settings

TD = "agent-gateway.local"


def make(tmp_path: Path, live: set[str], **kw: object) -> AgentIdentities:
    return AgentIdentities.create(
        tmp_path / "state",
        trust_domain=TD,
        audience="agent-gateway",
        ttl_s=120,
        is_active=live.__contains__,
        **kw,  # type: ignore[arg-type]
    )


def test_mint_verify_renew_revoke(tmp_path: Path) -> None:
    live = {"i1"}
    ids = make(tmp_path, live)
    spiffe_id, env = ids.mint_env("echo", "i1")
    token = env["AGENT_SVID"]

    ident = ids.verify(token)
    renewed = ids.renew(token)

    assert spiffe_id == ident.spiffe_id == f"spiffe://{TD}/agent/echo"
    assert ids.is_local(ident) and ident.instance_id == "i1"
    assert renewed.token != token and ids.verify(renewed.token).instance_id == "i1"
    assert (tmp_path / "state" / KEY_DIR).is_dir()  # the key persists in the state dir
    ids.revoke("i1")
    with pytest.raises(RevokedToken):
        ids.verify(renewed.token)
    with pytest.raises(RevokedToken):
        ids.renew(token)


def test_keys_survive_a_restart(tmp_path: Path) -> None:
    live = {"i1"}
    token = make(tmp_path, live).mint_env("echo", "i1")[1]["AGENT_SVID"]
    assert make(tmp_path, live).verify(token).agent == "echo"


def test_no_token_and_bundle(tmp_path: Path) -> None:
    ids = make(tmp_path, set())
    with pytest.raises(Unauthorized, match="no token"):
        ids.verify(None)
    bundle = ids.bundle()
    assert [k["use"] for k in bundle["keys"]] == ["jwt-svid"]
    assert bundle["spiffe_refresh_hint"] == 60


def test_extra_bundles(tmp_path: Path) -> None:
    partner = SvidIssuer(tmp_path / "partner", "partner.example", "agent-gateway")
    path = tmp_path / "partner.json"
    path.write_text(json.dumps(partner.jwks()))
    ids = make(tmp_path, {"p1"}, bundles=(("partner.example", path),))
    token = partner.mint("planner", "p1").token

    ident = ids.verify(token)

    assert ident.trust_domain == "partner.example" and not ids.is_local(ident)
    with pytest.raises(InvalidToken, match="only tokens this hub issued"):
        ids.renew(token)


def test_bundle_for_our_own_domain_or_broken_is_refused(tmp_path: Path) -> None:
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"keys": []}))
    with pytest.raises(ConfigError, match="own trust domain"):
        make(tmp_path, set(), bundles=((TD, own),))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError) as info:
        make(tmp_path, set(), bundles=(("partner.example", broken),))
    assert str(broken) in (info.value.location or "")


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"svid_ttl_s": 0}, "svid_ttl_s"),
        ({"svid_ttl_s": 4000}, "svid_ttl_s"),
        ({"message_timeout_s": 500}, "message_timeout_s"),
        ({"max_delegation_depth": -1}, "max_delegation_depth"),
        ({"trust_bundles": (("p.example", Path("/nonexistent.json")),)}, "trust_bundles"),
    ],
)
def test_bad_settings_fail_fast_with_their_name(
    tmp_path: Path, overrides: dict[str, object], name: str
) -> None:
    with pytest.raises(SettingsError, match=name):
        make_settings(tmp_path, **overrides)


def test_trust_bundle_flag() -> None:
    args = build_parser().parse_args(
        ["serve", "--trust-domain", "hub.example", "--trust-bundle", "p.example=b.json"]
    )
    assert args.trust_domain == "hub.example"
    assert args.trust_bundle == [("p.example", Path("b.json"))]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--trust-bundle", "no-equals-sign"])
