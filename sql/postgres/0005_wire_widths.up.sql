-- 0005: every column holds what wire format v1 accepts (pipeline/wire/decode.py).
--
-- 0001 kept the specification's widths for three columns the sink fills from events, and
-- the wire format accepts more: one valid event then failed the whole flush with
-- "value too long for type character varying(20)", for ever (the sink retries; the
-- worker keeps the window until every database has it).
-- * protocol: [a-z][a-z0-9._-]{0,31}, 32 characters (VARCHAR(20) before), as the rollup
--   tables of 0002 and 0004 already have it;
-- * check_type: [A-Za-z0-9._:-]{1,100}, 100 characters (VARCHAR(30) before).
-- Widening a VARCHAR rewrites no rows. tests/integration/test_wire_widths.py derives the
-- limits from the decoder and checks every limited column.

ALTER TABLE communication_patterns ALTER COLUMN protocol TYPE VARCHAR(32);
ALTER TABLE communication_events ALTER COLUMN protocol TYPE VARCHAR(32);
ALTER TABLE communication_health_checks ALTER COLUMN check_type TYPE VARCHAR(100);
