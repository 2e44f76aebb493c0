//! The only SQL of the applier. Statement templates per table, built at start from the registry and the tables'
//! columns as the database has them: record the batch's events (the dedupe), upsert each table's rows under the
//! ordering guard, flag rows a bare same-second tie decided, and keep embedded lists.
//!
//! Typed columns (`email`, `amount`...) are filled in the same statement from the object's JSON, by column type,
//! through the `stripe.j_*` functions that never fail (migrations/0001). They are read from the catalog, so a column
//! added by a migration (or by an operator, for a field Stripe added later) is filled from then on.

use std::collections::{HashMap, HashSet};

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres, Row};

use crate::event::Incoming;
use crate::plan::ObjectRow;
use crate::registry::{ChildList, Key, ObjectSpec, Registry};

/// The migrations in `migrations/`, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The ordering guard, the one place the rule is written: does the write `new` replace the row `old` (table
/// aliases with the ordering columns)? A newer `(created, rank)` wins; equal ones go to `stripe.tie_break` (the
/// events' `previous_attributes`, then stream order). Mirrors the derived order of [`crate::version::Version`].
#[must_use]
pub fn newer(new: &str, old: &str) -> String {
    format!(
        "case when ({new}._last_event_created, {new}._last_event_rank) \
                   is distinct from ({old}._last_event_created, {old}._last_event_rank) \
              then ({new}._last_event_created, {new}._last_event_rank) \
                   > ({old}._last_event_created, {old}._last_event_rank) \
              else stripe.tie_break({old}._account_id, {new}._last_event_id, {new}._last_event_seq, \
                                    {old}._last_event_id, {old}._last_event_seq) > 0 end"
    )
}

/// True when the write `new` replaced `old` on stream order only: same version, and the payloads could not order
/// them. Such rows get `_ambiguous`, for the API side to read again.
fn bare_tie(new: &str, old: &str) -> String {
    format!(
        "({new}._last_event_created, {new}._last_event_rank) = ({old}._last_event_created, {old}._last_event_rank) \
         and abs(stripe.tie_break({old}._account_id, {new}._last_event_id, {new}._last_event_seq, \
                                  {old}._last_event_id, {old}._last_event_seq)) = 1"
    )
}

/// The writes of a statement, bound as arrays `$1..$8` and read back as the relation `w` with these columns.
const WRITES: &str = "unnest($1::text[], $2::bool[], $3::text[], $4::bool[], $5::text[], $6::int8[], $7::int4[], \
    $8::int8[]) as w(account, livemode, id, deleted, event_id, created, rank, seq)";

/// [`WRITES`] with `$9`: whether each write became its row's state (`won`).
const WRITES_WON: &str = "unnest($1::text[], $2::bool[], $3::text[], $4::bool[], $5::text[], $6::int8[], \
    $7::int4[], $8::int8[], $9::bool[]) as w(account, livemode, id, deleted, event_id, created, rank, seq, won)";

/// Binds rows as [`WRITES`] expects them.
fn bind_writes<'q>(
    query: Query<'q, Postgres, PgArguments>,
    rows: &'q [ObjectRow<'_>],
) -> Query<'q, Postgres, PgArguments> {
    query
        .bind(rows.iter().map(|r| r.account).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.livemode).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.id.as_ref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.deleted).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.event_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.version.created).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.version.rank.get())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.seq).collect::<Vec<_>>())
}

/// The object a write carries, read from its event as just recorded (same transaction): Postgres parses each
/// event's JSON once. `limit 1` keeps the planner from a hash join over the whole events table.
const EVENT_OBJECT: &str = "select e._raw_data -> 'data' -> 'object' as object from stripe.events e \
    where e._account_id = w.account and e.id = w.event_id limit 1";

/// The ordering columns and the row's state, as `insert` names them.
pub const STATE_COLUMNS: &str =
    "deleted, _last_event_id, _last_event_created, _last_event_rank, _last_event_seq, _raw_data";
