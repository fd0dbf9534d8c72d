"""The single-writer store: group commit keeps each write's outcome its own."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.store import Store


async def test_concurrent_writes_share_transactions_but_not_failures(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.write(lambda db: db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)"))

    def insert(k: int) -> Any:
        return lambda db: db.execute("INSERT INTO t VALUES (?)", [k]).rowcount

    # 200 writes in flight at once; k=7 is written twice, so its second insert must fail
    # alone while every other write in the same batch commits.
    keys = [*range(200), 7]
    results = await asyncio.gather(*(store.write(insert(k)) for k in keys), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1
    assert isinstance(failures[0], sqlite3.IntegrityError)
    rows = await store.read(lambda db: db.execute("SELECT count(*) FROM t").fetchone()[0])
    assert rows == 200
    await store.close()


async def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.write(lambda db: db.execute("CREATE TABLE t (k INTEGER)"))

    def half_then_fail(db: Any) -> None:
        db.execute("INSERT INTO t VALUES (1)")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await store.write(half_then_fail)
    assert await store.read(lambda db: db.execute("SELECT count(*) FROM t").fetchone()[0]) == 0
    await store.close()


async def test_writes_after_close_are_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.close()
    with pytest.raises(Exception, match="closed"):
        await store.ping_write()
