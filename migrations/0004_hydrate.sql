-- Hydration (applier/src/hydrate.rs): objects whose rows webhooks could not settle, to be read again from Stripe's
-- API and applied as snapshots. One row per object (a burst of events for one object costs one read), written in
-- the transaction that applied the event that asked for it, so nothing is lost to a crash.
create table stripe.hydrate_queue (
    _account_id text not null,
    livemode boolean not null,
    -- The object's table (its registry entry gives the API path).
    table_name text not null,
    id text not null,
    -- Why: `tie` (a bare same-second tie decided the row), `version` (the event came at another API version than
    -- the pinned one), `list` (an embedded list Stripe cut short), `always` (applier.hydrate = always).
    reason text not null,
    -- Not read before this: a settle delay after the newest event that asked, a lease while a reader holds it, a
    -- backoff after a failure.
    not_before timestamptz not null,
    attempts integer not null default 0,
    -- Another event asked while a reader held the row: read it again after this read.
    dirty boolean not null default false,
    last_error text,
    queued_at timestamptz not null default now(),
    primary key (_account_id, livemode, table_name, id)
);
create index hydrate_queue_due_idx on stripe.hydrate_queue (not_before);

-- When hydration last read the parent of a cut-short list: the sweep that queues such parents skips those read
-- recently (the snapshot may still be on its way through the stream). A new event cutting the list short again
-- clears it.
alter table stripe.incomplete_lists add column hydrated_at timestamptz;
