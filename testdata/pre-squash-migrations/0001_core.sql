-- stripe-sync core: the schema, the JSON reading functions typed columns are built from, and the events table.

create schema if not exists stripe;

-- Typed columns read Stripe's JSON through these functions. They never raise: a value of an unexpected type or
-- range (a new enum value, an amount beyond bigint, a string that became an object) reads as null in the typed
-- column, while `_raw_data` keeps it exactly. So no future payload can fail an insert.

-- Text: a JSON string as is; an expanded object as its id; anything else as its JSON text.
create function stripe.j_text(j jsonb) returns text
language sql immutable parallel safe as $$
  select case jsonb_typeof(j)
    when 'string' then j #>> '{}'
    when 'null' then null
    when 'object' then coalesce(j ->> 'id', j::text)
    else j::text
  end
$$;

-- Integer amounts, counts and unix timestamps: a JSON integer within bigint's range, else null.
create function stripe.j_bigint(j jsonb) returns bigint
language sql immutable parallel safe as $$
  select case
    when jsonb_typeof(j) = 'number'
      and j::numeric between -9223372036854775808 and 9223372036854775807
      and j::numeric = trunc(j::numeric)
    then j::numeric::bigint
  end
$$;

-- Any JSON number, exactly.
create function stripe.j_numeric(j jsonb) returns numeric
language sql immutable parallel safe as $$
  select case when jsonb_typeof(j) = 'number' then j::numeric end
$$;

-- A JSON boolean.
create function stripe.j_bool(j jsonb) returns boolean
language sql immutable parallel safe as $$
  select case when jsonb_typeof(j) = 'boolean' then j::boolean end
$$;

-- Every event the applier has applied, once per (account, id): the dedupe record, and the history.
create table stripe.events (
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

create index events_object_idx on stripe.events (object_id);
create index events_created_idx on stripe.events (created);

-- Parents whose embedded list (e.g. a subscription's `items`) had more entries than Stripe embedded
-- (`has_more`): the child table lacks some of that parent's rows until they are fetched from the API.
create table stripe.incomplete_lists (
    _account_id text not null,
    parent_table text not null,
    parent_id text not null,
    field text not null,
    child_table text not null,
    total_count bigint,
    url text,
    _updated_at timestamptz not null default now(),
    primary key (_account_id, parent_table, parent_id, field)
);
