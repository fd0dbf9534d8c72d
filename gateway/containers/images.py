"""Build the example agent images from ``examples/agents/*/Dockerfile``.

The build context is the repository root so each image can copy the agent SDK; the base
image is a build argument, so the images build from a locally made base when no registry
can be reached.
"""

from __future__ import annotations

from pathlib import Path

import docker
import docker.errors

from gateway.errors import AgentUnavailable
from gateway.settings import DEFAULT_BASE_IMAGE, REPO_ROOT


def example_agents(root: Path = REPO_ROOT) -> list[str]:
    """Names of the example agents (directories with a Dockerfile)."""
    return sorted(p.parent.name for p in (root / "examples" / "agents").glob("*/Dockerfile"))


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
    try:
        for name in names or example_agents(root):
            ref = f"{prefix}{name}:{tag}"
            try:
                image, _ = client.images.build(
                    path=str(root),
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
        client.close()
    return built
