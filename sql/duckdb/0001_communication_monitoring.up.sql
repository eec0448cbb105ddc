-- 0001 (DuckDB): the tables, columns and health analysis of sql/postgres/0001, in DuckDB.
--
-- Differences from the PostgreSQL file, each forced by DuckDB:
-- * BIGSERIAL -> BIGINT DEFAULT nextval(<table>_id_seq); JSONB -> JSON; TEXT[] -> VARCHAR[].
-- * The three partial indexes (idx_communication_patterns_latency / _errors,
--   idx_health_checks_unhealthy) are left out: DuckDB cannot create partial indexes, and a
--   plain ART index over the whole table would be a different index from the one specified.
--   DuckDB's ART serves point lookups and very selective filters; the range filters these
--   indexes were made for (latency > 100, error_rate > 1, status != 'healthy') are served by
--   DuckDB's automatic min-max zonemaps. Leaving out the two on communication_patterns
--   also keeps the sink's upsert from having to rewrite index entries for avg_latency_ms
--   and error_rate on every flush.
-- * analyze_communication_health is a table macro; see its comment below.

CREATE SEQUENCE IF NOT EXISTS communication_patterns_id_seq;
CREATE SEQUENCE IF NOT EXISTS communication_events_id_seq;
CREATE SEQUENCE IF NOT EXISTS communication_health_checks_id_seq;
CREATE SEQUENCE IF NOT EXISTS message_patterns_id_seq;

CREATE TABLE IF NOT EXISTS communication_patterns (
    id BIGINT PRIMARY KEY DEFAULT nextval('communication_patterns_id_seq'),
    source_service VARCHAR(100) NOT NULL,
    target_service VARCHAR(100) NOT NULL,
    communication_type VARCHAR(30) NOT NULL, -- 'synchronous', 'asynchronous', 'event_driven'
    protocol VARCHAR(20) NOT NULL, -- 'http', 'grpc', 'amqp', 'kafka'
    message_format VARCHAR(20) NOT NULL, -- 'json', 'protobuf', 'avro', 'unknown'
    avg_latency_ms DECIMAL(10,2) DEFAULT 0.0,
    success_rate DECIMAL(5,2) DEFAULT 100.0, -- percent
    throughput_rps DECIMAL(10,2) DEFAULT 0.0,
    error_rate DECIMAL(5,2) DEFAULT 0.0, -- percent
    retry_count INTEGER DEFAULT 0,
    circuit_breaker_state VARCHAR(20) DEFAULT 'closed', -- 'open', 'half_open', 'closed'
    last_health_check TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    UNIQUE (source_service, target_service, protocol)
);

