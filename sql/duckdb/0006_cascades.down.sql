-- 0006 down (DuckDB): the views, then the column. As in 0003's down file, DuckDB cannot
-- drop a column of a table that has indexes, so the table's indexes are dropped and those
-- of 0001 and 0003 created again.
DROP VIEW IF EXISTS communication_cascade_services;
DROP VIEW IF EXISTS communication_cascade_windows;
DROP VIEW IF EXISTS communication_cascades;
DROP INDEX IF EXISTS idx_communication_events_trace;
DROP INDEX IF EXISTS idx_communication_events_correlation;
DROP INDEX IF EXISTS idx_communication_events_occurred;
DROP INDEX IF EXISTS idx_communication_events_edge;
DROP INDEX IF EXISTS idx_communication_events_event_id;
ALTER TABLE communication_events DROP COLUMN IF EXISTS parent_span_id;
CREATE UNIQUE INDEX IF NOT EXISTS idx_communication_events_event_id
    ON communication_events (event_id);
CREATE INDEX IF NOT EXISTS idx_communication_events_edge
    ON communication_events (source_service, target_service);
CREATE INDEX IF NOT EXISTS idx_communication_events_occurred
    ON communication_events (occurred_at DESC);
CREATE INDEX IF NOT EXISTS idx_communication_events_correlation
    ON communication_events (correlation_id, occurred_at DESC);
CREATE INDEX IF NOT EXISTS idx_communication_events_trace
    ON communication_events (trace_id, occurred_at);
