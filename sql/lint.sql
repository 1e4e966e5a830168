-- The PL/pgSQL linter in the loop: plpgsql_check (Debian's
-- postgresql-15-plpgsql-check) over every PL/pgSQL function and procedure of
-- the installed extension, trigger functions against their table.  PostgreSQL
-- checks a PL/pgSQL body only for syntax at CREATE time; a misspelt column, a
-- function called with the wrong types, an unused or never-read variable or
-- a path that falls off the end shows only when that statement first runs.
--
-- Checked: errors (all of a function's, not only the first), warnings, extra
-- warnings and security warnings (SQL injection through EXECUTE).  Not the
-- performance hints ("should be STABLE", implicit integer -> numeric casts):
-- changing a volatility changes what the planner may do with a call, which is
-- a decision of its own, not a lint fix.
--
-- Expected: exactly the findings below, each explained in a comment beside its
-- code; anything else is new and is fixed (or explained there and here):
--   * "control reached end of function without RETURN" (2F005): functions
--     whose EXCEPTION handler ends in fluxrate_internal.fail(), which always
--     raises; plpgsql_check cannot know that a called function never returns
--     (said where fail() is defined, 10_context.sql);
--   * org_period_usage: "OUT variable ... is maybe unmodified": its rows come
--     from RETURN QUERY EXECUTE, dynamic SQL the checker cannot see into
--     (41_rollups.sql).
SET client_min_messages = warning;
CREATE EXTENSION plpgsql_check;
RESET client_min_messages;
-- the closer's run snapshot lives in two temporary tables that
-- sys_close_batch() creates before any statement reads them: made here, so
-- that the statements reading them are checked against their columns
SELECT fluxrate_internal.sys_close_tables();
SELECT p.pronamespace::regnamespace AS schema, p.proname AS function, t.level, t.sqlstate, t.message
  FROM pg_proc p
  JOIN pg_language l ON l.oid = p.prolang AND l.lanname = 'plpgsql'
  LEFT JOIN LATERAL (SELECT tg.tgrelid FROM pg_trigger tg WHERE tg.tgfoid = p.oid ORDER BY tg.tgrelid LIMIT 1) tr ON true
  CROSS JOIN LATERAL plpgsql_check_function_tb(p.oid, coalesce(tr.tgrelid, 0), fatal_errors => false,
                                               other_warnings => true, extra_warnings => true,
                                               performance_warnings => false, security_warnings => true) t
 WHERE p.pronamespace IN ('fluxrate'::regnamespace, 'fluxrate_internal'::regnamespace)
 ORDER BY 1, p.proname COLLATE "C", t.message COLLATE "C";
-- every PL/pgSQL routine was checked (a trigger function without its table
-- would have been an error above); how many there are, for the record
SELECT count(*) > 100 AS many_checked FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang AND l.lanname = 'plpgsql'
 WHERE p.pronamespace IN ('fluxrate'::regnamespace, 'fluxrate_internal'::regnamespace);
DROP EXTENSION plpgsql_check;
