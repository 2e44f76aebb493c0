-- Typed columns become plain columns that the applier fills from the object's JSON in its upsert (same
-- stripe.j_* functions, same values). A stored generated column costs Postgres its expression's set-up at every
-- statement (about 1 ms per statement for a 60-column table, most of the applier's time at low rates) and more per
-- row than the same expression in the insert (measured in docs/benchmarks.md). Existing values are kept.
do $$
declare
    col record;
begin
    for col in
        select c.relname, a.attname
        from pg_attribute a
        join pg_class c on c.oid = a.attrelid
        join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = 'stripe' and a.attgenerated = 's' and not a.attisdropped
        order by c.relname, a.attnum
    loop
        execute format('alter table stripe.%I alter column %I drop expression', col.relname, col.attname);
    end loop;
end
$$;
