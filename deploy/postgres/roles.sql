-- Least-privilege roles for stripe-sync, for a new database. Run once as a superuser (or your managed Postgres's
-- admin role) in the database stripe-sync will write to, after replacing the password (start it with a letter):
--   psql "postgres://admin@db.example.com:5432/stripe?sslmode=verify-full" -f deploy/postgres/roles.sql
-- Then give the applier DATABASE_URL=postgres://stripe_sync:<password>@db.example.com:5432/stripe?sslmode=verify-full
-- (add &sslrootcert=/path/ca.pem for a private CA). Checked by applier/tests/applier/postgres_tls.rs.

-- The applier (and its operator commands): no superuser, no CREATEDB, no CREATEROLE. It owns only what it makes.
create role stripe_sync login password 'change-me' nosuperuser nocreatedb nocreaterole noinherit;
-- An admin that is not a superuser (managed Postgres 16+) needs the role's membership for the next statements.
grant stripe_sync to current_user;
-- Schema `stripe` holds the tables; schema `stripe_sync` (named after the role: first on its search path, as
-- "$user") its migration history, so it needs no CREATE on `public` (Postgres 15 grants none) nor on the database.
create schema if not exists stripe authorization stripe_sync;
create schema if not exists stripe_sync authorization stripe_sync;
-- The first migration says `create schema if not exists stripe`, which Postgres checks against CREATE on the
-- database even when the schema exists: that privilege (make schemas in this database), nothing more.
do $$ begin execute format('grant create on database %I to stripe_sync', current_database()); end $$;

-- Analysts: read the tables, change nothing. Grant it to people's own roles: `grant stripe_reader to alice;`.
create role stripe_reader nologin;
grant usage on schema stripe to stripe_reader;
grant select on all tables in schema stripe to stripe_reader;
alter default privileges for role stripe_sync in schema stripe grant select on tables to stripe_reader;
