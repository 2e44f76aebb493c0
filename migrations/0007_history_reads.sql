-- History reads, faster (docs/history.md, docs/benchmarks.md "History"): `stripe.as_of` on a table without embedded
-- lists reads the table in slices of its ids that Postgres runs in parallel, computes the typed columns from one
-- pass over each object (jsonb_to_record), and runs without JIT (which took longer to compile the query than the
-- query took to run). Tables fed by their parents' lists (subscription_items...) keep the reading of migration 0006.
-- The per-table functions `stripe.<table>_as_of` now call `stripe.as_of`.

-- These run inside parallel workers.
alter function stripe.version_winner(text, text, boolean, text, bigint, integer, text, text) parallel safe;
alter function stripe.version_object(jsonb, text, text) parallel safe;

-- The names and types of the fields the typed columns of `tbl` are computed from, for jsonb_to_record: each is read
-- as jsonb once, then converted as the applier converts it.
create or replace function stripe.history_fields(tbl text) returns text
language sql stable as $$
  select string_agg(quote_ident(a.attname) || ' jsonb', ', ' order by a.attnum)
  from pg_attribute a
  where a.attrelid = format('stripe.%I', tbl)::regclass and a.attnum > 0 and not a.attisdropped
    and left(a.attname, 1) <> '_' and a.attname not in ('id', 'livemode', 'deleted') and a.attgenerated = ''
    and format_type(a.atttypid, null) in ('text', 'bigint', 'numeric', 'boolean', 'jsonb')
$$;

-- The query of table `tbl` (no embedded lists) as it was at `$1` (a unix second), only rows `$2` when `$2` is not
-- null: one row per key, its last version at or before the moment, a tie within a second decided as the table
-- decides it (stripe.version_winner). One `union all` branch per slice of ids, the slices split at `bounds`, so that
-- Postgres can give each branch to a parallel worker. Written for nested loops over the indexes only (stripe.as_of
-- turns hash and merge joins off while it runs): the newest version per key from events_versions_idx alone, another
-- version of the same second and rank looked up there (a tie, rare: then stripe.version_winner), the chosen event
-- fetched by its key. (A join rather than a subquery per row: a correlated subquery keeps Postgres from running the
-- branch in a worker; `distinct on` keeps one row per key when several versions tie.)
create or replace function stripe.as_of_slices_sql(tbl text, bounds text[]) returns text
language plpgsql stable as $$
declare
  parts text[] := '{}';
  slice text;
  columns text := replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(
    stripe.history_columns(tbl),
    'v._object -> ', 'x.'),
    'v._object', 'e._raw_data -> ''data'' -> ''object'''),
    'v._parent_id', 'null::text'),
    'v._row_id', 'c._row_id'),
    'v._account_id', 'c._account_id'),
    'v.livemode', 'c.livemode'),
    'v._deleted', '(c._rank >= 100000)'),
    'v._event_id', 'e.id'),
    'v._tied', '(e.id <> c._event_id)'),
    'v._applied_at', 'e._applied_at'),
    'v.', 'e.');
  fields text := coalesce(stripe.history_fields(tbl), '"-" jsonb');
begin
  -- history_columns names each field as x.'name' after the replacement above: make it an identifier (Stripe's field
  -- names hold no quotes).
  columns := regexp_replace(columns, 'x\.''((?:[^'']|'''')*)''', 'x."\1"', 'g');
  -- Slices in order, each bound once.
  bounds := array(select distinct b from unnest(bounds) as b where b is not null order by b);
  for i in 0 .. cardinality(bounds) loop
    slice := concat(
      case when i > 0 then format(' and e._row_id >= %L', bounds[i]) end,
      case when i < cardinality(bounds) then format(' and e._row_id < %L', bounds[i + 1]) end);
    parts := parts || format(
      '(select distinct on (c._row_id, c._account_id, c.livemode) %2$s '
      'from (select distinct on (e._row_id, e._account_id, e.livemode) e._account_id, e.livemode, e._row_id, '
      'e.id as _event_id, e.created, e._rank from stripe.events e '
      'where e._table = %1$L and e.created <= $1 and ($2::text[] is null or e._row_id = any($2))%3$s '
      'order by e._row_id desc, e._account_id desc, e.livemode desc, e.created desc, e._rank desc, '
      'e._stream_seq desc) c '
      'left join stripe.events y on y._table = %1$L and y._row_id = c._row_id and y._account_id = c._account_id '
      'and y.livemode = c.livemode and y.created = c.created and y._rank = c._rank and y.id <> c._event_id '
      'join stripe.events e on e._account_id = c._account_id and e.id = case when y.id is null then c._event_id '
      'else stripe.version_winner(%1$L, c._account_id, c.livemode, c._row_id, c.created, c._rank) end '
      'left join lateral jsonb_to_record(e._raw_data -> ''data'' -> ''object'') as x(%4$s) on true '
      'order by c._row_id desc, c._account_id desc, c.livemode desc)',
      tbl, columns, coalesce(slice, ''), fields);
  end loop;
  return array_to_string(parts, ' union all ');
