-- An item removed from a list its parent owns stays removed (issue 22, 2.1). Until now a parent state whose list
-- was cut short (`has_more`) or absent made a removed item `deleted = false` again, in the tables and in history.
--
-- The one rule, for the tables (store.rs) and for history alike: an item of an owned list is deleted from the first
-- parent version after the last one that names it that is a tombstone or holds the complete list (which, coming
-- after, lacks the item), until a parent version names it again. A cut-short or absent list never decides anything.

-- Whether a parent version after (after_created, after_rank, after_seq), and no later than `until` (null: any),
-- removes `item` from its list `field`: it is a tombstone, or its list is complete, and it does not name the item.
create or replace function stripe.list_removed(parent_table text, field text, account text, mode boolean,
                                               parent_id text, after_created bigint, after_rank integer,
                                               after_seq bigint, item text, until bigint default null)
returns boolean
language sql stable parallel safe as $$
  select exists (
    select 1 from stripe.events e
    where e._table = parent_table and e._row_id = parent_id and e._account_id = account and e.livemode = mode
      and (e.created, e._rank, e._stream_seq) > (after_created, after_rank, after_seq)
      and (until is null or e.created <= until)
      and (e._rank >= 100000
           or (jsonb_typeof(e._raw_data -> 'data' -> 'object' -> field -> 'data') = 'array'
               and e._raw_data -> 'data' -> 'object' -> field -> 'has_more' is distinct from 'true'::jsonb))
      and not coalesce(e._raw_data -> 'data' -> 'object' -> field -> 'data'
                       @> jsonb_build_array(jsonb_build_object('id', item)), false))
$$;

-- For the history views: the versions in which an owned list's item went away, deleted, with the item as it was
-- last listed. For each parent version naming an item, the next parent version that names it or decides the list
-- (a tombstone, a complete list): when that one does not name it, the item went away there. The same columns as
-- stripe.history_sources; null when `tbl` is no owned list.
create or replace function stripe.history_removals(tbl text) returns text
language plpgsql stable as $$
declare
  l record;
  parts text[] := '{}';
begin
  for l in select * from stripe.history_lists where child_table = tbl and owned order by parent_table, field loop
    parts := parts || format(
      'select q._account_id, q.livemode, q._row_id as _parent_id, x.item ->> ''id'' as _row_id, n.id as _event_id, '
      'n.created, n._rank, n._stream_seq, n._table as _source, n._row_id as _group_id, %1$L as _field, '
      'true as _deleted, q.id as _object_event '
      'from stripe.events q '
      'cross join lateral jsonb_array_elements(case when jsonb_typeof(q._raw_data -> ''data'' -> ''object'' -> %1$L '
      '-> ''data'') = ''array'' then q._raw_data -> ''data'' -> ''object'' -> %1$L -> ''data'' else ''[]''::jsonb end) '
      'as x(item) '
      'cross join lateral (select e.id, e.created, e._rank, e._stream_seq, e._table, e._row_id, '
      'e._raw_data -> ''data'' -> ''object'' -> %1$L as list from stripe.events e '
      'where e._table = q._table and e._row_id = q._row_id and e._account_id = q._account_id '
      'and e.livemode = q.livemode and (e.created, e._rank, e._stream_seq) > (q.created, q._rank, q._stream_seq) '
      'and (e._rank >= 100000 '
      'or (jsonb_typeof(e._raw_data -> ''data'' -> ''object'' -> %1$L -> ''data'') = ''array'' '
      'and e._raw_data -> ''data'' -> ''object'' -> %1$L -> ''has_more'' is distinct from ''true''::jsonb) '
      'or e._raw_data -> ''data'' -> ''object'' -> %1$L -> ''data'' '
      '@> jsonb_build_array(jsonb_build_object(''id'', x.item ->> ''id''))) '
      'order by e.created, e._rank, e._stream_seq limit 1) n '
      'where q._table = %2$L and jsonb_typeof(x.item -> ''id'') = ''string'' '
      'and not coalesce(n.list -> ''data'' @> jsonb_build_array(jsonb_build_object(''id'', x.item ->> ''id'')), false)',
      l.field, l.parent_table);
  end loop;
  return nullif(array_to_string(parts, ' union all '), '');
end $$;

-- The query of table `tbl` as it was at `$1` (a unix second), only rows `$2` when `$2` is not null (for an owned
-- list: the items of parents `$2`), as migration 0006 wrote it, with the rule above for an owned list's items: one
-- row per key, its last version at or before the moment (a tie within a second decided as the table decides it),
-- deleted when that version was a tombstone or a parent version after it, by the moment, removed it.
create or replace function stripe.as_of_sql(tbl text) returns text
language plpgsql stable as $$
declare
  deleted text := 'c._deleted';
  -- A row's key, in the order of events_versions_idx (read backwards: newest version first).
  keys text := 'u._row_id desc, u._account_id desc, u.livemode desc';
begin
  if exists (select 1 from stripe.history_lists where child_table = tbl and owned) then
    keys := 'u._row_id desc, u._parent_id desc, u._account_id desc, u.livemode desc';
    deleted := 'c._deleted or (c._field is not null and c._parent_id is not null and stripe.list_removed(c._source, '
      'c._field, c._account_id, c.livemode, c._group_id, c.created, c._rank, c._stream_seq, c._row_id, $1))';
  end if;
  return format(
    'with c as (select distinct on (%s) u.* from (%s) u '
    'order by %s, u.created desc, u._rank desc, u._stream_seq desc), '
    'w as (select c.*, %s as _deleted_then, case when exists (select 1 from stripe.events x '
    'where x._table = c._source and x._row_id = c._group_id and x._account_id = c._account_id '
    'and x.livemode = c.livemode and x.created = c.created and x._rank = c._rank and x.id <> c._event_id '
    'and (c._field is null or x._raw_data -> ''data'' -> ''object'' -> c._field -> ''data'' '
    '@> jsonb_build_array(jsonb_build_object(''id'', c._row_id)))) '
    'then stripe.version_winner(c._source, c._account_id, c.livemode, c._group_id, c.created, c._rank, c._field, '
    'c._row_id) else c._event_id end as chosen from c offset 0) '
    'select %s from (select w._account_id, w.livemode, w._parent_id, w._row_id, e.id as _event_id, e.created, '
    'e._rank, e._stream_seq, e._applied_at, w._deleted_then as _deleted, w.chosen <> w._event_id as _tied, '
    'case when w._field is null then e._raw_data -> ''data'' -> ''object'' '
    'else stripe.version_object(e._raw_data, w._field, w._row_id) end as _object '
    'from w cross join lateral (select * from stripe.events e where e._account_id = w._account_id '
    'and e.id = w.chosen limit 1) e offset 0) v',
    replace(keys, ' desc', ''), stripe.history_sources(tbl, 'e.created <= $1', '$2'), keys, deleted,
    stripe.history_columns(tbl));
end $$;

select stripe.create_history_views();
