"""Revisions of files inside and outside a git checkout."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from gateway.bundle import revision
from gateway.bundle.revision import Revision, content_hash, revision_of
from tests.conftest import git

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@pytest.fixture(autouse=True)
def _isolated_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Keep the developer's git config and any enclosing checkout out of the tests.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))


def make_policies(root: Path) -> Path:
    policies = root / "policies"
    (policies / "sub").mkdir(parents=True)
    (policies / "a.rego").write_text("package a\n")
    (policies / "sub" / "b.rego").write_text("package b\n")
    return policies


def test_revision_follows_commits_and_edits(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    policies = make_policies(repo)
    (repo / "README").write_text("x\n")
    git(repo, "init", "-q")

    fresh = revision_of([policies])
    assert (fresh.commit, fresh.dirty, fresh.in_git) == (None, True, True)
    assert str(fresh).startswith("uncommitted+sha256:")

    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one")
    first_sha = git(repo, "rev-parse", "HEAD")
    clean = revision_of([policies])
    assert clean == Revision(first_sha, fresh.content_hash, False, True)
    assert str(clean) == f"{first_sha[:12]}+sha256:{clean.content_hash[:12]}"

    # A commit elsewhere in the repository is not a policy revision.
    (repo / "README").write_text("y\n")
    git(repo, "commit", "-q", "-am", "docs")
    assert revision_of([policies]).commit == first_sha

    (policies / "a.rego").write_text("package a\n\nallow := true\n")
    edited = revision_of([policies], repo_root=repo)
    assert edited.commit == first_sha
    assert edited.dirty
    assert edited.content_hash != clean.content_hash
    assert str(edited) == f"{first_sha[:12]}-dirty+sha256:{edited.content_hash[:12]}"

    git(repo, "commit", "-q", "-am", "two")
    second = revision_of([policies])
    assert second.commit == git(repo, "rev-parse", "HEAD") != first_sha
    assert not second.dirty
    assert second.content_hash == edited.content_hash

    (policies / "sub" / "new.rego").write_text("package n\n")  # untracked
    assert revision_of([policies]).dirty


def test_revision_outside_git(tmp_path: Path) -> None:
    policies = make_policies(tmp_path)
    rev = revision_of([policies])
    assert (rev.commit, rev.dirty, rev.in_git) == (None, False, False)
    assert str(rev) == f"nogit+sha256:{rev.content_hash[:12]}"
    assert rev.to_json()["revision"] == str(rev)


def test_revision_without_git_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    policies = make_policies(repo)
    git(repo, "init", "-q")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert str(revision_of([policies])).startswith("nogit+sha256:")


def test_a_hanging_git_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "git"
    # Not exec: the sleeping grandchild keeps the pipe open unless its group is killed.
    fake.write_text(f"#!/bin/sh\n{shutil.which('sleep')} 30\necho done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(revision, "GIT_TIMEOUT_S", 0.2)
    policies = make_policies(tmp_path / "x")
    start = time.monotonic()
    assert revision_of([policies]).in_git is False
    assert time.monotonic() - start < 5


def test_content_hash_ignores_location_caches_and_dotfiles(tmp_path: Path) -> None:
    one = make_policies(tmp_path / "one")
    two = make_policies(tmp_path / "two")
    assert content_hash([one]) == content_hash([two])
    (two / "__pycache__").mkdir()
    (two / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (two / ".swp").write_text("junk")
    (two / ".hidden").mkdir()
    (two / ".hidden" / "c.rego").write_text("package c\n")
    assert content_hash([one]) == content_hash([two])


@pytest.mark.parametrize(
    "change",
    [
        lambda p: (p / "a.rego").write_text("package a\n# edit\n"),
        lambda p: (p / "a.rego").rename(p / "c.rego"),
        lambda p: (p / "sub" / "b.rego").unlink(),
        lambda p: (p / "sub" / "extra.json").write_text("{}"),
    ],
    ids=["edit", "rename", "delete", "add"],
)
def test_content_hash_sees_every_change(tmp_path: Path, change: object) -> None:
    policies = make_policies(tmp_path)
    before = content_hash([policies])
    change(policies)  # type: ignore[operator]
    assert content_hash([policies]) != before


def test_content_hash_of_several_paths_and_single_files(tmp_path: Path) -> None:
    policies = make_policies(tmp_path)
    agents = tmp_path / "agents.yaml"
    agents.write_text("agents: []\n")
    both = content_hash([policies, agents])
    assert both == content_hash([agents, policies])
    assert both != content_hash([policies])
