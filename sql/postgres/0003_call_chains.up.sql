-- 0003: one call's chain (`commpipe trace`). Besides error and timeout events, the sink now
-- keeps retry events and the responses of retried calls (those with attempt > 1) in
-- communication_events, so a correlation id shows every attempt, each backoff and the
-- outcome. error_message (0001) holds the message masked and bounded (pipeline/redact.py).
-- message_patterns (0001) already has every column the catalogue file needs.
--
-- backoff_ms is DECIMAL(10,2) like latency_ms beside it (up to one day, 10 µs steps).
-- The trace_id index lets a chain be found by its W3C trace id as well.

-- attempt: a retry's failed attempt (1-based); other kinds: the attempt they belong to
ALTER TABLE communication_events ADD COLUMN IF NOT EXISTS attempt INTEGER;
-- backoff_ms: a retry's wait before the next attempt
ALTER TABLE communication_events ADD COLUMN IF NOT EXISTS backoff_ms DECIMAL(10,2);

CREATE INDEX IF NOT EXISTS idx_communication_events_trace
    ON communication_events (trace_id, occurred_at);
