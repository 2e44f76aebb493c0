-- History: every version of every row, queryable as of any moment (docs/history.md).
--
-- stripe.events already holds every applied event (and every snapshot read from the API) with its full object. The
-- applier now also records, with each event, which row it wrote and where it stands in the ordering rule: `_table`,
-- `_row_id` (the row's `id`), `_rank` (the rank within its second, as `_last_event_rank`), and `livemode` as the row
-- has it. One index over those columns makes `stripe.as_of` and the `<table>_history` views fast; nothing else is
-- written twice.

alter table stripe.events
    add column if not exists _table text,
    add column if not exists _row_id text,
    add column if not exists _rank integer;

comment on column stripe.events._table is 'The table whose row the event wrote (null: none).';
comment on column stripe.events._row_id is 'The id of that row (the object''s, or the event''s, account''s...).';
comment on column stripe.events._rank is
  'The write''s rank within its second (the row''s _last_event_rank); null: recorded before history existed.';

-- The versions of each row in order: the last of a row's versions at or before a moment is its state then.
create index if not exists events_versions_idx on stripe.events
    (_table, _row_id, _account_id, livemode, created, _rank, _stream_seq) include (id)
    where _table is not null;

-- Events recorded before this migration (or by an applier of an earlier release during a rolling upgrade) have no
-- place in history yet (`_rank` null): the appliers give them one in the background (history::index_older_events).
-- Once they have, this index is empty and costs nothing: new events are recorded with their rank.
create index if not exists events_unranked_idx on stripe.events (_account_id, id) where _rank is null;

-- Retention's bookkeeping: when it last ran, and up to which second versions have been pruned.
create table if not exists stripe.history_state (
    one boolean primary key default true check (one),
    pruned_at timestamptz,
    pruned_until bigint
);
insert into stripe.history_state (one) values (true) on conflict do nothing;

-- Embedded lists (applier/registry.toml, `embedded_in`): a child table's versions also come from its parents'
-- events. A test checks these rows against the registry.
create table if not exists stripe.history_lists (
    child_table text not null,
    parent_table text not null,
    field text not null,
    owned boolean not null,
    primary key (child_table, parent_table, field)
);
insert into stripe.history_lists (child_table, parent_table, field, owned) values
    ('subscription_items', 'subscriptions', 'items', true),
    ('fee_refunds', 'application_fees', 'refunds', false),
    ('refunds', 'charges', 'refunds', false),
    ('checkout_session_line_items', 'checkout_sessions', 'line_items', true),
    ('credit_note_line_items', 'credit_notes', 'lines', true),
    ('invoice_line_items', 'invoices', 'lines', true),
    ('active_entitlements', 'entitlements_active_entitlement_summaries', 'entitlements', true),
    ('transfer_reversals', 'transfers', 'reversals', false)
on conflict do nothing;

-- Among versions of one row with the same second and rank, the one the current table keeps: each in stream order
-- replaces the one before it when stripe.tie_break says it is newer (docs/design.md, "The ordering rule"). For an
-- item of a parent's list (`field`, `item`), only the parent's versions that name the item count: the item's row is
-- written from those.
create or replace function stripe.version_winner(tbl text, account text, mode boolean, row_key text, at bigint,
                                                 rnk integer, field text default null, item text default null)
returns text
language plpgsql stable as $$
declare
  best_id text;
  best_seq bigint;
  m record;
begin
  for m in
    select e.id, e._stream_seq from stripe.events e
    where e._table = tbl and e._row_id = row_key and e._account_id = account and e.livemode = mode
      and e.created = at and e._rank = rnk
      and (field is null
           or e._raw_data -> 'data' -> 'object' -> field -> 'data' @> jsonb_build_array(jsonb_build_object('id', item)))
    order by e._stream_seq
  loop
    if best_id is null or stripe.tie_break(account, m.id, m._stream_seq, best_id, best_seq) > 0 then
      best_id := m.id;
      best_seq := m._stream_seq;
    end if;
  end loop;
  return best_id;
end $$;

-- Whether another version of the same row has the same second and rank as `event` (the same item filter).
create or replace function stripe.version_tied(tbl text, account text, mode boolean, row_key text, at bigint,
                                               rnk integer, event text, field text default null,
                                               item text default null)
returns boolean
language sql stable as $$
  select exists (
    select 1 from stripe.events x
    where x._table = tbl and x._row_id = row_key and x._account_id = account and x.livemode = mode
      and x.created = at and x._rank = rnk and x.id <> event
      and (field is null
           or x._raw_data -> 'data' -> 'object' -> field -> 'data' @> jsonb_build_array(jsonb_build_object('id', item))))
$$;

-- The columns of table `tbl`, in order, each computed from a version `v` the way the applier computes it from the
-- object (store.rs): typed columns through stripe.j_*, the fixed ones from the version's event.
create or replace function stripe.history_columns(tbl text) returns text
language sql stable as $$
  select string_agg(
    case
      when a.attname = 'id' then 'v._row_id'
      when a.attname in ('_account_id', 'livemode', '_parent_id') then 'v.' || a.attname
      when a.attname = 'deleted' then 'v._deleted'
      when a.attname = '_raw_data' then 'v._object'
      when a.attname = '_last_event_id' then 'v._event_id'
      when a.attname = '_last_event_created' then 'v.created'
      when a.attname = '_last_event_rank' then 'v._rank'
      when a.attname = '_last_event_seq' then 'v._stream_seq'
      when a.attname = '_updated_at' then 'v._applied_at'
      when a.attname = '_ambiguous' then 'v._tied'
      when left(a.attname, 1) <> '_' and a.attgenerated = '' and format_type(a.atttypid, null) = 'text'
        then format('stripe.j_text(v._object -> %L)', a.attname)
      when left(a.attname, 1) <> '_' and a.attgenerated = '' and format_type(a.atttypid, null) = 'bigint'
        then format('stripe.j_bigint(v._object -> %L)', a.attname)
      when left(a.attname, 1) <> '_' and a.attgenerated = '' and format_type(a.atttypid, null) = 'numeric'
        then format('stripe.j_numeric(v._object -> %L)', a.attname)
      when left(a.attname, 1) <> '_' and a.attgenerated = '' and format_type(a.atttypid, null) = 'boolean'
        then format('stripe.j_bool(v._object -> %L)', a.attname)
      when left(a.attname, 1) <> '_' and a.attgenerated = '' and format_type(a.atttypid, null) = 'jsonb'
        then format('nullif(v._object -> %L, ''null'')', a.attname)
      else format('null::%s', format_type(a.atttypid, a.atttypmod))
    end || ' as ' || quote_ident(a.attname), ', ' order by a.attnum)
  from pg_attribute a
  where a.attrelid = format('stripe.%I', tbl)::regclass and a.attnum > 0 and not a.attisdropped
$$;

-- Every version of table `tbl`'s rows, as a query with the columns
--   _account_id, livemode, _parent_id, _row_id, _event_id, created, _rank, _stream_seq, _source, _group_id, _field,
--   _deleted, _object_event
-- (`_source`: the table whose events carry the version, `_group_id`: that row's id, `_field`: the parent's list
-- holding the item, null for a row's own events, `_object_event`: the event holding the object). `cond` filters the events (alias e) before lists are read;
-- `ids` (a parameter reference, or null) keeps only these rows (for an owned list: these parents).
create or replace function stripe.history_sources(tbl text, cond text, ids text) returns text
language plpgsql stable as $$
declare
  l record;
  parts text[] := array[format(
    'select e._account_id, e.livemode, null::text as _parent_id, e._row_id, e.id as _event_id, e.created, '
    'e._rank, e._stream_seq, e._table as _source, e._row_id as _group_id, null::text as _field, '
    'e._rank >= 100000 as _deleted, e.id as _object_event '
    'from stripe.events e where e._table = %L and %s%s',
    tbl, cond, case when ids is null then '' else format(' and (%1$s is null or e._row_id = any(%1$s))', ids) end)];
begin
  for l in select * from stripe.history_lists where child_table = tbl order by parent_table, field loop
    parts := parts || format(
      'select e._account_id, e.livemode, %s as _parent_id, i.item ->> ''id'' as _row_id, e.id as _event_id, '
      'e.created, e._rank, e._stream_seq, e._table as _source, e._row_id as _group_id, %L as _field, '
      'e._rank >= 100000 as _deleted, e.id as _object_event '
      'from stripe.events e cross join lateral jsonb_array_elements(case when jsonb_typeof('
      'e._raw_data -> ''data'' -> ''object'' -> %L -> ''data'') = ''array'' '
      'then e._raw_data -> ''data'' -> ''object'' -> %L -> ''data'' else ''[]''::jsonb end) as i(item) '
      'where e._table = %L and jsonb_typeof(i.item -> ''id'') = ''string'' and %s%s',
      case when l.owned then 'e._row_id' else 'null::text' end, l.field, l.field, l.field, l.parent_table, cond,
      case when ids is null then ''
           when l.owned then format(' and (%1$s is null or e._row_id = any(%1$s))', ids)
           else format(' and (%1$s is null or i.item ->> ''id'' = any(%1$s))', ids) end);
  end loop;
  return array_to_string(parts, ' union all ');
end $$;

-- For the history views: the versions in which an owned list's item went away (its parent's state is a tombstone, or
-- has a complete list without the item that the parent's previous state listed), deleted, with the item as it was
-- last listed. The same columns as stripe.history_sources; null when `tbl` is no owned list.
create or replace function stripe.history_removals(tbl text) returns text
language plpgsql stable as $$
declare
  l record;
  parts text[] := '{}';
  list text;
begin
  for l in select * from stripe.history_lists where child_table = tbl and owned order by parent_table, field loop
    list := format('e._raw_data -> ''data'' -> ''object'' -> %L', l.field);
    parts := parts || format(
      'select p._account_id, p.livemode, p._row_id as _parent_id, x.item ->> ''id'' as _row_id, p.id as _event_id, '
      'p.created, p._rank, p._stream_seq, p._table as _source, p._row_id as _group_id, %1$L as _field, '
      'true as _deleted, p.previous_id as _object_event '
      'from (select e._account_id, e.livemode, e._row_id, e.id, e.created, e._rank, e._stream_seq, e._table, '
      '%2$s as list, lag(e.id) over w as previous_id, lag(%2$s) over w as previous_list '
      'from stripe.events e where e._table = %3$L '
      'window w as (partition by e._row_id, e._account_id, e.livemode order by e.created, e._rank, e._stream_seq)) p '
      'cross join lateral jsonb_array_elements(case when jsonb_typeof(p.previous_list -> ''data'') = ''array'' '
      'then p.previous_list -> ''data'' else ''[]''::jsonb end) as x(item) '
      'where jsonb_typeof(x.item -> ''id'') = ''string'' '
      'and (p._rank >= 100000 or (jsonb_typeof(p.list -> ''data'') = ''array'' '
      'and p.list -> ''has_more'' is distinct from ''true''::jsonb)) '
      'and not exists (select 1 from jsonb_array_elements(case when jsonb_typeof(p.list -> ''data'') = ''array'' '
      'then p.list -> ''data'' else ''[]''::jsonb end) as y(item) where y.item ->> ''id'' = x.item ->> ''id'')',
      l.field, list, l.parent_table);
  end loop;
  return nullif(array_to_string(parts, ' union all '), '');
end $$;

-- The object of a version: the event's object, or the item of the parent's list.
create or replace function stripe.version_object(raw jsonb, field text, row_key text) returns jsonb
language sql immutable as $$
  select case when field is null then raw -> 'data' -> 'object'
    else (select i from jsonb_array_elements(case when jsonb_typeof(raw -> 'data' -> 'object' -> field -> 'data')
            = 'array' then raw -> 'data' -> 'object' -> field -> 'data' else '[]'::jsonb end) as i
          where i ->> 'id' = row_key limit 1) end
$$;

-- The query of table `tbl` as it was at `$1` (a unix second), only rows `$2` when `$2` is not null (for an owned
-- list: the items of parents `$2`). One row per key: its last version at or before the moment (a tie within a
-- second decided as the table decides it); an owned list's item is deleted when its parent then was, or its
-- parent's list then was complete and lacked it. (Each `offset 0` keeps a value computed once per row: the chosen
-- version, the object; the lateral `limit 1` fetches each chosen event by its key instead of hashing them all.)
create or replace function stripe.as_of_sql(tbl text) returns text
language plpgsql stable as $$
declare
  owned record;
  deleted text := 'c._deleted';
  parents text := '';
  -- A row's key, in the order of events_versions_idx (read backwards: newest version first).
  keys text := 'u._row_id desc, u._account_id desc, u.livemode desc';
  candidates text := 'c';
begin
  select * into owned from stripe.history_lists where child_table = tbl and history_lists.owned limit 1;
  if found then
    keys := 'u._row_id desc, u._parent_id desc, u._account_id desc, u.livemode desc';
    -- The parent's state at the moment, and its list.
    parents := format(
      ', par0 as (select distinct on (e._row_id, e._account_id, e.livemode) e._account_id, e.livemode, e._row_id, '
      'e.id, e.created, e._rank from stripe.events e '
      'where e._table = %2$L and e.created <= $1 and ($2::text[] is null or e._row_id = any($2)) '
      'order by e._row_id desc, e._account_id desc, e.livemode desc, e.created desc, e._rank desc, '
      'e._stream_seq desc), '
      'par as (select p._account_id, p.livemode, p._row_id, e._rank >= 100000 as gone, '
      'e._raw_data -> ''data'' -> ''object'' -> %1$L as list '
      'from (select p0.*, case when stripe.version_tied(%2$L, p0._account_id, p0.livemode, p0._row_id, p0.created, '
      'p0._rank, p0.id) then stripe.version_winner(%2$L, p0._account_id, p0.livemode, p0._row_id, p0.created, '
      'p0._rank) else p0.id end as chosen from par0 p0) p '
      'join stripe.events e on e._account_id = p._account_id and e.id = p.chosen)',
      owned.field, owned.parent_table);
    deleted := 'coalesce(par.gone or (jsonb_typeof(par.list -> ''data'') = ''array'' '
      'and par.list -> ''has_more'' is distinct from ''true''::jsonb '
      'and not exists (select 1 from jsonb_array_elements(par.list -> ''data'') as n(item) '
      'where n.item ->> ''id'' = c._row_id)), c._deleted)';
    candidates := 'c left join par on par._account_id = c._account_id and par.livemode = c.livemode '
      'and par._row_id = c._parent_id';
  end if;
  return format(
    'with c as (select distinct on (%s) u.* from (%s) u '
    'order by %s, u.created desc, u._rank desc, u._stream_seq desc)%s, '
    'w as (select c.*, %s as _deleted_then, case when exists (select 1 from stripe.events x '
    'where x._table = c._source and x._row_id = c._group_id and x._account_id = c._account_id '
    'and x.livemode = c.livemode and x.created = c.created and x._rank = c._rank and x.id <> c._event_id '
    'and (c._field is null or x._raw_data -> ''data'' -> ''object'' -> c._field -> ''data'' '
    '@> jsonb_build_array(jsonb_build_object(''id'', c._row_id)))) '
    'then stripe.version_winner(c._source, c._account_id, c.livemode, c._group_id, c.created, c._rank, c._field, '
    'c._row_id) else c._event_id end as chosen from %s offset 0) '
    'select %s from (select w._account_id, w.livemode, w._parent_id, w._row_id, e.id as _event_id, e.created, '
    'e._rank, e._stream_seq, e._applied_at, w._deleted_then as _deleted, w.chosen <> w._event_id as _tied, '
    'case when w._field is null then e._raw_data -> ''data'' -> ''object'' '
    'else stripe.version_object(e._raw_data, w._field, w._row_id) end as _object '
    'from w cross join lateral (select * from stripe.events e where e._account_id = w._account_id '
    'and e.id = w.chosen limit 1) e offset 0) v',
    replace(keys, ' desc', ''), stripe.history_sources(tbl, 'e.created <= $1', '$2'), keys, parents, deleted,
    candidates, stripe.history_columns(tbl));
end $$;

-- Table `rel`'s type (`null::stripe.customers`) as the table was at `at`: the same columns, one row per key, from
-- the versions stripe.events holds. `ids` keeps only these rows (for a list a parent owns, such as
-- subscription_items: these parents' items), and is the fast way to look up a few objects.
create or replace function stripe.as_of(rel anyelement, at timestamptz, ids text[] default null)
returns setof anyelement
language plpgsql stable as $$
declare
  tbl text;
begin
  select c.relname into strict tbl from pg_class c join pg_namespace n on n.oid = c.relnamespace
  where c.reltype = pg_typeof(rel)::oid and n.nspname = 'stripe';
  return query execute stripe.as_of_sql(tbl) using floor(extract(epoch from at))::bigint, ids;
end $$;

comment on function stripe.as_of(anyelement, timestamptz, text[]) is
  'The table as it was at a moment: select * from stripe.as_of(null::stripe.subscriptions, ''2026-03-01''). '
  'See docs/history.md.';

-- The view stripe.<tbl>_history: one row per version, with the table's columns and `_valid_from`, `_valid_to`
-- (null for the current version), `_event_id`, `_event_type`. Versions of one second are ordered as the table orders
-- them; the ones a later version of the same second replaced are valid from and to that second.
create or replace function stripe.create_history_view(tbl text) returns void
language plpgsql as $$
begin
  if to_regclass(format('stripe.%I', tbl || '_history')) is not null then
    execute format('drop view stripe.%I', tbl || '_history');
  end if;
  execute format(
    'create view stripe.%I as select %s, to_timestamp(v.created) as _valid_from, '
    'lead(to_timestamp(v.created)) over k as _valid_to, v._event_id, v._event_type '
    'from (select u._account_id, u.livemode, u._parent_id, u._row_id, u._event_id, u.created, u._rank, '
    'u._stream_seq, e._applied_at, e.type as _event_type, u._deleted, count(*) over g > 1 as _tied, '
    'case when count(*) over g > 1 then u._event_id = stripe.version_winner(u._source, u._account_id, '
    'u.livemode, u._group_id, u.created, u._rank, u._field, u._row_id) else true end as _wins, '
    'stripe.version_object(case when u._object_event = u._event_id then e._raw_data else (select o._raw_data '
    'from stripe.events o where o._account_id = u._account_id and o.id = u._object_event) end, u._field, '
    'u._row_id) as _object '
    'from (%s) u join stripe.events e on e._account_id = u._account_id and e.id = u._event_id '
    'window g as (partition by u._row_id, u._parent_id, u._account_id, u.livemode, u.created, u._rank)) v '
    'window k as (partition by v._row_id, v._parent_id, v._account_id, v.livemode '
    'order by v.created, v._rank, v._wins, v._stream_seq)',
    tbl || '_history', stripe.history_columns(tbl),
    concat_ws(' union all ', stripe.history_sources(tbl, 'true', null), stripe.history_removals(tbl)));
  execute format('comment on view stripe.%I is %L', tbl || '_history',
    format('Every version of stripe.%s, from stripe.events (docs/history.md).', tbl));
  -- The same as stripe.as_of for this table, as a plain SQL function: Postgres inlines it into the calling query,
  -- so nothing is materialized and the caller's filters reach the index.
  execute format(
    'create or replace function stripe.%I(at timestamptz, ids text[] default null) returns setof stripe.%I '
    'language sql stable as %L',
    tbl || '_as_of', tbl,
    replace(stripe.as_of_sql(tbl), '$1', '(floor(extract(epoch from $1))::bigint)'));
end $$;

-- (Re)creates every history view: after a migration adds a table or a column.
create or replace function stripe.create_history_views() returns integer
language plpgsql as $$
declare
  t record;
  n integer := 0;
begin
  for t in
    select c.relname::text as name from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where n.nspname = 'stripe' and c.relkind in ('r', 'p')
      and exists (select 1 from pg_attribute a where a.attrelid = c.oid and a.attname = '_last_event_rank')
    order by 1
  loop
    perform stripe.create_history_view(t.name);
    n := n + 1;
  end loop;
  return n;
end $$;

select stripe.create_history_views();

-- Retention, one slice: for the rows that have a version created in [since, until) (unix seconds), deletes their
-- versions that a newer version, also older than `until`, replaced; the number deleted. Run slice after slice up to
-- the horizon, it leaves each row's last version before the horizon, and a parent's last version before it to name
-- each item of its list (that item's state then), so the tables as of any moment after the horizon are whole.
-- Events that wrote no row are kept (for some, stripe.events is the only copy).
create or replace function stripe.prune_history_between(since bigint, until bigint) returns integer
language sql as $$
  with touched as (
    select distinct t._table, t._row_id, t._account_id, t.livemode from stripe.events t
    where t.created >= since and t.created < until and t._table is not null),
  gone as (
    delete from stripe.events e using touched t
    where e._table = t._table and e._row_id = t._row_id and e._account_id = t._account_id
      and e.livemode = t.livemode and e.created < until
      and exists (
        select 1 from stripe.events n
        where n._table = e._table and n._row_id = e._row_id and n._account_id = e._account_id
          and n.livemode = e.livemode and n.created < until and (n.created, n._rank) > (e.created, e._rank))
      -- A parent's version stays while it is the newest to name one of its list's items.
      and not exists (
        select 1 from stripe.history_lists l
        cross join lateral jsonb_array_elements(case when jsonb_typeof(e._raw_data -> 'data' -> 'object' -> l.field
          -> 'data') = 'array' then e._raw_data -> 'data' -> 'object' -> l.field -> 'data' else '[]'::jsonb end)
          as x(item)
        where l.parent_table = e._table and jsonb_typeof(x.item -> 'id') = 'string'
          and not exists (
            select 1 from stripe.events n
            where n._table = e._table and n._row_id = e._row_id and n._account_id = e._account_id
              and n.livemode = e.livemode and n.created < until and (n.created, n._rank) > (e.created, e._rank)
              and n._raw_data -> 'data' -> 'object' -> l.field -> 'data'
                @> jsonb_build_array(jsonb_build_object('id', x.item ->> 'id'))))
    returning 1)
  select count(*)::integer from gone
$$;

-- Everything before `horizon`, a day at a time from the first version, in one transaction (by hand; the appliers'
-- retention commits each day on its own and starts where its last run stopped). Waits for a running retention.
create or replace function stripe.prune_history(horizon bigint) returns bigint
language plpgsql as $$
declare
  day bigint;
  total bigint := 0;
begin
  perform pg_advisory_xact_lock('stripe.history_lists'::regclass::oid::int, 0);
  select min(created) into day from stripe.events where _table is not null;
  while day is not null and day < horizon loop
    total := total + stripe.prune_history_between(day, least(day + 86400, horizon));
    day := day + 86400;
  end loop;
  return total;
end $$;
