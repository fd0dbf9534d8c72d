"""What API authorization (policies/api.rego) adds to a request, measured in one run.

1. In-process, on the event-loop thread as the hub runs it: ``ApiAuthorizer.authorize`` for
   an allowed read with its decision record, an allowed read with ``--no-log-api-reads``, a
   denial (always recorded), and the policy evaluation alone; µs per call, median and p99.
2. Over HTTP, one request at a time, the same aiohttp client against one hub: ``GET
   /v1/agents/echo`` (authorized by policy, the record written) against a route that runs the
   same handler body behind authentication only (``/bench/agents/echo``, added to the app by
   this bench and nowhere else). The clock covers the whole request in both, so the
   difference is what authorization costs a caller.

    .venv/bin/python bench/bench_api.py [N]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import ClientSession, web

from bench._stats import report, summary
from gateway.errors import Forbidden
from gateway.http.app import create_app
from gateway.http.appkeys import HUB
from gateway.http.middlewares import authenticate
from gateway.identity.apikeys import KeyStore
from gateway.policy.engine import API_QUERY
from gateway.routers.access import ApiCall, subject_input
from gateway.settings import REPO_ROOT, Settings
from tests.conftest import FakeBackend

N = int(sys.argv[1]) if len(sys.argv) > 1 else 5000


async def bare_agent(request: web.Request) -> web.Response:
    """The body of ``GET /v1/agents/{name}`` behind authentication only (the baseline)."""
    hub = request.app[HUB]
    authenticate(request)
    agent = hub.config.registry.get(request.match_info["name"])
    return web.json_response({"revision": hub.config.registry_revision, **agent.to_json()})


async def time_calls(make: Any, n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        await make()
        samples.append((time.perf_counter_ns() - start) / 1000)
    return summary(samples)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys = KeyStore.load(root / "keys.json")
        user = keys.create("alice", ["user"])
        settings = Settings(
            state_dir=root / "state",
            keys_file=root / "keys.json",
            agents_file=REPO_ROOT / "agents.yaml",
            schemas_dir=REPO_ROOT / "schemas",
            policies_dir=REPO_ROOT / "policies",
            reload_poll_s=0,
            probe_interval_s=0,
        )
        app = create_app(settings, backend=FakeBackend())
        app.router.add_get("/bench/agents/{name}", bare_agent)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        hub = app[HUB]
        subject = hub.keys.authenticate(user)
        read = ApiCall("GET", "/v1/agents/{name}", {"name": "echo"})
        denied = ApiCall("GET", "/v1/status")
        resource = {"kind": "agent", "name": "echo"}
        policy_input = {
            "subject": subject_input(subject),
            "request": read.to_json(),
            "resource": resource,
        }
        figures: dict[str, Any] = {}

        async def evaluate() -> None:
            hub.config.policy.evaluate(API_QUERY, policy_input)

        async def allowed() -> None:
            await hub.access.authorize(subject, read, resource)

        async def refused() -> None:
            try:
                await hub.access.authorize(subject, denied)
            except Forbidden:
                return
            raise AssertionError("the status call should be denied for a user")

        for _ in range(300):
            await allowed()
        figures["policy_evaluation_us"] = await time_calls(evaluate, N)
        figures["authorize_read_logged_us"] = await time_calls(allowed, N)
        figures["authorize_denial_logged_us"] = await time_calls(refused, N)
        hub.access.log_reads = False
        figures["authorize_read_not_logged_us"] = await time_calls(allowed, N)
        hub.access.log_reads = True

        headers = {"Authorization": f"Bearer {user}"}
        base = f"http://127.0.0.1:{port}"
        async with ClientSession() as session:

            async def get(path: str) -> None:
                async with session.get(base + path, headers=headers) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status

            for path in ("/v1/agents/echo", "/bench/agents/echo"):
                for _ in range(200):
                    await get(path)
            # Interleaved, so drift on a shared machine hits both sides alike.
            with_policy, bare = [], []
            for _ in range(N // 2):
                for path, into in (("/v1/agents/echo", with_policy), ("/bench/agents/echo", bare)):
                    start = time.perf_counter_ns()
                    await get(path)
                    into.append((time.perf_counter_ns() - start) / 1000)
        a, b = summary(with_policy), summary(bare)
        figures["http_get_agent_authorized_us"] = a
        figures["http_get_agent_authenticated_only_us"] = b
        figures["http_added_us_median"] = round(a["median"] - b["median"], 1)
        figures["http_ratio_median"] = round(a["median"] / b["median"], 3)
        report("API authorization (policies/api.rego)", figures)
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
