-- 0001: the communication-monitoring schema the product was specified with
-- (seeds/003, "POSTGRESQL MIGRATION"), made valid and fitted to wire format v1.
--
-- Changes from the specification, each for a reason:
-- * Indexes are separate CREATE INDEX statements (PostgreSQL has no inline INDEX), and
--   not CONCURRENTLY: they are built on tables created by this same script, so there is
--   nothing to lock out, and CONCURRENTLY cannot run inside the migration's transaction.
-- * communication_events.correlation_id is VARCHAR(128), not UUID: the wire format
--   accepts any 1-128 printable ASCII id (upstream request ids, W3C ids, ...).
-- * Latency columns are DECIMAL(10,2): the wire format accepts up to one day
--   (86,400,000 ms), which DECIMAL(8,2) cannot hold. payload_size is BIGINT (up to 2^40).
-- * event_id (the event's dedup key) is stored with a UNIQUE index, so a replayed
--   flush inserts nothing twice; error_type, method and checked_by keep the event's
--   own fields instead of squeezing them into free text.

CREATE TABLE IF NOT EXISTS communication_patterns (
    id BIGSERIAL PRIMARY KEY,
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
    id BIGSERIAL PRIMARY KEY,
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
    id BIGSERIAL PRIMARY KEY,
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
    id BIGSERIAL PRIMARY KEY,
    pattern_name VARCHAR(100) NOT NULL,
    pattern_type VARCHAR(50) NOT NULL, -- 'request_response', 'fire_and_forget', 'pub_sub', 'saga'
    services_involved TEXT[] NOT NULL,
    message_flow TEXT NOT NULL, -- JSON describing the flow
    reliability_guarantees VARCHAR(50), -- 'at_least_once', 'at_most_once', 'exactly_once'
    consistency_model VARCHAR(30), -- 'eventual', 'strong', 'causal'
    failure_handling TEXT, -- JSON describing failure scenarios
    performance_sla JSONB,
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

-- the specification's strategic indexes
CREATE INDEX IF NOT EXISTS idx_communication_patterns_latency
    ON communication_patterns (avg_latency_ms DESC) WHERE avg_latency_ms > 100.0;
CREATE INDEX IF NOT EXISTS idx_communication_patterns_errors
    ON communication_patterns (error_rate DESC) WHERE error_rate > 1.0;
CREATE INDEX IF NOT EXISTS idx_communication_events_correlation
    ON communication_events (correlation_id, occurred_at DESC);
CREATE INDEX IF NOT EXISTS idx_health_checks_unhealthy
    ON communication_health_checks (service_name, checked_at DESC) WHERE status != 'healthy';

-- Communication health analysis: the specification's function, with
-- * avg_latency DECIMAL(10,2) (the latency columns were widened);
-- * the averages rounded to 2 decimals (half away from zero) and every output cast to its
--   declared type, so a score comes back as 95.00; the bands compare the unrounded averages;
-- * ORDER BY service_name in byte order (COLLATE "C"), so the output is deterministic and
--   ordered like DuckDB's macro of the same name (sql/duckdb/0001).
CREATE OR REPLACE FUNCTION analyze_communication_health()
RETURNS TABLE(
    service_name VARCHAR(100),
    communication_score DECIMAL(5,2),
    avg_latency DECIMAL(10,2),
    error_rate DECIMAL(5,2),
    reliability_issues TEXT[],
    recommendations TEXT[]
) LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    WITH service_stats AS (
        SELECT
            cp.source_service AS service,
            AVG(cp.avg_latency_ms) AS avg_lat,
            AVG(cp.error_rate) AS avg_err,
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
        ss.service::VARCHAR(100),
        (CASE
            WHEN ss.avg_lat < 50 AND ss.avg_err < 0.1 THEN 95.0
            WHEN ss.avg_lat < 100 AND ss.avg_err < 0.5 THEN 80.0
            WHEN ss.avg_lat < 200 AND ss.avg_err < 1.0 THEN 65.0
            ELSE 40.0
        END)::DECIMAL(5,2),
        ROUND(ss.avg_lat, 2)::DECIMAL(10,2),
        ROUND(ss.avg_err, 2)::DECIMAL(5,2),
        CASE
            WHEN ss.circuit_breaker_issues > 0 THEN ARRAY['CIRCUIT_BREAKER_OPEN']
            ELSE ARRAY[]::TEXT[]
        END ||
        CASE
            WHEN hi.unhealthy_checks > 0 THEN ARRAY['HEALTH_CHECK_FAILURES']
            ELSE ARRAY[]::TEXT[]
        END,
        CASE
            WHEN ss.avg_lat > 100 THEN ARRAY['OPTIMIZE_LATENCY']
            ELSE ARRAY[]::TEXT[]
        END ||
        CASE
            WHEN ss.avg_err > 0.5 THEN ARRAY['IMPROVE_ERROR_HANDLING']
            ELSE ARRAY[]::TEXT[]
        END
    FROM service_stats ss
    LEFT JOIN health_issues hi ON ss.service = hi.service_name
    ORDER BY ss.service COLLATE "C";
END;
$$;
