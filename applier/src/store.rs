//! The only SQL of the applier. One statement template per table, built at start from the registry and the tables'
//! columns as the database has them: insert the batch's events (the dedupe), upsert each table's rows under the
//! ordering guard, and replace embedded lists.
//!
//! Typed columns (`email`, `amount`...) are filled in the same statement from the object's JSON, by column type,
//! through the `stripe.j_*` functions that never fail (migrations/0001). They are read from the catalog, so a column
//! added by a migration (or by an operator, for a field Stripe added later) is filled from then on.

use std::collections::{HashMap, HashSet};

use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};

use crate::event::Incoming;
use crate::plan::ObjectRow;
use crate::registry::{ChildList, Key, ObjectSpec, Registry};

/// The migrations in `migrations/`, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Runs pending migrations (safe to run from several processes at once: sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// The SQL rule "does the incoming row replace the stored one" (table alias `t`), mirror of [`crate::plan::supersedes`].
pub const GUARD: &str = "(excluded._last_event_created, excluded.deleted, excluded._last_event_seq) \
    >= (t._last_event_created, t.deleted, t._last_event_seq)";

/// One event's object by primary key, for a LATERAL join. `limit 1` keeps the planner from turning the lookup into a
/// hash join over the whole table when it guesses the batch is large (a sequential scan per batch, growing with the
/// table).
const LOOKUP_EVENT: &str = "select e._raw_data -> 'data' -> 'object' as object from stripe.events e \
    where e._account_id = u.a and e.id = u.e limit 1";

/// The `do update set` of a row's state and ordering fields (typed columns are added per table).
pub const SET_STATE: &str = "_raw_data = excluded._raw_data, livemode = excluded.livemode, deleted = excluded.deleted, \
    _last_event_id = excluded._last_event_id, _last_event_created = excluded._last_event_created, \
    _last_event_seq = excluded._last_event_seq, _updated_at = now()";

/// Statements of one table: its upsert and the replacement of each list it embeds.
#[derive(Debug)]
pub struct TableStatements {
    upsert: String,
    children: Vec<String>,
    columns: Vec<TypedColumn>,
}

/// Every statement, by registry position.
#[derive(Debug)]
pub struct Statements {
    tables: Vec<TableStatements>,
}

/// Columns the applier writes itself, whatever the table: never filled from the object's JSON by name.
const FIXED_COLUMNS: &[&str] = &["id", "livemode", "deleted"];

/// The typed columns of every table in schema `stripe`: plain (not generated) columns named like a Stripe field
/// (no leading `_`), of a type the applier knows how to read from JSON, in column order.
const TYPED_COLUMNS: &str = "select c.relname::text, a.attname::text, format_type(a.atttypid, null) \
    from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace \
    where n.nspname = 'stripe' and c.relkind in ('r', 'p') and a.attnum > 0 and not a.attisdropped \
      and a.attgenerated = '' and left(a.attname, 1) <> '_' \
      and format_type(a.atttypid, null) in ('text', 'bigint', 'numeric', 'boolean', 'jsonb') \
    order by c.relname, a.attnum";

/// A typed column: its name and the expression reading it from the JSON object `source`.
#[derive(Debug, Clone)]
struct TypedColumn {
    name: String,
    data_type: String,
}

impl TypedColumn {
    fn ident(&self) -> String {
        format!("\"{}\"", self.name.replace('"', "\"\""))
    }

    fn read_from(&self, source: &str) -> String {
        let key = format!("'{}'", self.name.replace('\'', "''"));
        match self.data_type.as_str() {
            "text" => format!("stripe.j_text({source} -> {key})"),
            "bigint" => format!("stripe.j_bigint({source} -> {key})"),
            "numeric" => format!("stripe.j_numeric({source} -> {key})"),
            "boolean" => format!("stripe.j_bool({source} -> {key})"),
            _ => format!("nullif({source} -> {key}, 'null')"),
        }
    }
}

/// `(, "a", "b")`, `(, <a from source>, <b from source>)` and `(, "a" = excluded."a", ...)` for a table's columns.
fn typed_parts(columns: &[TypedColumn], source: &str) -> (String, String, String) {
    let mut names = String::new();
    let mut values = String::new();
    let mut sets = String::new();
    for c in columns {
        names += &format!(", {}", c.ident());
        values += &format!(", {}", c.read_from(source));
        sets += &format!(", {0} = excluded.{0}", c.ident());
    }
    (names, values, sets)
}

