-- 0005 down: the widths of 0001 again. A value longer than them (a protocol over 20
-- characters, a check_type over 30) makes this fail, naming the column, and nothing is
-- changed: shortening stored values is not something a migration should do silently.

ALTER TABLE communication_health_checks ALTER COLUMN check_type TYPE VARCHAR(30);
ALTER TABLE communication_events ALTER COLUMN protocol TYPE VARCHAR(20);
ALTER TABLE communication_patterns ALTER COLUMN protocol TYPE VARCHAR(20);