/// The same, as `do update set` takes them over from `excluded`.
pub const SET_STATE: &str = "deleted = excluded.deleted, _last_event_id = excluded._last_event_id, \
    _last_event_created = excluded._last_event_created, _last_event_rank = excluded._last_event_rank, \
    _last_event_seq = excluded._last_event_seq, _raw_data = excluded._raw_data, _updated_at = now()";

/// Statements of one table.
#[derive(Debug)]
pub struct TableStatements {
    upsert: String,
    tie_losers: String,
    lists: Vec<String>,
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

/// A typed column: its name and type.
#[derive(Debug, Clone)]
struct TypedColumn {
    name: String,
    data_type: String,
}

impl TypedColumn {
    fn ident(&self) -> String {
        format!("\"{}\"", self.name.replace('"', "\"\""))
    }

    /// The expression reading this column from the JSON object `source`.
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

/// A table's typed columns as `, "a", "b"`, their values read from `source` as `, <a>, <b>`, and
/// `, "a" = excluded."a", ...`.
struct Typed {
    names: String,
    values: String,
    sets: String,
}

fn typed(columns: &[TypedColumn], source: &str) -> Typed {
    let mut out = Typed {
        names: String::new(),
        values: String::new(),
        sets: String::new(),
    };
    for c in columns {
        out.names += &format!(", {}", c.ident());
        out.values += &format!(", {}", c.read_from(source));
        out.sets += &format!(", {0} = excluded.{0}", c.ident());
    }
    out
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
                tie_losers: tie_losers_sql(spec),
                lists: registry
                    .children_of(&spec.object_type)
                    .iter()
                    .map(|c| list_sql(spec, c, of(&c.child.table)))
                    .collect(),
                columns: of(&spec.table).clone(),
            })
            .collect();
        Ok(Self { tables })
    }

    /// For other writers of the same rows (the benchmark's ceiling): the typed columns of table `index` as
    /// `, "a", "b"`, their values read from the JSON object `source` as `, <a>, <b>`, and `, "a" = excluded."a"...`.
    #[must_use]
    pub fn typed_columns(&self, index: usize, source: &str) -> (String, String, String) {
        let t = typed(&self.tables[index].columns, source);
        (t.names, t.values, t.sets)
    }
}

/// The conflict target of a table: its primary key (an owned list's items are keyed within their parent).
fn key_columns(owned_child: bool) -> &'static str {
    if owned_child {
        "_account_id, livemode, _parent_id, id"
    } else {
        "_account_id, livemode, id"
    }
}

fn upsert_sql(spec: &ObjectSpec, columns: &[TypedColumn]) -> String {
    let t = typed(columns, "ev.object");
    let on_conflict = match spec.key {
        Key::Event => "do nothing".to_owned(),
        Key::Object | Key::Account | Key::Field => format!(
            "do update set {SET_STATE}, _ambiguous = {tie}{sets} where {guard}",
            tie = bare_tie("excluded", "t"),
            sets = t.sets,
            guard = newer("excluded", "t"),
        ),
    };
    format!(
        "insert into stripe.\"{table}\" as t (_account_id, livemode, id, {STATE_COLUMNS}{names}) \
         select w.account, w.livemode, w.id, w.deleted, w.event_id, w.created, w.rank, w.seq, ev.object{values} \
         from {WRITES} cross join lateral ({EVENT_OBJECT}) ev \
         on conflict ({key}) {on_conflict} \
         returning _account_id, livemode, id, _ambiguous",
        table = spec.table,
        key = key_columns(false),
        names = t.names,
        values = t.values,
    )
}

