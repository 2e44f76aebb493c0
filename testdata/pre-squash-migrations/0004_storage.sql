-- Storage tuned for the write path (measured in docs/benchmarks.md):
-- 1. lz4 instead of pglz to compress large JSON values (pglz was a fifth of Postgres's CPU on the batch path),
--    where the server supports it.
-- 2. Embedded lists (`items`, `lines`, `refunds`...) are child tables and stay in `_raw_data`; a jsonb copy of them
--    in a generated column doubled the bytes written for the biggest objects, so those columns go.
-- 3. stripe.events: a BRIN index on `created` (tiny, cheap to keep up as events arrive in time order) instead of a
--    btree.
-- 4. See below.

create function stripe.use_lz4() returns void language plpgsql as $$
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

do $$
declare
  col record;
begin
  for col in
    select * from (values
      ('accounts', 'external_accounts'), ('application_fees', 'refunds'), ('charges', 'refunds'),
      ('credit_notes', 'lines'), ('customers', 'sources'), ('customers', 'subscriptions'), ('customers', 'tax_ids'),
      ('entitlements_active_entitlement_summaries', 'entitlements'), ('files', 'links'), ('invoices', 'lines'),
      ('subscriptions', 'items'), ('transfers', 'reversals'), ('checkout_sessions', 'line_items')
    ) as l(table_name, column_name)
  loop
    execute format('alter table stripe.%I drop column if exists %I', col.table_name, col.column_name);
  end loop;
end $$;

drop index stripe.events_created_idx;
create index events_created_brin on stripe.events using brin (created);

-- 4. The JSON readers get SQL-standard bodies: stored parsed, so the planner inlines them into the ~60 generated
--    column expressions of each insert without parsing their text again (measured: a few % on the batch path).
create or replace function stripe.j_text(j jsonb) returns text
language sql immutable parallel safe
return case jsonb_typeof(j)
  when 'string' then j #>> '{}'
  when 'null' then null
  when 'object' then coalesce(j ->> 'id', j::text)
  else j::text
end;

create or replace function stripe.j_bigint(j jsonb) returns bigint
language sql immutable parallel safe
return case
  when jsonb_typeof(j) = 'number'
    and j::numeric between -9223372036854775808 and 9223372036854775807
    and j::numeric = trunc(j::numeric)
  then j::numeric::bigint
end;

create or replace function stripe.j_numeric(j jsonb) returns numeric
language sql immutable parallel safe
return case when jsonb_typeof(j) = 'number' then j::numeric end;

create or replace function stripe.j_bool(j jsonb) returns boolean
language sql immutable parallel safe
return case when jsonb_typeof(j) = 'boolean' then j::boolean end;

select stripe.use_lz4();
