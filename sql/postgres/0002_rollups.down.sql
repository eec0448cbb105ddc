-- 0002 down: the rollup tables (their indexes go with them).
DROP INDEX IF EXISTS idx_communication_rollups_edge;
DROP TABLE IF EXISTS communication_rollups;
DROP TABLE IF EXISTS communication_rollup_parts;
