-- 0002: closed windows, as the sink writes them.
--
-- communication_rollup_parts: one row per (window, edge, source partition), written only
-- by the worker that owns that partition; a replayed flush overwrites its own row, so a
-- crash and restart neither loses nor doubles a window. stats is the whole window
-- (pipeline.aggregate.WindowStats.to_json), sketch included.
--
-- communication_rollups: what users read, one row per (window, edge): the parts merged
-- (counts added, latency sketches merged), recomputed by the sink whenever a part changes.
-- Ratios are 0-1 and named so (error_ratio); latencies are milliseconds. latency_sketch
-- is the merged DDSketch (pipeline.sketch.LatencySketch.to_json) so windows can be
-- re-merged into longer periods with exact 1 % quantiles.

CREATE TABLE IF NOT EXISTS communication_rollup_parts (
    window_start TIMESTAMP WITH TIME ZONE NOT NULL,
    source_service VARCHAR(100) NOT NULL,
    target_service VARCHAR(100) NOT NULL,
    protocol VARCHAR(32) NOT NULL,
    source_partition INTEGER NOT NULL,
    window_end TIMESTAMP WITH TIME ZONE NOT NULL,
    source_offset BIGINT NOT NULL,
    stats JSONB NOT NULL,
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
    errors_by_type JSONB NOT NULL DEFAULT '{}',
    health_checks JSONB NOT NULL DEFAULT '{}', -- status -> count
    circuit_transitions JSONB NOT NULL DEFAULT '{}', -- 'derived:open' -> entries in the window
    latency_sketch JSONB NOT NULL,
    partitions INTEGER NOT NULL DEFAULT 1, -- source partitions merged into this row
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    PRIMARY KEY (window_start, source_service, target_service, protocol)
);

CREATE INDEX IF NOT EXISTS idx_communication_rollups_edge
    ON communication_rollups (source_service, target_service, protocol, window_start DESC);
