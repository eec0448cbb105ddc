-- 0004 down: the objectives table (its index goes with it).
DROP INDEX IF EXISTS idx_communication_slo_window_end;
DROP TABLE IF EXISTS communication_slo;
