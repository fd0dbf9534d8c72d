"""An HTTP client in a process of its own, for benchmarks that compare the hub with a direct
call: the client's CPU and GIL are then not the hub's, as for a real caller, and both sides
of a comparison are timed by the same client in the same way.

The child runs aiohttp's ``ClientSession`` (one per child, connections kept alive) on its
own event loop and times each ``POST`` with ``perf_counter`` from just before the request
to the parsed JSON answer; the pipe to and from the parent is outside the clock.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any


class ProcessClient:
    """``await post(url, body, headers)`` -> (elapsed s, status, JSON answer), one at a time."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); from bench._client import child; child()",
            str(_repo()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )

    async def post(
        self, url: str, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[float, int, Any]:
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        async with self._lock:
            line = json.dumps({"url": url, "body": body, "headers": headers or {}})
            self._proc.stdin.write(line.encode() + b"\n")
            await self._proc.stdin.drain()
            answer = await self._proc.stdout.readline()
        if not answer:
            raise SystemExit("the client process died")
        out = json.loads(answer)
        return out["elapsed"], out["status"], out["body"]

    async def close(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
            await self._proc.wait()


def _repo() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent)


def child() -> None:
    """The child's side: one request per line of stdin, one answer per line of stdout."""
    import time

    import aiohttp

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        async with aiohttp.ClientSession() as http:
            while line := await reader.readline():
                ask = json.loads(line)
                start = time.perf_counter()
                async with http.post(ask["url"], json=ask["body"], headers=ask["headers"]) as r:
                    body = await r.json()
                elapsed = time.perf_counter() - start
                out = {"elapsed": elapsed, "status": r.status, "body": body}
                sys.stdout.write(json.dumps(out) + "\n")
                sys.stdout.flush()

    asyncio.run(serve())
