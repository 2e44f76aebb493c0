-- stripe-sync core: the schema, the JSON readers typed columns are filled with, the events table, the ordering
-- tie-break and the bookkeeping tables. Object tables are in 0002 (generated from the registry).
--
-- Every statement here can run on a database that already has an older version of it: the applier runs this file
-- again when it adopts a database migrated before migrations 0001-0005 were squashed (applier/src/migrate.rs).

create schema if not exists stripe;

-- Typed columns read Stripe's JSON through these functions. They never raise: a value of an unexpected type or
-- range (a new enum value, an amount beyond bigint, a string that became an object) reads as null in the typed
-- column, while `_raw_data` keeps it exactly. So no future payload can fail an insert. SQL-standard bodies are
-- stored parsed, so the planner inlines them without parsing their text again.

-- Text: a JSON string as is; an expanded object as its id; anything else as its JSON text.
create or replace function stripe.j_text(j jsonb) returns text
language sql immutable parallel safe
return case jsonb_typeof(j)
  when 'string' then j #>> '{}'
  when 'null' then null
  when 'object' then coalesce(j ->> 'id', j::text)
  else j::text
end;

-- Integer amounts, counts and unix timestamps: a JSON integer within bigint's range, else null.
create or replace function stripe.j_bigint(j jsonb) returns bigint
language sql immutable parallel safe
return case
  when jsonb_typeof(j) = 'number'
    and j::numeric between -9223372036854775808 and 9223372036854775807
    and j::numeric = trunc(j::numeric)
  then j::numeric::bigint
end;

-- Any JSON number, exactly.
create or replace function stripe.j_numeric(j jsonb) returns numeric
language sql immutable parallel safe
return case when jsonb_typeof(j) = 'number' then j::numeric end;

-- A JSON boolean.
create or replace function stripe.j_bool(j jsonb) returns boolean
language sql immutable parallel safe
return case when jsonb_typeof(j) = 'boolean' then j::boolean end;

-- lz4 compresses JSON about 5x faster than the default pglz, which took a fifth of Postgres's CPU on the batch path
-- (docs/benchmarks.md). Used where the server supports it.
create or replace function stripe.use_lz4() returns void language plpgsql as $$
declare
  col record;
begin
  if not exists (select 1 from pg_settings where name = 'default_toast_compression' and 'lz4' = any(enumvals)) then
    return;
  end if;
  for col in
    select c.table_name, c.column_name from information_schema.columns c
    where c.table_schema = 'stripe' and c.data_type in ('jsonb', 'text')
  loop
    execute format('alter table stripe.%I alter column %I set compression lz4', col.table_name, col.column_name);
  end loop;
end $$;

comment on function stripe.use_lz4() is
  'Sets lz4 compression on every jsonb and text column of schema stripe, when the server supports lz4. Migrations '
  'that add tables call it.';

-- Every event the applier has applied, once per (account, id): the dedupe record, and the history.
create table if not exists stripe.events (
    _account_id text not null,
    id text not null,
    type text not null,
    created bigint not null,
    livemode boolean,
    api_version text,
    object_type text,
    object_id text,
    _stream_seq bigint not null,
    _raw_data jsonb not null,
    _applied_at timestamptz not null default now(),
    primary key (_account_id, id)
);

create index if not exists events_object_idx on stripe.events (object_id);
-- BRIN: tiny, and cheap to keep up as events arrive in time order (a btree cost 7 % of apply throughput).
create index if not exists events_created_brin on stripe.events using brin (created);

-- Parents whose embedded list (e.g. a subscription's `items`) had more entries than Stripe embedded
-- (`has_more`): the child table lacks some of that parent's rows until they are fetched from the API.
create table if not exists stripe.incomplete_lists (
    _account_id text not null,
    parent_table text not null,
    parent_id text not null,
    field text not null,
    child_table text not null,
    total_count bigint,
    url text,
    _updated_at timestamptz not null default now(),
    livemode boolean not null,
    primary key (_account_id, livemode, parent_table, parent_id, field)
);

-- Each incarnation of the events stream the applier has seen. A stream deleted and created again numbers its
-- events from 1 again; the applier orders events by `(epoch << 40) + stream sequence`, so events of a newer
-- incarnation still come after every event of an older one (docs/design.md, "The ordering rule").
create table if not exists stripe.stream_epochs (
    epoch integer primary key,
    stream text not null,
    created timestamptz not null,
    first_seen timestamptz not null default now(),
    unique (stream, created)
);

-- Orders two writes of one row whose event second and rank are equal (docs/design.md, "The ordering rule"), from
-- the two events as recorded in stripe.events:
--    2  the new write wins on the payloads: the new event's `previous_attributes` describe the old event's object
--       (so the new change came after it), or both objects are identical (nothing to decide; stream order);
--    1  the new write wins on stream order only (a bare tie: the payloads could not order them);
--   -1, -2  the same for the old write; 0  the same event.
-- Only called for ties, which are rare: the guard compares (created, rank) first.
create or replace function stripe.tie_break(account text, new_event text, new_seq bigint, old_event text,
                                            old_seq bigint) returns integer
language plpgsql stable as $$
declare
  new_data jsonb;
  old_data jsonb;
  new_after boolean;
  old_after boolean;
  later integer := case when new_seq >= old_seq then 1 else -1 end;
begin
  if new_event is not distinct from old_event then
    return 0;
  end if;
  select e._raw_data -> 'data' into new_data from stripe.events e where e._account_id = account and e.id = new_event;
  select e._raw_data -> 'data' into old_data from stripe.events e where e._account_id = account and e.id = old_event;
  if new_data -> 'object' = old_data -> 'object' then
    return 2 * later;
  end if;
  new_after := coalesce(jsonb_typeof(new_data -> 'previous_attributes') = 'object'
    and new_data -> 'previous_attributes' <> '{}'::jsonb
    and (old_data -> 'object') @> (new_data -> 'previous_attributes'), false);
  old_after := coalesce(jsonb_typeof(old_data -> 'previous_attributes') = 'object'
    and old_data -> 'previous_attributes' <> '{}'::jsonb
    and (new_data -> 'object') @> (old_data -> 'previous_attributes'), false);
  if new_after and not old_after then
    return 2;
  elsif old_after and not new_after then
    return -2;
  end if;
  return later;
end $$;

select stripe.use_lz4();
