"""The sink's targets against the real PostgreSQL and a real DuckDB file, without a worker:
what one write does to the rows, whatever order versions of a window arrive in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.cli.query import query_duckdb
from pipeline.core.batch import PartitionBatch
from pipeline.core.rollups import Rollups, WindowRow
from pipeline.core.window import WindowConfig
from pipeline.sink.writer import DuckDBTarget, PostgresTarget, Target
from pipeline.wire.events import Event

CFG = WindowConfig(size_s=10.0, grace_s=5.0)
T0 = 1_700_000_000.0
EDGE = ("api", "db", "grpc")


def _version(store: dict[str, Any], offset: int, n: int) -> WindowRow:
    """Apply one record of ``n`` requests at ``offset``; the window's row as it is then."""
    batch = PartitionBatch(0, CFG, store)
    events = [Event("request", f"o{offset}-{i}", f"c{i}", *EDGE, T0 + 1) for i in range(n)]
    batch.apply(offset, events, record_ts=T0 + 2, now=T0 + 2)
    store.update(batch.changes())
    (row,) = Rollups(store, CFG).windows()
    return row


def _targets(dsn: str, duckdb_path: str) -> list[tuple[Target, Any]]:
    import psycopg

    def pg(sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn) as conn:
            return conn.execute(sql).fetchall()

    def duck(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in query_duckdb(duckdb_path, sql).rows]

    return [(PostgresTarget(dsn), pg), (DuckDBTarget(duckdb_path), duck)]


@pytest.mark.parametrize("which", ["postgres", "duckdb"])
def test_an_older_version_of_a_window_never_overwrites_a_newer_one(
        which: str, pg_database: str, tmp_path: Path) -> None:
    """After a restart, windows restored from the changelog (older than what the databases
    hold when the sink had stored a version whose changelog write was lost) are written
    again: the rows must keep the newer version until the replay reaches it."""
    target, read = dict(zip(["postgres", "duckdb"],
                            _targets(pg_database, str(tmp_path / "c.duckdb")), strict=True))[which]
    store: dict[str, Any] = {}
    older = _version(store, 3, 1)   # offset 3: 1 request
    newer = _version(store, 5, 2)   # offset 5: 3 requests
    try:
        target.write([newer], [], lookback_s=300.0)
        target.write([older], [], lookback_s=300.0)
        parts = read("SELECT source_offset FROM communication_rollup_parts")
        rollups = read("SELECT requests, partitions FROM communication_rollups")
        assert [tuple(p) for p in parts] == [(5,)]
        assert [tuple(r) for r in rollups] == [(3, 1)]
        # the same version again (a replay reaching it) is written, and changes nothing
        target.write([newer], [], lookback_s=300.0)
        assert [tuple(r) for r in read("SELECT requests FROM communication_rollups")] == [(3,)]
    finally:
        target.close()