end $$;

-- Table `rel`'s type (`null::stripe.customers`) as the table was at `at`: the same columns, one row per key, from
-- the versions stripe.events holds. `ids` keeps only these rows (for a list a parent owns, such as
-- subscription_items: these parents' items), and is the fast way to look up a few objects. A whole table is read in
-- as many slices as a query may have parallel workers, split where the table's ids are evenly spread (its
-- statistics; one slice when it has none).
create or replace function stripe.as_of(rel anyelement, at timestamptz, ids text[] default null)
returns setof anyelement
language plpgsql stable set jit = off set enable_hashjoin = off set enable_mergejoin = off as $$
declare
  tbl text;
  second bigint := floor(extract(epoch from at))::bigint;
  slices integer := least(greatest(current_setting('max_parallel_workers_per_gather')::integer, 1), 8);
  bounds text[];
begin
  select c.relname into strict tbl from pg_class c join pg_namespace n on n.oid = c.relnamespace
  where c.reltype = pg_typeof(rel)::oid and n.nspname = 'stripe';
  if exists (select 1 from stripe.history_lists where child_table = tbl) then
    -- A table fed by its parents' lists: the reading of migration 0006, whose joins may hash. (Settings changed
    -- here end with this function, as its own `set` clauses do.)
    perform set_config('enable_hashjoin', 'on', true), set_config('enable_mergejoin', 'on', true);
    return query execute stripe.as_of_sql(tbl) using second, ids;
    return;
  end if;
  if ids is null and slices > 1 then
    -- A table analyzed with fewer than two distinct ids has no histogram.
    select array(select h[1 + i * (cardinality(h) - 1) / slices] from generate_series(1, slices - 1) as i)
    into bounds
    from (select s.histogram_bounds::text::text[] as h from pg_stats s
          where s.schemaname = 'stripe' and s.tablename = tbl and s.attname = 'id'
            and s.histogram_bounds is not null) b;
  end if;
  return query execute stripe.as_of_slices_sql(tbl, bounds) using second, ids;
end $$;

-- The per-table functions call stripe.as_of (which may run in parallel; an inlined query could not).
create or replace function stripe.create_as_of_function(tbl text) returns void
language plpgsql as $$
begin
  execute format(
    'create or replace function stripe.%I(at timestamptz, ids text[] default null) returns setof stripe.%I '
    'language sql stable as %L',
    tbl || '_as_of', tbl, format('select * from stripe.as_of(null::stripe.%I, at, ids)', tbl));
  execute format('comment on function stripe.%I(timestamptz, text[]) is %L', tbl || '_as_of',
    format('stripe.%s as it was at a moment: stripe.as_of(null::stripe.%s, at, ids).', tbl, tbl));
end $$;

-- create_history_view: 0006's (the view, and the per-table function it wrote), then the per-table function above in
-- place of 0006's.
alter function stripe.create_history_view(text) rename to create_history_view_0006;
create function stripe.create_history_view(tbl text) returns void
language plpgsql as $$
begin
  perform stripe.create_history_view_0006(tbl);
  perform stripe.create_as_of_function(tbl);
end $$;

select stripe.create_as_of_function(c.relname::text)
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'stripe' and c.relkind in ('r', 'p')
  and to_regclass(format('stripe.%I', c.relname || '_history')) is not null;
