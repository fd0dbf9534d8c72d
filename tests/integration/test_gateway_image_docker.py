"""The gateway's own image (the top-level Dockerfile), built and run as documented.

The image is built from the locally made base image (no registry), with the host's CA
bundle in the context for the build stage's pip; the hub then runs in a container on the
host's network namespace with the engine's socket, as the Dockerfile's header says, and
runs an echo task in an agent container it starts itself. The build context holds only
the files the Dockerfile copies, so a change elsewhere in the tree does not invalidate the
cached layers, and the parent layers are kept when the image is removed (the next run's
build cache).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import socket
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from gateway.containers.backend import LABEL_HUB
from gateway.containers.images import CA_IN_CONTEXT, HOST_CA_BUNDLE
from gateway.settings import DEFAULT_BASE_IMAGE
from tests.conftest import REPO
from tests.integration.conftest import RUN_ID, build_image, cleanup_hub, registry_file

pytestmark = pytest.mark.docker

# What the Dockerfile copies (COPY . /src only needs the project's sources and metadata).
CONTEXT = (
    "Dockerfile",
    "pyproject.toml",
    "README.md",
    "agents.yaml",
    "limits.yaml",
    "schemas",
    "policies",
    "gateway",
)


def image_context() -> io.BytesIO:
    """A tar build context of ``CONTEXT`` plus the host's CA bundle as ``.host-ca.crt``."""
    buf = io.BytesIO()

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if "__pycache__" in info.name or info.name.endswith(".pyc"):
            return None
        # Owner and times out of the context: the layer cache keys on content and mode.
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in CONTEXT:
            tar.add(REPO / name, arcname=name, filter=clean)
        try:
            ca = HOST_CA_BUNDLE.read_bytes()
        except OSError:
            ca = b""
        info = tarfile.TarInfo(CA_IN_CONTEXT)
        info.size, info.mode = len(ca), 0o644
        tar.addfile(info, io.BytesIO(ca))
    buf.seek(0)
    return buf


@pytest.fixture(scope="module")
def gateway_image(docker_api: docker.APIClient) -> Iterator[str]:
    """``agent-gateway:test-<run>`` built from the Dockerfile; removed after (parents kept)."""
    base = os.environ.get("AGENT_GATEWAY_BASE_IMAGE", DEFAULT_BASE_IMAGE)
    try:
        docker_api.inspect_image(base)
    except docker.errors.ImageNotFound:
        pytest.fail(f"base image {base} is missing: run scripts/build-base-image.sh", pytrace=False)
    ref = f"agent-gateway:test-{RUN_ID}"
    try:
        build_image(image_context(), ref, base, timeout_s=900)
        yield ref
    finally:
        with contextlib.suppress(docker.errors.APIError):
            docker_api.remove_image(ref, force=True, noprune=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    """One JSON request; (status, decoded body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_ready(api: docker.APIClient, container: str, url: str, within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    last: object = None
    while time.monotonic() < deadline:
        state = api.inspect_container(container)["State"]
        if not state["Running"]:
            break
        try:
            status, last = http("GET", f"{url}/readyz")
            if status == 200:
                return
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError) as e:
            last = e
        time.sleep(0.5)
    logs = api.logs(container, tail=40).decode(errors="replace")
    pytest.fail(f"hub container not ready ({last!r}); its log:\n{logs}", pytrace=False)


def exec_in(api: docker.APIClient, container: str, cmd: list[str]) -> str:
    """Run ``cmd`` in the container; its stdout (fails the test on a non-zero exit)."""
    run = api.exec_create(container, cmd, stdout=True, stderr=False)
    out = api.exec_start(run["Id"]).decode()
    code = api.exec_inspect(run["Id"])["ExitCode"]
    assert code == 0, f"{cmd} exited {code}: {out}"
    return out


def test_image_runs_a_task(
    gateway_image: str,
    agent_images: dict[str, str],
    docker_api: docker.APIClient,
    tmp_path: Path,
) -> None:
    hub_id = f"test-{RUN_ID}-image-{secrets.token_hex(2)}"
    networks = [
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-int",
        f"agw-{RUN_ID}-{secrets.token_hex(2)}-egr",
    ]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    agents = registry_file(tmp_path, agent_images)
    agents.chmod(0o644)
    sock = "/var/run/docker.sock"
    name = f"agw-hub-{hub_id}"
    container = docker_api.create_container(
        gateway_image,
        name=name,
        # The image's entrypoint is agent-gateway; the defaults swapped for this test's
        # port, networks, hub id and agent images.
        command=[
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--hub-id",
            hub_id,
            "--network",
            networks[0],
            "--egress-network",
            networks[1],
            "--agents",
            "/config/agents.yaml",
            "--schemas",
            "/app/schemas",
            "--policies",
            "/app/policies",
            "--limits",
            "/app/limits.yaml",
        ],
        host_config=docker_api.create_host_config(
            network_mode="host",
            cap_add=["NET_ADMIN", "NET_RAW"],
            group_add=[str(os.stat(sock).st_gid)],
            binds={
                sock: {"bind": sock, "mode": "rw"},
                str(agents): {"bind": "/config/agents.yaml", "mode": "ro"},
            },
        ),
    )
    try:
        docker_api.start(container["Id"])
        wait_ready(docker_api, container["Id"], url)
        # Non-root, as the image says, yet it set up the host firewall for its bridges.
        assert exec_in(docker_api, container["Id"], ["id", "-u"]).strip() == "10001"
        key = exec_in(
            docker_api,
            container["Id"],
            ["agent-gateway", "keys", "create", "--subject", "alice", "--roles", "user"],
        ).strip()
        assert key, "keys create printed no key"

        # The keys file is re-read by mtime at most once a second.
        deadline = time.monotonic() + 10
        while True:
            status, body = http(
                "POST",
                f"{url}/v1/tasks?wait=30",
                {"capability": "debug.echo", "input": {"msg": "from the image"}},
                key,
            )
            if status != 401 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status == 200, body
        assert body["state"] == "succeeded", body
        assert body["result"] == {"echo": {"msg": "from the image"}, "agent": "echo"}
        status, fetched = http("GET", f"{url}/v1/tasks/{body['task_id']}", key=key)
        assert status == 200 and fetched["result"] == body["result"], fetched

        # The agent container it started is gone again.
        deadline = time.monotonic() + 15
        while docker_api.containers(all=True, filters={"label": [f"{LABEL_HUB}={hub_id}"]}):
            assert time.monotonic() < deadline, "the hub's agent container was not removed"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(docker.errors.APIError):
            docker_api.remove_container(container["Id"], force=True, v=True)
        cleanup_hub(docker_api, hub_id, networks)
