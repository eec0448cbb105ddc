-- 0003 down: the chain columns and their index (rows kept: a retry event stays a row).
DROP INDEX IF EXISTS idx_communication_events_trace;
ALTER TABLE communication_events DROP COLUMN IF EXISTS backoff_ms;
ALTER TABLE communication_events DROP COLUMN IF EXISTS attempt;
