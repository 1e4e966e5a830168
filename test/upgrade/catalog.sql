-- Every catalog object of the installed fluxrate, one line each, in a stable
-- order: what must be the same after ALTER EXTENSION fluxrate UPDATE as after a
-- fresh CREATE EXTENSION (test/scripts/upgrade.sh diffs two of these).
-- Column order is left out on purpose: ADD COLUMN appends where a fresh
-- CREATE TABLE may put the column in the middle, and nothing reads by position.
\set ON_ERROR_STOP on
\pset tuples_only on
\pset format unaligned
WITH ns AS (
  SELECT oid, nspname FROM pg_namespace WHERE nspname IN ('fluxrate', 'fluxrate_internal')
), acl(o, a) AS (SELECT NULL::oid, NULL::aclitem[] WHERE false)
SELECT line FROM (
  SELECT 'schema ' || n.nspname || ' owner=' || pg_get_userbyid(n.nspowner)
         || ' acl=' || coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(n.nspacl) x), '')
         || ' comment=' || coalesce(obj_description(n.oid, 'pg_namespace'), '') AS line
    FROM pg_namespace n JOIN ns USING (oid)
  UNION ALL
  SELECT 'routine ' || p.oid::regprocedure::text
         || ' kind=' || p.prokind::text || ' returns=' || coalesce(pg_get_function_result(p.oid), '')
         || ' args=' || pg_get_function_arguments(p.oid)
         || ' lang=' || (SELECT lanname FROM pg_language l WHERE l.oid = p.prolang)
         || ' secdef=' || p.prosecdef || ' vol=' || p.provolatile::text || ' par=' || p.proparallel::text
         || ' strict=' || p.proisstrict || ' leak=' || p.proleakproof || ' cost=' || p.procost || ' rows=' || p.prorows
         || ' config=' || coalesce(array_to_string(p.proconfig, ','), '')
         || ' owner=' || pg_get_userbyid(p.proowner)
         || ' acl=' || coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(p.proacl) x), '')
         || ' bin=' || coalesce(p.probin, '') || ' src=' || md5(coalesce(p.prosrc, ''))
         || ' body=' || md5(coalesce(pg_get_function_sqlbody(p.oid), ''))
         || ' comment=' || coalesce(obj_description(p.oid, 'pg_proc'), '')
    FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace
  UNION ALL
  SELECT 'aggregate ' || a.aggfnoid::regprocedure::text || ' ' || a.aggkind::text || ' ' || a.aggtransfn::regproc::text
         || ' ' || a.aggfinalfn::regproc::text || ' ' || a.aggcombinefn::regproc::text || ' ' || a.aggserialfn::regproc::text
         || ' ' || a.aggdeserialfn::regproc::text || ' ' || format_type(a.aggtranstype, NULL) || ' ' || coalesce(a.agginitval, '')
    FROM pg_aggregate a JOIN pg_proc p ON p.oid = a.aggfnoid JOIN ns ON ns.oid = p.pronamespace
  UNION ALL
  SELECT 'relation ' || c.oid::regclass::text || ' kind=' || c.relkind::text || ' persistence=' || c.relpersistence::text
         || ' owner=' || pg_get_userbyid(c.relowner)
         || ' acl=' || coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(c.relacl) x), '')
         || ' rls=' || c.relrowsecurity || ' force=' || c.relforcerowsecurity
         || ' options=' || coalesce(array_to_string(c.reloptions, ','), '')
         || ' partkey=' || coalesce(pg_get_partkeydef(c.oid), '')
         || ' bound=' || coalesce(pg_get_expr(c.relpartbound, c.oid), '')
         || ' comment=' || coalesce(obj_description(c.oid, 'pg_class'), '')
         || CASE WHEN c.relkind = 'v' THEN ' view=' || md5(pg_get_viewdef(c.oid)) ELSE '' END
    FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
   WHERE c.relkind NOT IN ('i', 'I')  -- indexes below, by their definition
  UNION ALL
  SELECT 'column ' || a.attrelid::regclass::text || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
         || ' notnull=' || a.attnotnull || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
         || ' identity=' || a.attidentity::text || ' generated=' || a.attgenerated::text
         || ' collation=' || coalesce((SELECT collname FROM pg_collation co WHERE co.oid = a.attcollation), '')
         || ' comment=' || coalesce(col_description(a.attrelid, a.attnum), '')
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN ns ON ns.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
  UNION ALL
  SELECT 'constraint ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(co.oid)
         || ' deferrable=' || condeferrable || ' deferred=' || condeferred
    FROM pg_constraint co JOIN ns ON ns.oid = co.connamespace WHERE co.conrelid <> 0
  UNION ALL
  SELECT 'index ' || pg_get_indexdef(i.indexrelid)
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN ns ON ns.oid = c.relnamespace
  UNION ALL
  SELECT 'policy ' || schemaname || '.' || tablename || ' ' || policyname || ' ' || permissive || ' ' || array_to_string(roles, ',')
         || ' ' || cmd || ' using=' || coalesce(qual, '') || ' check=' || coalesce(with_check, '')
    FROM pg_policies WHERE schemaname IN ('fluxrate', 'fluxrate_internal')
  UNION ALL
  SELECT 'trigger ' || pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN ns ON ns.oid = c.relnamespace WHERE NOT t.tgisinternal
  UNION ALL
  SELECT 'type ' || t.oid::regtype::text || ' ' || t.typtype::text || ' owner=' || pg_get_userbyid(t.typowner)
         || ' enum=' || coalesce((SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid), '')
         || ' base=' || coalesce(format_type(t.typbasetype, t.typtypmod), '')
         || ' checks=' || coalesce((SELECT string_agg(pg_get_constraintdef(co.oid), ';' ORDER BY conname) FROM pg_constraint co WHERE co.contypid = t.oid), '')
    FROM pg_type t JOIN ns ON ns.oid = t.typnamespace
   WHERE t.typtype IN ('e', 'd', 'c') AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c')
  UNION ALL
  SELECT 'event_trigger ' || evtname || ' ' || evtevent || ' ' || evtfoid::regproc::text || ' ' || evtenabled::text
         || ' tags=' || coalesce(array_to_string(evttags, ','), '')
    FROM pg_event_trigger
  UNION ALL
  SELECT 'member ' || pg_describe_object(d.classid, d.objid, d.objsubid)
    FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
   WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' AND e.extname = 'fluxrate'
  UNION ALL
  SELECT 'dumped ' || x.cfg::regclass::text || ' where=' || coalesce(x.cond, '')
    FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS x(cfg, cond)
   WHERE e.extname = 'fluxrate'
  UNION ALL
  SELECT 'extension ' || extname || ' ' || extversion || ' schema=' || extnamespace::regnamespace::text
    FROM pg_extension WHERE extname = 'fluxrate'
) s
ORDER BY line;