/// Flags rows that kept their state over a write of the same version on stream order only (a bare tie lost by the
/// newcomer): they are as ambiguous as rows a bare tie gave a new state.
fn tie_losers_sql(spec: &ObjectSpec) -> String {
    format!(
        "update stripe.\"{table}\" as t set _ambiguous = true, _updated_at = now() \
         from {WRITES} \
         where t._account_id = w.account and t.livemode = w.livemode and t.id = w.id and not t._ambiguous \
           and (t._last_event_created, t._last_event_rank) = (w.created, w.rank) \
           and stripe.tie_break(t._account_id, w.event_id, w.seq, t._last_event_id, t._last_event_seq) = -1 \
         returning t._account_id, t.livemode, t.id",
        table = spec.table
    )
}

/// Keeps the embedded list `child.field` of a round of parent writes ([`WRITES_WON`]: each write, won or not, and
/// whether it became the parent's state).
///
/// - Every write's list adds or updates its items, each under the guard with the parent write's version, so an
///   item's data comes from the newest parent state that names it, whatever order states arrive in.
/// - An owned item is `deleted` from the first parent state after the newest one naming it that is a tombstone or
///   holds the complete list (migrations/0009, `stripe.list_removed`: the same rule history reads by). A removal
///   is not a tombstone: it changes no version, and the item comes back when a newer state names it. A list Stripe
///   cut short (`has_more`), or a parent whose payload lacks the list (charges' `refunds` since API version
///   2022-11-15), decides nothing: it neither removes an item nor brings a removed one back.
/// - An item with events of its own (not owned: a refund in a charge's list) is ranked by its own forward-only
///   fields as a snapshot of the parent's second, so its own change event of that second is the newer state.
/// - `stripe.incomplete_lists` records the parents whose current list is cut short, and forgets those whose
///   current list is complete; a parent without the list changes neither.
fn list_sql(parent: &ObjectSpec, child: &ChildList, columns: &[TypedColumn]) -> String {
    let (parent_table, child_table, field) = (&parent.table, &child.child.table, &child.field);
    let t = typed(columns, "i.item");
    let complete = |list: &str| {
        format!(
            "(jsonb_typeof({list} -> 'data') is not distinct from 'array' \
              and {list} -> 'has_more' is distinct from 'true'::jsonb)"
        )
    };
    // The ids of a parent write's list, read once per parent write.
    let names = |p: &str, id: &str| format!("{id} = any({p}.list_ids)");
    let (parent_column, parent_value, item_key, item_deleted, flagged, item_rank) = if child.owned {
        (
            "_parent_id, ",
            "i.id, ",
            "p.account, p.livemode, p.id, item ->> 'id'",
            // The write that became the parent's state: its items are deleted when it is a tombstone. A write that
            // lost: also when a parent version after it removed the item (stripe.list_removed, the rule history
            // reads by).
            format!(
                "case when i.won then i.parent_deleted else (i.parent_deleted or stripe.list_removed('{parent_table}', \
                 '{field}', i.account, i.livemode, i.id, i.created, i.rank, i.seq, i.item ->> 'id')) end"
            ),
            // Every write that decides the list (a tombstone, a complete list), won or not, removes the items it
            // does not name whose state is older than it. A cut-short or absent list removes nothing, and nothing
            // but a newer write naming an item brings it back.
            format!(
                "update stripe.\"{child_table}\" as t set deleted = true, _updated_at = now() \
                 from parents p \
                 where (p.deleted or {decides}) and t._account_id = p.account and t.livemode = p.livemode \
                   and t._parent_id = p.id and not t.deleted and not {named} \
                   and (t._last_event_created, t._last_event_rank, t._last_event_seq) < (p.created, p.rank, p.seq) \
                 returning 1",
                decides = complete("p.list"),
                named = names("p", "t.id"),
            ),
            // An owned item has no life of its own: it is as new as the parent state that lists it.
            "i.rank".to_owned(),
        )
    } else {
        (
            "",
            "",
            "p.account, p.livemode, item ->> 'id'",
            "i.parent_deleted".to_owned(),
            "select 1 where false".to_owned(),
            // An item with its own events (a refund in a charge's list) is ranked by its own fields, as a snapshot
            // of the parent's second: its own change event of that second is newer than the parent's copy.
            format!(
                "(case when i.parent_deleted then {tombstone} else 0 end) + 10 * ({progress}) + {snapshot}",
                tombstone = crate::version::Rank::new(true, 0, crate::version::Kind::Created).get(),
                progress = progress_sql("i.item", &child.child.forward_only),
                snapshot = crate::version::Kind::Snapshot as i32,
            ),
        )
    };
    // A write that lost: its list, from its event (a winner's is the parent's current list, read anyway).
    let event_list = format!(
        "select e._raw_data -> 'data' -> 'object' -> '{field}' from stripe.events e \
         where e._account_id = w.account and e.id = w.event_id limit 1"
    );
    format!(
        "with writes as ( \
           select w.*, cur.list as current_list, cur.deleted as parent_deleted, \
             case when w.won then cur.list else ({event_list}) end as list \
           from {WRITES_WON} \
           cross join lateral (select p._raw_data -> '{field}' as list, p.deleted from stripe.\"{parent_table}\" p \
             where p._account_id = w.account and p.livemode = w.livemode and p.id = w.id limit 1) cur), \
         parents as ( \
           select w.*, array(select named ->> 'id' from jsonb_array_elements(case when jsonb_typeof(w.list -> 'data') \
             = 'array' then w.list -> 'data' else '[]'::jsonb end) as named) as list_ids \
           from writes w), \
         items as ( \
           select distinct on ({item_key}) p.*, item \
           from parents p cross join lateral jsonb_array_elements( \
             case when jsonb_typeof(p.list -> 'data') = 'array' then p.list -> 'data' else '[]'::jsonb end) as item \
           where jsonb_typeof(item -> 'id') = 'string' \
           order by {item_key}, p.created desc, p.rank desc, p.seq desc), \
         upserted as ( \
           insert into stripe.\"{child_table}\" as t (_account_id, livemode, id, {parent_column}{STATE_COLUMNS}{names}) \
           select i.account, i.livemode, i.item ->> 'id', {parent_value}{item_deleted}, i.event_id, i.created, \
             {item_rank}, i.seq, i.item{values} \
           from items i \
           on conflict ({key}) do update set {SET_STATE}{sets} where {guard} \
           returning 1), \
         flagged as ({flagged}), \
         marked as ( \
           insert into stripe.incomplete_lists \
             (_account_id, livemode, parent_table, parent_id, field, child_table, total_count, url) \
           select account, livemode, '{parent_table}', id, '{field}', '{child_table}', \
             stripe.j_bigint(current_list -> 'total_count'), current_list ->> 'url' \
           from parents where won and current_list -> 'has_more' = 'true'::jsonb \
           on conflict (_account_id, livemode, parent_table, parent_id, field) do update \
             set total_count = excluded.total_count, url = excluded.url, _updated_at = now(), hydrated_at = null \
           returning 1), \
         cleared as ( \
           delete from stripe.incomplete_lists l using parents p \
           where p.won and l._account_id = p.account and l.livemode = p.livemode \
             and l.parent_table = '{parent_table}' and l.parent_id = p.id and l.field = '{field}' and {current_complete} \
           returning 1) \
         select (select count(*) from upserted) as upserted, (select count(*) from flagged) as flagged, \
           (select count(*) from marked) as marked, (select count(*) from cleared) as cleared",
        key = key_columns(child.owned),
        current_complete = complete("p.current_list"),
        names = t.names,
        values = t.values,
        sets = t.sets,
        guard = newer("excluded", "t"),
    )
}

