-- The API side's bookkeeping: backfill runs and their checkpoints, so a backfill killed at any moment continues where
-- it stopped (applier/src/backfill.rs).

-- One `stripe-sync-applier backfill` (or `sync <table>`, or `POST /backfill`): what it was asked for.
create table stripe.backfill_runs (
    id bigserial primary key,
    -- Object types asked for, in registry order; empty = every listable type.
    objects text[] not null,
    -- Only objects created at or after this unix second.
    since bigint not null,
    connected_accounts boolean not null,
    started_at timestamptz not null default now(),
    finished_at timestamptz
);

-- A range of one object type of one account, paged newest first: `created` in [range_start, range_end), after
-- `cursor` (the last object published). A range can be split while it is paged, so one type's pages go out in
-- parallel; a finished range has `done`.
create table stripe.backfill_ranges (
    id bigserial primary key,
    run_id bigint not null references stripe.backfill_runs (id) on delete cascade,
    _account_id text not null,
    object_type text not null,
    range_start bigint not null,
    range_end bigint not null,
    cursor text,
    cursor_created bigint,
    objects bigint not null default 0,
    done boolean not null default false,
    -- Why the type was skipped (a product not enabled on the account), if it was.
    skipped text,
    _updated_at timestamptz not null default now()
);
create index backfill_ranges_type_idx on stripe.backfill_ranges (run_id, _account_id, object_type);
