-- 0001 down: the specification's rollback (seeds/003, "Database Rollback"), plus the
-- indexes 0001 adds beyond it. Dropping a table drops its indexes too; they are named
-- here anyway so the list mirrors the up file.
DROP FUNCTION IF EXISTS analyze_communication_health();
DROP INDEX IF EXISTS idx_health_checks_unhealthy;
DROP INDEX IF EXISTS idx_communication_events_correlation;
DROP INDEX IF EXISTS idx_communication_patterns_errors;
DROP INDEX IF EXISTS idx_communication_patterns_latency;
DROP INDEX IF EXISTS idx_health_checks_checked;
DROP INDEX IF EXISTS idx_health_checks_service_type;
DROP INDEX IF EXISTS idx_health_checks_event_id;
DROP INDEX IF EXISTS idx_communication_events_occurred;
DROP INDEX IF EXISTS idx_communication_events_edge;
DROP INDEX IF EXISTS idx_communication_events_event_id;
DROP TABLE IF EXISTS message_patterns;
DROP TABLE IF EXISTS communication_health_checks;
DROP TABLE IF EXISTS communication_events;
DROP TABLE IF EXISTS communication_patterns;