impl Statements {
    /// Builds the statements of every table in the registry, reading the tables' typed columns from the database.
    pub async fn load(pool: &PgPool, registry: &Registry) -> Result<Self, sqlx::Error> {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as(TYPED_COLUMNS).fetch_all(pool).await?;
        let mut columns: HashMap<String, Vec<TypedColumn>> = HashMap::new();
        for (table, name, data_type) in rows {
            if !FIXED_COLUMNS.contains(&name.as_str()) {
                columns
                    .entry(table)
                    .or_default()
                    .push(TypedColumn { name, data_type });
            }
        }
        let none = Vec::new();
        let of = |table: &str| columns.get(table).unwrap_or(&none);
        let tables = registry
            .objects()
            .iter()
            .map(|spec| TableStatements {
                upsert: upsert_sql(spec, of(&spec.table)),
                children: registry
                    .children_of(&spec.object_type)
                    .iter()
                    .map(|c| children_sql(spec, c, of(&c.child.table)))
                    .collect(),
                columns: of(&spec.table).clone(),
            })
            .collect();
        Ok(Self { tables })
    }
}

impl Statements {
    /// For other writers of the same rows (the benchmark's ceiling): the typed columns of table `index` as
    /// `, "a", "b"`, their values read from the JSON object `source` as `, <a>, <b>`, and `, "a" = excluded."a"...`.
    pub fn typed_columns(&self, index: usize, source: &str) -> (String, String, String) {
        typed_parts(&self.tables[index].columns, source)
    }
}

fn upsert_sql(spec: &ObjectSpec, columns: &[TypedColumn]) -> String {
    let (names, values, sets) = typed_parts(columns, "ev.object");
    let conflict = match spec.key {
        Key::Object | Key::Account | Key::Field => {
            format!("do update set {SET_STATE}{sets} where {GUARD}")
        }
        Key::Event => "do nothing".to_owned(),
    };
    // The object is read from the event just recorded in stripe.events (same transaction): Postgres parses each
    // event's JSON once, not once for the event and again for its object.
    format!(
        "insert into stripe.\"{table}\" as t \
           (_account_id, id, _raw_data, livemode, deleted, _last_event_id, _last_event_created, _last_event_seq{names}) \
         select u.a, u.i, ev.object, u.l, u.d, u.e, u.c, u.s{values} \
         from unnest($1::text[], $2::text[], $3::bool[], $4::bool[], $5::text[], $6::int8[], $7::int8[]) \
           as u(a, i, l, d, e, c, s) \
         cross join lateral ({LOOKUP_EVENT}) ev \
         on conflict (_account_id, id) {conflict} \
         returning _account_id, id",
        table = spec.table
    )
}

/// Replaces the list `child.field` of the given (just applied) parents: upserts every item under the same guard,
/// marks owned items missing from a complete list as deleted, and records lists Stripe cut short (`has_more`).
fn children_sql(parent: &ObjectSpec, child: &ChildList, columns: &[TypedColumn]) -> String {
    let (parent_table, child_table, field) = (&parent.table, &child.child.table, &child.field);
    let (names, values, sets) = typed_parts(columns, "item");
    let (parent_col, parent_val, parent_set) = if child.owned {
        (
            "_parent_id, ",
            "pid, ",
            "_parent_id = excluded._parent_id, ",
        )
    } else {
        ("", "", "")
    };
    let removed = if child.owned {
        format!(
            ", removed as ( \
               update stripe.\"{child_table}\" t set deleted = true, _last_event_id = p.ev, \
                 _last_event_created = p.c, _last_event_seq = p.s, _updated_at = now() \
               from parents p \
               where t._account_id = p.acc and t._parent_id = p.pid and not t.deleted \
                 and jsonb_typeof(p.list -> 'data') = 'array' \
                 and p.list -> 'has_more' is distinct from 'true'::jsonb \
                 and not exists (select 1 from items i where i.acc = t._account_id and i.item ->> 'id' = t.id) \
                 and (p.c, true, p.s) >= (t._last_event_created, t.deleted, t._last_event_seq) \
               returning 1)"
        )
    } else {
        ", removed as (select 1 where false)".to_owned()
    };
    format!(
        "with parents as ( \
           select p.* from unnest($1::text[], $2::text[]) as k(a, i) \
           cross join lateral ( \
             select p._account_id as acc, p.id as pid, p._raw_data -> '{field}' as list, p.livemode, p.deleted, \
               p._last_event_id as ev, p._last_event_created as c, p._last_event_seq as s \
             from stripe.\"{parent_table}\" p where p._account_id = k.a and p.id = k.i limit 1) p), \
         items as ( \
           select distinct on (p.acc, item ->> 'id') p.*, item \
           from parents p cross join lateral jsonb_array_elements( \
             case when jsonb_typeof(p.list -> 'data') = 'array' then p.list -> 'data' else '[]'::jsonb end) as item \
           where jsonb_typeof(item -> 'id') = 'string' \
           order by p.acc, item ->> 'id'), \
         upserted as ( \
           insert into stripe.\"{child_table}\" as t (_account_id, id, {parent_col}_raw_data, livemode, deleted, \
             _last_event_id, _last_event_created, _last_event_seq{names}) \
           select acc, item ->> 'id', {parent_val}item, livemode, deleted, ev, c, s{values} from items \
           on conflict (_account_id, id) do update set {parent_set}{SET_STATE}{sets} where {GUARD} \
           returning 1) \
         {removed}, \
         marked as ( \
           insert into stripe.incomplete_lists (_account_id, parent_table, parent_id, field, child_table, total_count, url) \
           select acc, '{parent_table}', pid, '{field}', '{child_table}', stripe.j_bigint(list -> 'total_count'), \
             list ->> 'url' \
           from parents where list -> 'has_more' = 'true'::jsonb \
           on conflict (_account_id, parent_table, parent_id, field) do update \
             set total_count = excluded.total_count, url = excluded.url, _updated_at = now() \
           returning 1), \
         cleared as ( \
           delete from stripe.incomplete_lists l using parents p \
           where l._account_id = p.acc and l.parent_table = '{parent_table}' and l.parent_id = p.pid \
             and l.field = '{field}' and p.list -> 'has_more' is distinct from 'true'::jsonb \
           returning 1) \
         select (select count(*) from upserted) as upserted, (select count(*) from removed) as removed, \
           (select count(*) from marked) as marked, (select count(*) from cleared) as cleared"
    )
}

