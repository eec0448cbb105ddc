-- 0004: service-level objectives judged per closed window and edge (pipeline/slo.py).
--
-- One row per (window, edge, objective) that the window gave something to judge:
-- latency_p95 (synchronous protocols), latency_max, delivery_success, retry_backoff
-- (largest total backoff of one call), circuit_reaction (last failure -> reported open).
-- measured and threshold share a unit (ms, or a 0-1 ratio for delivery_success); miss is
-- how far past the threshold (0 when ok). The sink recomputes a row whenever its window
-- changes, so replays leave it as one run would.

CREATE TABLE IF NOT EXISTS communication_slo (
    window_start TIMESTAMP WITH TIME ZONE NOT NULL,
    window_end TIMESTAMP WITH TIME ZONE NOT NULL,
    source_service VARCHAR(100) NOT NULL,
    target_service VARCHAR(100) NOT NULL,
    protocol VARCHAR(32) NOT NULL,
    objective VARCHAR(32) NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    measured DOUBLE PRECISION NOT NULL,
    ok BOOLEAN NOT NULL,
    miss DOUBLE PRECISION NOT NULL DEFAULT 0,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    PRIMARY KEY (window_start, source_service, target_service, protocol, objective)
);

CREATE INDEX IF NOT EXISTS idx_communication_slo_window_end ON communication_slo (window_end);
