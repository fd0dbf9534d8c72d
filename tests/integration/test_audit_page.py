"""The auditor's web page in a real headless Chromium (Debian's ``chromium``), against a hub
listening on a real port (fake container backend).

With ``CI=true`` a missing Chromium fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.http.app import HUB, create_app
from tests.browser import Page, find_chromium, launch
from tests.conftest import FakeBackend, make_settings, submit_through_router

CODE_EVAL_DENIAL = 'capability "code.eval" requires one of the roles ["developer"]'
# (key, body, allowed)
SUBMISSIONS = [
    ("user", {"capability": "debug.echo", "input": {"note": "<img id=xss src=x>"}}, True),
    ("user", {"capability": "code.eval", "input": {"expression": "1+1"}}, False),
    ("developer", {"capability": "code.eval", "input": {"expression": "6*7"}}, True),
    ("nobody", {"capability": "debug.echo", "input": {}}, False),
    ("user", {"capability": "code.eval", "input": {"expression": "2+2"}}, False),
]


@pytest.fixture
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        message = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI=true: the page test must run", pytrace=False)
        pytest.skip(message)
    return binary


async def rows(page: Page) -> list[dict[str, str]]:
    value = await page.eval(
        """[...document.querySelectorAll("#decisions tbody tr")].map(tr => ({
            id: tr.dataset.id, verdict: tr.dataset.verdict,
            cells: [...tr.children].map(td => td.innerText)}))"""
    )
    return list(value)


async def sign_in(page: Page, key: str) -> None:
    await page.type("#key", key)
    await page.click("#login-button")


async def test_the_audit_page_in_chromium(
    chromium: str,
    tmp_path: Path,
    keys: dict[str, str],
    aiohttp_server: Any,
    aiohttp_client: Any,
) -> None:
    # Allowed reads unlogged, tasks submitted past the HTTP door: the log holds the five
    # dispatch decisions, then the API denials the page's callers cause.
    settings = make_settings(tmp_path, reload_poll_s=0, log_api_reads=False)
    server = await aiohttp_server(create_app(settings, backend=FakeBackend()))
    client = await aiohttp_client(server)
    decided: list[str] = []
    for who, body, allowed in SUBMISSIONS:
        decision_id, done = await submit_through_router(client.app[HUB], keys[who], body)
        assert (done is not None) == allowed, (body, done)
        decided.append(decision_id)
    url = str(server.make_url("/audit"))

    async with launch(chromium, tmp_path / "profile") as browser:
        page = await browser.new_page()
        await page.goto(url)
        await page.wait_for("document.body.dataset.ready === 'true'")
        assert await page.visible("#login-form")
        assert not await page.visible("#main")

        # A key without the auditor role is refused, and the page says why.
        await sign_in(page, keys["user"])
        error = await page.wait_for("document.querySelector('#login-error').innerText")
        assert error == (
            "Refused (403 forbidden): not allowed: "
            'GET /v1/decisions needs one of the roles ["auditor"]'
        )
        assert not await page.visible("#main")
        assert await page.eval("sessionStorage.length") == 0

        # The auditor gets in: every decision, newest first, and the chain verified; the
        # newest is the API's denial of the user's attempt just now.
        await sign_in(page, keys["auditor"])
        await page.wait_for("!document.querySelector('#main').hidden")
        await page.wait_for("document.querySelectorAll('#decisions tbody tr').length === 6")
        listed = await rows(page)
        assert [r["id"] for r in listed[1:]] == decided[::-1]
        assert listed[0]["verdict"] == "deny" and listed[0]["cells"][2:4] == ["api", "user"]
        chain = await page.wait_for(
            "document.querySelector('#chain').className !== 'chain pending'"
            " && document.querySelector('#chain').innerText"
        )
        assert chain.startswith("Chain verified: 6 records")
        await page.select("#f-kind", "dispatch")
        await page.click("#apply")
        await page.wait_for("document.querySelectorAll('#decisions tbody tr').length === 5")
        assert [r["id"] for r in await rows(page)] == decided[::-1]
        assert "policies in force" in await page.text("#revisions")

        # Filter to denials; then narrow to one subject.
        await page.select("#f-decision", "deny")
        await page.click("#apply")
        await page.wait_for("document.querySelectorAll('#decisions tbody tr').length === 3")
        listed = await rows(page)
        assert {r["verdict"] for r in listed} == {"deny"}
        assert [r["id"] for r in listed] == [decided[4], decided[3], decided[1]]
        await page.type("#f-subject", "user")
        await page.click("#apply")
        await page.wait_for("document.querySelectorAll('#decisions tbody tr').length === 2")

        # Open one: its reasons, the revision it was made under, its input and result.
        await page.click(f'#decisions tbody tr[data-id="{decided[1]}"]')
        await page.wait_for("!document.querySelector('#detail').hidden")
        assert await page.text("#d-id") == decided[1]
        assert (await page.text("#d-verdict")).lower() == "deny"
        assert await page.text("#d-reasons") == CODE_EVAL_DENIAL
        revision = await page.text("#d-revision")
        assert "policies" in revision and "schemas" in revision and "agents.yaml" in revision
        assert "sha256:" in revision
        assert json.loads(await page.text("#d-input"))["task"]["input"] == {"expression": "1+1"}
        assert json.loads(await page.text("#d-result"))["allow"] is False
        await page.screenshot(tmp_path / "audit-detail.png")

        # Logged values are text, never markup.
        await page.select("#f-decision", "")
        await page.eval("document.querySelector('#f-subject').value = ''")
        await page.click("#apply")
        await page.wait_for("document.querySelectorAll('#decisions tbody tr').length === 5")
        await page.click(f'#decisions tbody tr[data-id="{decided[0]}"]')
        await page.wait_for(f"document.querySelector('#d-id').innerText === '{decided[0]}'")
        assert "<img id=xss src=x>" in await page.text("#d-input")
        assert await page.eval("document.getElementById('xss') === null")

        # By agent, and by time (UTC).
        await page.type("#f-agent", "calc")
        await page.click("#apply")
        await page.wait_for("document.querySelectorAll('#decisions tbody tr').length === 3")
        assert {r["cells"][4] for r in await rows(page)} == {"calc"}
        await page.eval("document.querySelector('#f-since').value = '2999-01-01T00:00:00'")
        await page.click("#apply")
        await page.wait_for("document.querySelectorAll('#decisions tbody tr').length === 0")
        assert await page.visible("#empty")
        await page.eval("document.querySelector('#f-since').value = '2000-01-01T00:00:00'")
        await page.click("#apply")
        await page.wait_for("document.querySelectorAll('#decisions tbody tr').length === 3")

        # Someone edits the log: "Verify again" shows it, naming the record.
        with sqlite3.connect(settings.db_path) as conn:
            conn.execute("UPDATE decisions SET allow = 1 WHERE seq = 2")
        await page.click("#verify-button")
        chain = await page.wait_for(
            "document.querySelector('#chain').className === 'chain tampered'"
            " && document.querySelector('#chain').innerText"
        )
        assert chain.startswith("Chain TAMPERED: 1 problem(s) in 6 records")
        problems = await page.text("#chain-problems")
        assert decided[1] in problems and "EDITED" in problems
        await page.screenshot(tmp_path / "audit-tampered.png")

        # Signing out forgets the key.
        await page.click("#logout")
        await page.wait_for("!document.querySelector('#login').hidden")
        assert await page.eval("sessionStorage.length") == 0


async def test_the_page_is_static_and_locked_down(fake_hub: Any) -> None:
    client, _ = fake_hub
    resp = await client.get("/audit")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    html = await resp.text()
    assert '<script src="/audit/audit.js"' in html
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere
    js = await client.get("/audit/audit.js")
    assert js.content_type == "text/javascript"
    assert "innerHTML" not in await js.text()
    assert (await client.get("/audit/../settings.py")).status == 404