/// How many of the forward-only `fields` the JSON object `object` has set, as SQL: the count [`Incoming`] makes
/// of an event's object (a number, a string or `true`; an object counts its members set so).
fn progress_sql(object: &str, fields: &[String]) -> String {
    let set =
        |v: &str| format!("(jsonb_typeof({v}) in ('number', 'string') or {v} = 'true'::jsonb)");
    if fields.is_empty() {
        return "0".to_owned();
    }
    fields
        .iter()
        .map(|f| {
            let v = format!("({object} -> '{}')", f.replace('\'', "''"));
            format!(
                "case when jsonb_typeof({v}) = 'object' \
                   then (select count(*)::int from jsonb_each({v}) m where {member}) else {scalar}::int end",
                member = set("m.value"),
                scalar = set(&v),
            )
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

/// Records the batch's events in `stripe.events`; returns the keys `(account, id)` that were not there before.
pub async fn insert_events(
    conn: &mut PgConnection,
    events: &[&Incoming],
    registry: &Registry,
    platform_account: &str,
) -> Result<HashSet<(String, String)>, sqlx::Error> {
    let placed: Vec<_> = events
        .iter()
        .map(|e| crate::plan::placement(e, registry, platform_account))
        .collect();
    let rows = sqlx::query(
        "insert into stripe.events \
           (_account_id, id, type, created, livemode, api_version, object_type, object_id, _stream_seq, _raw_data, \
            _table, _row_id, _rank) \
         select e.account, e.id, e.type, e.created, e.livemode, e.api_version, e.object_type, e.object_id, e.seq, \
           e.body::jsonb, e.tbl, e.row_id, e.rank \
         from unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::bool[], $6::text[], $7::text[], $8::text[], \
           $9::int8[], $10::text[], $11::text[], $12::text[], $13::int4[]) \
           as e(account, id, type, created, livemode, api_version, object_type, object_id, seq, body, tbl, row_id, rank) \
         on conflict (_account_id, id) do nothing \
         returning _account_id, id",
    )
    .bind(
        events
            .iter()
            .map(|e| e.account.as_deref().unwrap_or(platform_account))
            .collect::<Vec<_>>(),
    )
    .bind(events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.created).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.livemode()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.api_version.as_deref()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.object_type.as_deref()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.object_id.as_deref()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.seq as i64).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.json()).collect::<Vec<_>>())
    .bind(placed.iter().map(|p| p.as_ref().map(|p| p.0)).collect::<Vec<_>>())
    .bind(placed.iter().map(|p| p.as_ref().map(|p| p.1.as_ref())).collect::<Vec<_>>())
    .bind(
        events
            .iter()
            .zip(&placed)
            .map(|(e, p)| p.as_ref().map_or_else(|| unplaced_rank(e), |p| p.2))
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
        .collect())
}

