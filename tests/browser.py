"""A small driver for headless Chromium over the Chrome DevTools Protocol (CDP).

Chromium is started with ``--remote-debugging-port=0`` and a fresh profile; the port it
picked is read from ``DevToolsActivePort`` in that profile, and the browser is driven over
one websocket (aiohttp) with flattened sessions. Clicks and typing are real input events
(``Input.dispatchMouseEvent`` / ``Input.insertText``), not DOM calls.

This replaces Selenium + chromedriver: it needs nothing but Debian's ``chromium`` package
and aiohttp, and it is asyncio all the way, like the hub under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--window-size=1280,1000",
    "--remote-debugging-port=0",
    "--remote-debugging-address=127.0.0.1",
]


def find_chromium() -> str | None:
    """The Chromium binary: $CHROMIUM, else ``chromium`` or ``chromium-browser`` on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


class CDPError(Exception):
    """A CDP command failed, or a page condition was not met in time."""


class Page:
    """One tab, driven through its CDP session."""

    def __init__(self, browser: Browser, session_id: str) -> None:
        self.browser = browser
        self.session_id = session_id

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self.browser.send(method, params, session_id=self.session_id)

    async def eval(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its (JSON) value; awaits promises."""
        reply = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"{expression!r} raised: {text}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 10.0) -> Any:
        """Poll until ``expression`` is truthy; return its value."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise CDPError(f"timed out waiting for {expression}")
            await asyncio.sleep(0.05)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("document.readyState === 'complete' && document.body !== null")

    async def click(self, selector: str) -> None:
        """A real left click in the middle of the first element matching ``selector``."""
        where = await self.eval(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return null;
                el.scrollIntoView({{block: "center"}});
                const r = el.getBoundingClientRect();
                return [r.x + r.width / 2, r.y + r.height / 2, r.width * r.height];
            }})()"""
        )
        if not where or not where[2]:
            raise CDPError(f"nothing visible to click at {selector}")
        x, y, _ = where
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    async def type(self, selector: str, text: str) -> None:
        """Focus the field (by clicking it), clear it, and type ``text``."""
        await self.click(selector)
        await self.eval(f"document.querySelector({json.dumps(selector)}).select?.()")
        await self.send("Input.insertText", {"text": text})

    async def select(self, selector: str, value: str) -> None:
        """Choose an option (a headless select has no native popup to click)."""
        await self.eval(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                el.value = {json.dumps(value)};
                el.dispatchEvent(new Event("change", {{bubbles: true}}));
            }})()"""
        )

    async def text(self, selector: str) -> str:
        """The visible text of the first match ('' when absent)."""
        value = await self.eval(f"document.querySelector({json.dumps(selector)})?.innerText ?? ''")
        return str(value)

    async def visible(self, selector: str) -> bool:
        return bool(
            await self.eval(
                f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
                " return !!el && !el.closest('[hidden]') && el.offsetParent !== null; })()"
            )
        )

    async def screenshot(self, path: Path) -> None:
        import base64

        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))


class Browser:
    """A headless Chromium and the websocket to it."""

    def __init__(self, process: asyncio.subprocess.Process, ws: Any, session: Any) -> None:
        self.process = process
        self.ws = ws
        self.session = session
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is None or future.done():
                continue  # an event: not needed by these tests
            if "error" in data:
                future.set_exception(CDPError(f"{data['error'].get('message')}"))
            else:
                future.set_result(data.get("result", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CDPError("the browser closed the connection"))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, session_id: str | None = None
    ) -> Any:
        """Send one CDP command and wait (10 s at most) for its result."""
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self.ws.send_str(json.dumps(message))
        async with asyncio.timeout(10):
            return await future

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page


@contextlib.asynccontextmanager
async def launch(binary: str, profile: Path, *, timeout_s: float = 30.0) -> AsyncIterator[Browser]:
    """Start Chromium with an empty profile in ``profile``; stop it (always) afterwards."""
    await asyncio.to_thread(profile.mkdir, parents=True, exist_ok=True)
    log = (profile.parent / "chromium.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        *FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    session = aiohttp.ClientSession()
    browser: Browser | None = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if process.returncode is not None:
                raise CDPError(f"chromium exited with {process.returncode} (see {log.name})")
            if asyncio.get_running_loop().time() > deadline:
                raise CDPError(f"chromium did not start within {timeout_s} s (see {log.name})")
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        ws = await session.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        browser = Browser(process, ws, session)
        yield browser
    finally:
        if browser is not None:
            with contextlib.suppress(Exception):
                await browser.send("Browser.close")
            await browser.ws.close()
            browser._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await browser._reader
        await session.close()
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()
