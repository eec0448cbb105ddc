-- 0006: trace context and cascade failures.
--
-- communication_events gains parent_span_id, the span of the call an event's call was made
-- within (wire format v1, optional), so that the stored failures of one trace link up:
-- span_id -> parent_span_id. The views below find the failures that followed a failure
-- downstream; README "Cascade failures" states the definition, and `commpipe check` and
-- `commpipe trace` read them. Views, not tables: they are recomputed from the stored
-- events and rollups on every read, so replays and late writes need nothing more.

ALTER TABLE communication_events ADD COLUMN IF NOT EXISTS parent_span_id VARCHAR(100);

CREATE INDEX IF NOT EXISTS idx_communication_events_parent
    ON communication_events (trace_id, parent_span_id);

-- communication_cascades: one row per cascade failure, i.e. per failed call U (an error or
-- timeout event with a span id) on an edge A -> B for which the same trace holds a failed
-- call D that B made within it (D.parent_span_id = U.span_id, D.source_service = B) and
-- that failed no later than U did (D.occurred_at <= U.occurred_at, the services' clocks).
-- The downstream_* columns name the earliest such D: where U's failure came from.
CREATE VIEW communication_cascades AS
SELECT event_id, trace_id, span_id, parent_span_id, correlation_id, source_service,
       target_service, protocol, event_type, error_type, occurred_at, downstream_event_id,
       downstream_span_id, downstream_source_service, downstream_target_service,
       downstream_protocol, downstream_event_type, downstream_error_type,
       downstream_occurred_at
FROM (
    SELECT u.event_id, u.trace_id, u.span_id, u.parent_span_id, u.correlation_id,
           u.source_service, u.target_service, u.protocol, u.event_type, u.error_type,
           u.occurred_at, d.event_id AS downstream_event_id, d.span_id AS downstream_span_id,
           d.source_service AS downstream_source_service,
           d.target_service AS downstream_target_service, d.protocol AS downstream_protocol,
           d.event_type AS downstream_event_type, d.error_type AS downstream_error_type,
           d.occurred_at AS downstream_occurred_at,
           row_number() OVER (PARTITION BY u.event_id
                              ORDER BY d.occurred_at, d.event_id) AS nth
    FROM communication_events AS u
    JOIN communication_events AS d
      ON d.trace_id = u.trace_id AND d.parent_span_id = u.span_id
     AND d.source_service = u.target_service
     AND d.event_type IN ('error', 'timeout') AND d.occurred_at <= u.occurred_at
    WHERE u.event_type IN ('error', 'timeout') AND u.span_id IS NOT NULL
) AS linked
WHERE nth = 1;

-- communication_cascade_windows: per closed window and edge (communication_rollups), the
-- calls that ended (responses + errors + timeouts), the failed ones, and the cascade
-- failures among them (by the failure's own time), with their ratio to the calls.
CREATE VIEW communication_cascade_windows AS
SELECT r.window_start, r.window_end, r.source_service, r.target_service, r.protocol,
       r.responses + r.errors + r.timeouts AS calls, r.errors + r.timeouts AS failures,
       count(c.event_id) AS cascades,
       1.0 * count(c.event_id) / greatest(r.responses + r.errors + r.timeouts, 1)
           AS cascade_ratio
FROM communication_rollups AS r
LEFT JOIN communication_cascades AS c
  ON c.source_service = r.source_service AND c.target_service = r.target_service
 AND c.protocol = r.protocol AND c.occurred_at >= r.window_start
 AND c.occurred_at < r.window_end
GROUP BY r.window_start, r.window_end, r.source_service, r.target_service, r.protocol,
         r.responses, r.errors, r.timeouts;

-- communication_cascade_services: per window and service, the calls into the service and
-- the cascade failures it passed on (a cascade on A -> B counts for B: B failed its caller
-- after its own downstream call had failed).
CREATE VIEW communication_cascade_services AS
SELECT window_start, window_end, target_service AS service_name, sum(calls) AS calls,
       sum(failures) AS failures, sum(cascades) AS cascades,
       1.0 * sum(cascades) / greatest(sum(calls), 1) AS cascade_ratio
FROM communication_cascade_windows
GROUP BY window_start, window_end, target_service;