CREATE TABLE IF NOT EXISTS communication_events (
    id BIGINT PRIMARY KEY DEFAULT nextval('communication_events_id_seq'),
    event_id VARCHAR(64) NOT NULL,
    correlation_id VARCHAR(128) NOT NULL,
    source_service VARCHAR(100) NOT NULL,
    target_service VARCHAR(100) NOT NULL,
    event_type VARCHAR(50) NOT NULL, -- 'request', 'response', 'error', 'timeout', 'retry'
    protocol VARCHAR(20) NOT NULL,
    method VARCHAR(200),
    payload_size BIGINT DEFAULT 0,
    latency_ms DECIMAL(10,2) DEFAULT 0.0,
    status_code INTEGER,
    error_type VARCHAR(100),
    error_message TEXT,
    trace_id VARCHAR(100),
    span_id VARCHAR(100),
    occurred_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS communication_health_checks (
    id BIGINT PRIMARY KEY DEFAULT nextval('communication_health_checks_id_seq'),
    event_id VARCHAR(64) NOT NULL,
    service_name VARCHAR(100) NOT NULL, -- the service checked (the event's target_service)
    checked_by VARCHAR(100), -- the service that ran the check (the event's source_service)
    endpoint VARCHAR(200) NOT NULL,
    check_type VARCHAR(30) NOT NULL, -- 'liveness', 'readiness', 'health'
    status VARCHAR(20) NOT NULL, -- 'healthy', 'unhealthy', 'degraded'
    response_time_ms DECIMAL(10,2) DEFAULT 0.0,
    error_details TEXT,
    checked_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    recovered_at TIMESTAMP WITH TIME ZONE
);

CREATE TABLE IF NOT EXISTS message_patterns (
    id BIGINT PRIMARY KEY DEFAULT nextval('message_patterns_id_seq'),
    pattern_name VARCHAR(100) NOT NULL,
    pattern_type VARCHAR(50) NOT NULL, -- 'request_response', 'fire_and_forget', 'pub_sub', 'saga'
    services_involved VARCHAR[] NOT NULL,
    message_flow TEXT NOT NULL, -- JSON describing the flow
    reliability_guarantees VARCHAR(50), -- 'at_least_once', 'at_most_once', 'exactly_once'
    consistency_model VARCHAR(30), -- 'eventual', 'strong', 'causal'
    failure_handling TEXT, -- JSON describing failure scenarios
    performance_sla JSON,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    UNIQUE (pattern_name)
);

-- the specification's inline indexes
CREATE UNIQUE INDEX IF NOT EXISTS idx_communication_events_event_id
    ON communication_events (event_id);
CREATE INDEX IF NOT EXISTS idx_communication_events_edge
    ON communication_events (source_service, target_service);
CREATE INDEX IF NOT EXISTS idx_communication_events_occurred
    ON communication_events (occurred_at DESC);
CREATE UNIQUE INDEX IF NOT EXISTS idx_health_checks_event_id
    ON communication_health_checks (event_id);
CREATE INDEX IF NOT EXISTS idx_health_checks_service_type
    ON communication_health_checks (service_name, check_type);
CREATE INDEX IF NOT EXISTS idx_health_checks_checked
    ON communication_health_checks (checked_at DESC);

-- the specification's strategic indexes, except the partial ones (see the top)
CREATE INDEX IF NOT EXISTS idx_communication_events_correlation
    ON communication_events (correlation_id, occurred_at DESC);

-- Communication health analysis: `SELECT * FROM analyze_communication_health()` returns the
-- same rows as PostgreSQL's function on the same data (same columns, types, order).
-- DuckDB's AVG of a DECIMAL is a DOUBLE, which can land a half-cent tie (10.015) on the
-- wrong side, so the averages are computed exactly instead: sums in integer cents, the
-- bands compare sum against threshold * count (the unrounded average, strict < and > as
-- in the specification), and the rounded average is (2 * |sum| + n) // (2 * n) cents with
-- the sum's sign: half away from zero, as PostgreSQL's ROUND(numeric, 2).
CREATE OR REPLACE MACRO analyze_communication_health() AS TABLE
    WITH service_stats AS (
        SELECT
            cp.source_service AS service,
            CAST(SUM(cp.avg_latency_ms) * 100 AS HUGEINT) AS lat_cents,
            COUNT(cp.avg_latency_ms) AS lat_n,
            CAST(SUM(cp.error_rate) * 100 AS HUGEINT) AS err_cents,
            COUNT(cp.error_rate) AS err_n,
            COUNT(CASE WHEN cp.circuit_breaker_state = 'open' THEN 1 END) AS circuit_breaker_issues
        FROM communication_patterns cp
        GROUP BY cp.source_service
    ),
    health_issues AS (
        SELECT
            chc.service_name,
            COUNT(CASE WHEN chc.status != 'healthy' THEN 1 END) AS unhealthy_checks
        FROM communication_health_checks chc
        WHERE chc.checked_at > NOW() - INTERVAL '1 hour'
        GROUP BY chc.service_name
    )
    SELECT
        CAST(ss.service AS VARCHAR) AS service_name,
        CAST(CASE
            WHEN ss.lat_cents < 5000 * ss.lat_n AND ss.err_cents < 10 * ss.err_n THEN 95.0
            WHEN ss.lat_cents < 10000 * ss.lat_n AND ss.err_cents < 50 * ss.err_n THEN 80.0
            WHEN ss.lat_cents < 20000 * ss.lat_n AND ss.err_cents < 100 * ss.err_n THEN 65.0
            ELSE 40.0
        END AS DECIMAL(5,2)) AS communication_score,
        CAST(CAST(sign(ss.lat_cents) * ((abs(ss.lat_cents) * 2 + ss.lat_n) // (2 * ss.lat_n))
                  AS DECIMAL(38,0)) * 0.01 AS DECIMAL(10,2)) AS avg_latency,
        CAST(CAST(sign(ss.err_cents) * ((abs(ss.err_cents) * 2 + ss.err_n) // (2 * ss.err_n))
                  AS DECIMAL(38,0)) * 0.01 AS DECIMAL(5,2)) AS error_rate,
        CASE
            WHEN ss.circuit_breaker_issues > 0 THEN ['CIRCUIT_BREAKER_OPEN']
            ELSE CAST([] AS VARCHAR[])
        END ||
        CASE
            WHEN hi.unhealthy_checks > 0 THEN ['HEALTH_CHECK_FAILURES']
            ELSE CAST([] AS VARCHAR[])
        END AS reliability_issues,
        CASE
            WHEN ss.lat_cents > 10000 * ss.lat_n THEN ['OPTIMIZE_LATENCY']
            ELSE CAST([] AS VARCHAR[])
        END ||
        CASE
            WHEN ss.err_cents > 50 * ss.err_n THEN ['IMPROVE_ERROR_HANDLING']
            ELSE CAST([] AS VARCHAR[])
        END AS recommendations
    FROM service_stats ss
    LEFT JOIN health_issues hi ON ss.service = hi.service_name
    ORDER BY ss.service;
