-- 0006 down: the cascade views, then parent_span_id and its index (rows kept).
DROP VIEW IF EXISTS communication_cascade_services;
DROP VIEW IF EXISTS communication_cascade_windows;
DROP VIEW IF EXISTS communication_cascades;
DROP INDEX IF EXISTS idx_communication_events_parent;
ALTER TABLE communication_events DROP COLUMN IF EXISTS parent_span_id;
