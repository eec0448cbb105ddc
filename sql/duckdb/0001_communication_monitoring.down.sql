-- 0001 down (DuckDB): the macro, indexes, tables, then the tables' id sequences.
DROP MACRO TABLE IF EXISTS analyze_communication_health;
DROP INDEX IF EXISTS idx_communication_events_correlation;
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
DROP SEQUENCE IF EXISTS message_patterns_id_seq;
DROP SEQUENCE IF EXISTS communication_health_checks_id_seq;
DROP SEQUENCE IF EXISTS communication_events_id_seq;
DROP SEQUENCE IF EXISTS communication_patterns_id_seq;