/// Records the batch's events in `stripe.events`; returns the keys `(account, id)` that were not there before.
pub async fn insert_events(
    conn: &mut PgConnection,
    events: &[&Incoming],
    platform_account: &str,
) -> Result<HashSet<(String, String)>, sqlx::Error> {
    let mut accounts = Vec::with_capacity(events.len());
    let mut ids = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut created = Vec::with_capacity(events.len());
    let mut livemode = Vec::with_capacity(events.len());
    let mut api_versions = Vec::with_capacity(events.len());
    let mut object_types = Vec::with_capacity(events.len());
    let mut object_ids = Vec::with_capacity(events.len());
    let mut seqs = Vec::with_capacity(events.len());
    let mut bodies = Vec::with_capacity(events.len());
    for e in events {
        accounts.push(e.account.as_deref().unwrap_or(platform_account));
        ids.push(e.id.as_str());
        types.push(e.event_type.as_str());
        created.push(e.created);
        livemode.push(e.livemode);
        api_versions.push(e.api_version.as_deref());
        object_types.push(e.object_type.as_deref());
        object_ids.push(e.object_id.as_deref());
        seqs.push(e.seq as i64);
        bodies.push(e.json());
    }
    let rows = sqlx::query(
        "insert into stripe.events \
           (_account_id, id, type, created, livemode, api_version, object_type, object_id, _stream_seq, _raw_data) \
         select u.a, u.i, u.t, u.c, u.l, u.v, u.ot, u.oi, u.s, u.r::jsonb \
         from unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::bool[], $6::text[], $7::text[], $8::text[], \
           $9::int8[], $10::text[]) as u(a, i, t, c, l, v, ot, oi, s, r) \
         on conflict (_account_id, id) do nothing \
         returning _account_id, id",
    )
    .bind(accounts)
    .bind(ids)
    .bind(types)
    .bind(created)
    .bind(livemode)
    .bind(api_versions)
    .bind(object_types)
    .bind(object_ids)
    .bind(seqs)
    .bind(bodies)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
        .collect())
}

/// Upserts one table's rows under the ordering guard; returns the keys actually written.
pub async fn upsert_rows(
    conn: &mut PgConnection,
    statements: &Statements,
    table_index: usize,
    rows: &[ObjectRow<'_>],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    let sql = &statements.tables[table_index].upsert;
    let applied = sqlx::query(AssertSqlSafe(sql.as_str()))
        .bind(rows.iter().map(|r| r.account).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.id.as_ref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.livemode).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.deleted).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.event_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.created).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.seq).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await?;
    Ok(applied
        .into_iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
        .collect())
}

/// Replaces the embedded lists of the parents just written to a table.
pub async fn replace_children(
    conn: &mut PgConnection,
    statements: &Statements,
    table_index: usize,
    parents: &[(String, String)],
) -> Result<(), sqlx::Error> {
    if parents.is_empty() {
        return Ok(());
    }
    let accounts: Vec<&str> = parents.iter().map(|(a, _)| a.as_str()).collect();
    let ids: Vec<&str> = parents.iter().map(|(_, i)| i.as_str()).collect();
    for sql in &statements.tables[table_index].children {
        sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(&accounts)
            .bind(&ids)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
