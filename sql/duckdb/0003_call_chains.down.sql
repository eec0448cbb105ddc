-- 0003 down (DuckDB): DuckDB cannot drop a column from a table that has indexes
-- ("Cannot alter entry ... because there are entries that depend on it"), so the table's
-- indexes are dropped, the columns removed, and the indexes of 0001 created again.
DROP INDEX IF EXISTS idx_communication_events_trace;
DROP INDEX IF EXISTS idx_communication_events_correlation;
DROP INDEX IF EXISTS idx_communication_events_occurred;
DROP INDEX IF EXISTS idx_communication_events_edge;
DROP INDEX IF EXISTS idx_communication_events_event_id;
ALTER TABLE communication_events DROP COLUMN IF EXISTS backoff_ms;
ALTER TABLE communication_events DROP COLUMN IF EXISTS attempt;
CREATE UNIQUE INDEX IF NOT EXISTS idx_communication_events_event_id
    ON communication_events (event_id);
CREATE INDEX IF NOT EXISTS idx_communication_events_edge
    ON communication_events (source_service, target_service);
CREATE INDEX IF NOT EXISTS idx_communication_events_occurred
    ON communication_events (occurred_at DESC);
CREATE INDEX IF NOT EXISTS idx_communication_events_correlation
    ON communication_events (correlation_id, occurred_at DESC);
