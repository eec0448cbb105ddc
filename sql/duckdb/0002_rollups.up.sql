-- 0002 (DuckDB): the rollup tables of sql/postgres/0002 (see there), in DuckDB.
-- The only difference: JSONB -> JSON.

CREATE TABLE IF NOT EXISTS communication_rollup_parts (
    window_start TIMESTAMP WITH TIME ZONE NOT NULL,
    source_service VARCHAR(100) NOT NULL,
    target_service VARCHAR(100) NOT NULL,
    protocol VARCHAR(32) NOT NULL,
    source_partition INTEGER NOT NULL,
    window_end TIMESTAMP WITH TIME ZONE NOT NULL,
    source_offset BIGINT NOT NULL,
    stats JSON NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    PRIMARY KEY (window_start, source_service, target_service, protocol, source_partition)
);

CREATE TABLE IF NOT EXISTS communication_rollups (
    window_start TIMESTAMP WITH TIME ZONE NOT NULL,
    window_end TIMESTAMP WITH TIME ZONE NOT NULL,
    source_service VARCHAR(100) NOT NULL,
    target_service VARCHAR(100) NOT NULL,
    protocol VARCHAR(32) NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    responses BIGINT NOT NULL DEFAULT 0,
    errors BIGINT NOT NULL DEFAULT 0,
    timeouts BIGINT NOT NULL DEFAULT 0,
    retries BIGINT NOT NULL DEFAULT 0,
    retry_backoff_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    late_events BIGINT NOT NULL DEFAULT 0,
    payload_bytes BIGINT NOT NULL DEFAULT 0,
    latency_count BIGINT NOT NULL DEFAULT 0,
    latency_sum_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    latency_min_ms DOUBLE PRECISION,
    latency_p50_ms DOUBLE PRECISION,
    latency_p90_ms DOUBLE PRECISION,
    latency_p95_ms DOUBLE PRECISION,
    latency_p99_ms DOUBLE PRECISION,
    latency_max_ms DOUBLE PRECISION,
    error_ratio DOUBLE PRECISION NOT NULL DEFAULT 0, -- (errors + timeouts) / outcomes, 0-1
    circuit_state VARCHAR(20) NOT NULL DEFAULT 'closed', -- reported if the edge reports, else derived
    derived_circuit_state VARCHAR(20) NOT NULL DEFAULT 'closed',
    errors_by_type JSON NOT NULL DEFAULT '{}',
    health_checks JSON NOT NULL DEFAULT '{}', -- status -> count
    circuit_transitions JSON NOT NULL DEFAULT '{}', -- 'derived:open' -> entries in the window
    latency_sketch JSON NOT NULL,
    partitions INTEGER NOT NULL DEFAULT 1, -- source partitions merged into this row
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    PRIMARY KEY (window_start, source_service, target_service, protocol)
);

CREATE INDEX IF NOT EXISTS idx_communication_rollups_edge
    ON communication_rollups (source_service, target_service, protocol, window_start DESC);