/// The `_rank` of an event that writes no row: set all the same, so that a null `_rank` means "recorded before
/// history" (migrations/0006), an event retention must not take for one without a row.
pub fn unplaced_rank(event: &Incoming) -> i32 {
    crate::version::Rank::new(false, 0, event.kind()).get()
}

/// The place in the stream's order each of these events was recorded with when first applied (for `replay
/// --force`: a copy Stripe sent again later must not take a later place).
pub async fn recorded_seqs(
    conn: &mut PgConnection,
    keys: &[(&str, &str)],
) -> Result<HashMap<(String, String), i64>, sqlx::Error> {
    let rows = sqlx::query(
        "select e._account_id, e.id, e._stream_seq \
         from unnest($1::text[], $2::text[]) as k(account, id) \
         join stripe.events e on e._account_id = k.account and e.id = k.id",
    )
    .bind(keys.iter().map(|k| k.0).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get::<i64, _>(2)))
        .collect())
}

/// The `snapshot_event`s of these thin events that are recorded already (the v1 event of the same change came
/// first: the thin event needs no read). Looked up in the thin event's own account.
pub async fn recorded_snapshot_events(
    conn: &mut PgConnection,
    events: &[(&str, &str)],
) -> Result<HashSet<String>, sqlx::Error> {
    if events.is_empty() {
        return Ok(HashSet::new());
    }
    sqlx::query_scalar(
        "select e.id from unnest($1::text[], $2::text[]) as k(account, id) \
         join stripe.events e on e._account_id = k.account and e.id = k.id",
    )
    .bind(events.iter().map(|k| k.0).collect::<Vec<_>>())
    .bind(events.iter().map(|k| k.1).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await
    .map(|ids: Vec<String>| ids.into_iter().collect())
}

/// A row a write produced: its key, and whether a bare tie decided it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Written {
    /// `(_account_id, livemode, id)`.
    pub key: (String, bool, String),
    /// The row's `_ambiguous` after the write.
    pub ambiguous: bool,
}

