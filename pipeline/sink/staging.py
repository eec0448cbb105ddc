"""Getting a batch's rows into the database as a relation the sink's SQL reads from.

Both databases see the same names (``commpipe_stage_parts`` ...) holding the same
columns, so one SQL text (:mod:`pipeline.sink.sql`) moves them into the real tables
with ``INSERT ... SELECT ... ON CONFLICT``:

- PostgreSQL: a temporary table per name (``ON COMMIT DELETE ROWS``), filled by one
  binary ``COPY`` whose types are set up front (``Copy.set_types``), so psycopg's C
  dumpers write each value and the server parses no text.
- DuckDB: an Arrow table registered under the name (DuckDB scans it in place); a
  Python ``executemany`` manages ~200 rows/s there, and unnested list parameters are
  several times slower than Arrow.

Columns are ``(name, type, how)`` as in :mod:`pipeline.sink.sql`; times travel as epoch
seconds (``double precision``), JSON as text, and the ``SELECT`` converts them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Columns", "stage_duckdb", "stage_postgres", "unstage_duckdb"]

Columns = Sequence[tuple[str, str, str]]

_PG_TYPES = {"double precision": "float8", "text": "text", "bigint": "int8",
             "boolean": "bool"}
_ARROW_TYPES = {"double precision": "float64", "text": "string", "bigint": "int64",
                "boolean": "bool_"}


def stage_postgres(cur: Any, name: str, columns: Columns, rows: Iterable[Sequence[Any]]) -> None:
    """``rows`` into the temporary table ``name`` (created on the connection's first use,
    emptied at every commit) by one binary COPY."""
    defs = ", ".join(f"{c} {t}" for c, t, _ in columns)
    cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name} ({defs}) ON COMMIT DELETE ROWS")
    with cur.copy(f"COPY {name} FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types([_PG_TYPES[t] for _, t, _ in columns])
        write = copy.write_row
        for row in rows:
            write(row)


def stage_duckdb(con: Any, name: str, columns: Columns, rows: Sequence[Sequence[Any]]) -> None:
    """``rows`` as an Arrow table registered on ``con`` under ``name``."""
    import pyarrow as pa

    data = list(zip(*rows, strict=True)) if rows else [() for _ in columns]
    schema = pa.schema([(c, getattr(pa, _ARROW_TYPES[t])()) for c, t, _ in columns])
    table = pa.Table.from_arrays(
        [pa.array(values, type=schema.field(i).type) for i, values in enumerate(data)],
        schema=schema)
    con.register(name, table)


def unstage_duckdb(con: Any, names: Iterable[str]) -> None:
    for name in names:
        con.unregister(name)
