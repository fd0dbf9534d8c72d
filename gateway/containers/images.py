"""Build the example agent images from ``examples/agents/*/Dockerfile``.

The build context is the repository root so each image can copy the agent SDK; the base
image is a build argument, so the images build from a locally made base when no registry
can be reached. The context also holds the host's CA bundle as ``.host-ca.crt``: a build
container does not trust the certificate authority the host trusts for the package index,
and without BuildKit (no ``--secret``) a build stage that runs pip must copy it in
(``examples/agents/files`` does; the CA bundle is public data, and only that build stage
sees it).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import IO

import docker
import docker.errors
import docker.utils

from gateway.errors import AgentUnavailable
from gateway.settings import DEFAULT_BASE_IMAGE, REPO_ROOT


def example_agents(root: Path = REPO_ROOT) -> list[str]:
    """Names of the example agents (directories with a Dockerfile)."""
    return sorted(p.parent.name for p in (root / "examples" / "agents").glob("*/Dockerfile"))


HOST_CA_BUNDLE = Path(
    os.environ.get("AGENT_GATEWAY_BUILD_CA", "/etc/ssl/certs/ca-certificates.crt")
)
CA_IN_CONTEXT = ".host-ca.crt"


def build_context(root: Path, ca_bundle: Path = HOST_CA_BUNDLE) -> IO[bytes]:
    """The repository as a tar build context (``.dockerignore`` applied) plus the CA bundle
    (empty when the host has none) as ``.host-ca.crt``."""
    ignore = root / ".dockerignore"
    exclude = None
    if ignore.exists():
        lines = (line.strip() for line in ignore.read_text().splitlines())
        exclude = [line for line in lines if line and not line.startswith("#")]
    context: IO[bytes] = docker.utils.tar(str(root), exclude=exclude)
    try:
        ca = ca_bundle.read_bytes()
    except OSError:
        ca = b""
    context.seek(0)
    with tarfile.open(fileobj=context, mode="a") as tar:
        info = tarfile.TarInfo(CA_IN_CONTEXT)
        info.size = len(ca)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(ca))
    return context


def build_examples(
    *,
    root: Path = REPO_ROOT,
    base_image: str = DEFAULT_BASE_IMAGE,
    prefix: str = "agent-gateway/",
    tag: str = "dev",
    names: list[str] | None = None,
) -> dict[str, str]:
    """Build each example agent as ``<prefix><name>:<tag>``; return name -> image id."""
    client = docker.from_env(version="auto")
    built: dict[str, str] = {}
    context = build_context(root)
    try:
        for name in names or example_agents(root):
            ref = f"{prefix}{name}:{tag}"
            context.seek(0)
            try:
                image, _ = client.images.build(
                    fileobj=context,
                    custom_context=True,
                    dockerfile=f"examples/agents/{name}/Dockerfile",
                    buildargs={"BASE_IMAGE": base_image},
                    tag=ref,
                    rm=True,
                    forcerm=True,
                    pull=False,
                    labels={"io.agent-gateway.example": name},
                )
            except docker.errors.BuildError as e:
                tail = "".join(str(c.get("stream", c.get("error", ""))) for c in e.build_log)[
                    -2000:
                ]
                raise AgentUnavailable(f"building {ref} failed: {e.msg}\n{tail}") from e
            except docker.errors.APIError as e:
                raise AgentUnavailable(f"building {ref} failed: {e.explanation or e}") from e
            built[name] = image.id
    finally:
        context.close()
        client.close()
    return built
