-- Reconcile (applier/src/reconcile.rs): walks Stripe's lists, compares them with the tables, and fixes what differs.

-- One row per reconcile, for operators (and the drift metric): when it ran and what it covered.
create table stripe.reconcile_runs (
    id bigserial primary key,
    -- The object types asked for (empty: every listable type).
    objects text[] not null,
    started_at timestamptz not null default now(),
    finished_at timestamptz
);

-- Drift per run and table: what the walk found different from Stripe's API, and fixed through the stream.
create table stripe.reconcile_tables (
    run_id bigint not null references stripe.reconcile_runs (id) on delete cascade,
    table_name text not null,
    -- Objects the API listed.
    listed bigint not null default 0,
    -- Listed objects whose row differed (published again).
    changed bigint not null default 0,
    -- Listed objects with no row (published).
    added bigint not null default 0,
    -- Rows the list left out that Stripe answers 404 for: deleted with no event (marked deleted).
    deleted bigint not null default 0,
    -- Rows the list left out that still exist (read by id and published again).
    unlisted bigint not null default 0,
    -- Rows the list left out that can't be read by id (400/403 for that object): left as they are.
    unreadable bigint not null default 0,
    -- Why the table was skipped (the account can't list it; rows of connected accounts), if it was.
    skipped text,
    started_at timestamptz not null default now(),
    finished_at timestamptz,
    -- Why the table could not be reconciled (it failed: retries ran out, the key was refused), if it could not.
    error text,
    primary key (run_id, table_name)
);

-- The ids a run's walk saw, so the rows it did not see are found in Postgres, not in memory. Emptied when the
-- table's walk ends; unlogged: a crash loses only a run that is started again anyway.
create unlogged table stripe.reconcile_seen (
    run_id bigint not null,
    table_name text not null,
    id text not null,
    primary key (run_id, table_name, id)
);
