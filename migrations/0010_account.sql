-- One account id per database (issue 22, 2.6): the `_account_id` the platform's own objects are stored under
-- (STRIPE_ACCOUNT_ID, `applier.account_id`). A process started with another one refuses to run instead of writing
-- every platform object a second time under the other id. docs/operations.md says how to change it on purpose.
create table if not exists stripe.sync_account (
    one boolean primary key default true check (one),
    platform_account text not null,
    pinned_at timestamptz not null default now()
);

comment on table stripe.sync_account is
  'The _account_id of the platform''s own objects in this database (STRIPE_ACCOUNT_ID); see docs/operations.md.';

-- A database synced before this migration: the id its platform events were recorded under (an event that names no
-- connected account), when it has any.
insert into stripe.sync_account (platform_account)
select e._account_id from stripe.events e
where not (e._raw_data ? 'account') and not (e._raw_data ? 'context')
limit 1
on conflict do nothing;