/// Upserts one round of a table's rows under the ordering guard; returns the rows actually written.
pub async fn upsert_rows(
    conn: &mut PgConnection,
    statements: &Statements,
    table_index: usize,
    rows: &[ObjectRow<'_>],
) -> Result<Vec<Written>, sqlx::Error> {
    let sql = &statements.tables[table_index].upsert;
    let written = bind_writes(sqlx::query(AssertSqlSafe(sql.as_str())), rows)
        .fetch_all(&mut *conn)
        .await?;
    Ok(written
        .into_iter()
        .map(|r| Written {
            key: (r.get(0), r.get(1), r.get(2)),
            ambiguous: r.get(3),
        })
        .collect())
}

/// Flags the rows that kept their state over `losers` (writes the guard refused) on stream order only; returns
/// their keys `(_account_id, livemode, id)`.
pub async fn flag_tie_losers(
    conn: &mut PgConnection,
    statements: &Statements,
    table_index: usize,
    losers: &[ObjectRow<'_>],
) -> Result<Vec<(String, bool, String)>, sqlx::Error> {
    if losers.is_empty() {
        return Ok(Vec::new());
    }
    let sql = &statements.tables[table_index].tie_losers;
    let rows = bind_writes(sqlx::query(AssertSqlSafe(sql.as_str())), losers)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect()
}

/// Keeps the embedded lists of a round of parent writes; `won[i]` says whether `rows[i]` became the parent's state.
pub async fn keep_lists(
    conn: &mut PgConnection,
    statements: &Statements,
    table_index: usize,
    rows: &[ObjectRow<'_>],
    won: &[bool],
) -> Result<(), sqlx::Error> {
    for sql in &statements.tables[table_index].lists {
        bind_writes(sqlx::query(AssertSqlSafe(sql.as_str())), rows)
            .bind(won)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The epoch of the events stream created at `created` (see `stripe.stream_epochs`): the one recorded, or the next
/// one for a stream not seen before. The first stream a database sees gets 0.
pub async fn stream_epoch(
    pool: &PgPool,
    stream: &str,
    created: time::OffsetDateTime,
) -> Result<i32, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("lock table stripe.stream_epochs in exclusive mode")
        .execute(&mut *tx)
        .await?;
    let epoch: i32 = sqlx::query_scalar(
        "with found as (select epoch from stripe.stream_epochs where stream = $1 and created = $2), \
         added as ( \
           insert into stripe.stream_epochs (epoch, stream, created) \
           select coalesce((select max(epoch) + 1 from stripe.stream_epochs), 0), $1, $2 \
           where not exists (select 1 from found) \
           returning epoch) \
         select epoch from found union all select epoch from added",
    )
    .bind(stream)
    .bind(created)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(epoch)
}

/// Bits of a stream sequence in the applier's order: a stream incarnation can hold 2^40 events.
pub const EPOCH_SHIFT: u32 = 40;

/// The applier's order of a message: its stream sequence within its stream's epoch.
#[must_use]
pub fn order_of(epoch: i32, stream_seq: u64) -> u64 {
    ((epoch.max(0) as u64) << EPOCH_SHIFT) | (stream_seq & ((1 << EPOCH_SHIFT) - 1))
}
