"""Integration tests: real broker and database from the session fixtures in ``tests/conftest.py``.

Every test collected under this directory gets the ``integration`` marker, so
``pytest -m "not integration"`` stays service-free even if a module forgets
its ``pytestmark``.

Fixtures added here: ``pg_database`` (a fresh database in the session PostgreSQL,
dropped after the test) and ``duckdb_path`` (a DuckDB file path under ``tmp_path``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in ``tests/integration`` as ``integration``; leave ``soak`` tests out
    (deselected, not skipped) unless ``-m`` names them."""
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)
    if "soak" in (config.option.markexpr or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


@pytest.fixture
def pg_database(postgres_dsn: str) -> Iterator[str]:
    """DSN of a fresh, uniquely named database in the session PostgreSQL; dropped afterwards."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    name = f"commpipe_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(postgres_dsn, dbname=name)
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture
def duckdb_path(tmp_path: Path) -> str:
    """Path of a DuckDB file that does not exist yet, in the test's temporary directory."""
    return str(tmp_path / "commpipe.duckdb")
