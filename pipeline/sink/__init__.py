"""The sink: closed windows and kept events into PostgreSQL and DuckDB, and the schema
migrations both databases run. Database drivers load when a target first connects."""

from pipeline.sink.writer import DuckDBTarget, PostgresTarget, Sink, build_sink, connect_duckdb

__all__ = ["DuckDBTarget", "PostgresTarget", "Sink", "build_sink", "connect_duckdb"]
