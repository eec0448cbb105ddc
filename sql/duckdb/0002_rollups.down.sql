-- 0002 down (DuckDB): the rollup tables (the index first: DuckDB drops it with the table
-- too, it is named here to mirror the up file).
DROP INDEX IF EXISTS idx_communication_rollups_edge;
DROP TABLE IF EXISTS communication_rollups;
DROP TABLE IF EXISTS communication_rollup_parts;
