-- 0003 (DuckDB): the chain columns and index of sql/postgres/0003 (see there), unchanged.

ALTER TABLE communication_events ADD COLUMN IF NOT EXISTS attempt INTEGER;
ALTER TABLE communication_events ADD COLUMN IF NOT EXISTS backoff_ms DECIMAL(10,2);

CREATE INDEX IF NOT EXISTS idx_communication_events_trace
    ON communication_events (trace_id, occurred_at);
