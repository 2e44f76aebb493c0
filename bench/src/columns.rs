//! Typed columns, two ways, on the batch path: generated columns computed by Postgres from `_raw_data` (what ships)
//! against plain columns whose values the applier extracts from the JSON and binds. Same events, same batches,
//! same guard; only how typed columns get their values differs.

use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool, Row};
use stripe_sync_applier::apply::{Applier, Mode};
use stripe_sync_applier::event::Incoming;
use stripe_sync_applier::plan;
use stripe_sync_applier::registry::Registry;
use stripe_sync_applier::store;
use stripe_sync_testkit::db::TestDb;

/// Events per second of each way.
pub struct Report {
    pub events: usize,
    pub generated_per_sec: f64,
    pub applier_written_per_sec: f64,
}

struct PlainTable {
    columns: Vec<(String, String)>,
    sql: String,
}

async fn plain_tables(
    pool: &PgPool,
    registry: &Registry,
) -> anyhow::Result<Vec<Option<PlainTable>>> {
    sqlx::query("create schema stripe_plain")
        .execute(pool)
        .await?;
    let mut out = Vec::new();
    for spec in registry.objects() {
        let table = &spec.table;
        sqlx::query(AssertSqlSafe(format!(
            "create table stripe_plain.\"{table}\" (like stripe.\"{table}\" including defaults including indexes)"
        )))
        .execute(pool)
        .await?;
        let columns: Vec<(String, String)> = sqlx::query(
            "select column_name::text, data_type::text from information_schema.columns \
             where table_schema = 'stripe' and table_name = $1 and is_generated = 'ALWAYS' order by ordinal_position",
        )
        .bind(table)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        let names: Vec<String> = columns.iter().map(|(c, _)| format!("\"{c}\"")).collect();
        let selects: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, (_, t))| format!("u.c{i}::{t}"))
            .collect();
        let unnests: Vec<String> = (0..columns.len())
            .map(|i| format!("${}::text[]", i + 9))
            .collect();
        let aliases: Vec<String> = (0..columns.len()).map(|i| format!("c{i}")).collect();
        let sets: Vec<String> = names
            .iter()
            .map(|n| format!("{n} = excluded.{n}"))
            .collect();
        let comma = if columns.is_empty() { "" } else { ", " };
        let sql = format!(
            "insert into stripe_plain.\"{table}\" as t (_account_id, id, _raw_data, livemode, deleted, _last_event_id, \
               _last_event_created, _last_event_seq{comma}{names}) \
             select u.a, u.i, u.r::jsonb, u.l, u.d, u.e, u.c, u.s{comma}{selects} \
             from unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::bool[], $6::text[], $7::int8[], $8::int8[]{comma}{unnests}) \
               as u(a, i, r, l, d, e, c, s{comma}{aliases}) \
             on conflict (_account_id, id) do update set _raw_data = excluded._raw_data, livemode = excluded.livemode, \
               deleted = excluded.deleted, _last_event_id = excluded._last_event_id, \
               _last_event_created = excluded._last_event_created, _last_event_seq = excluded._last_event_seq, \
               _updated_at = now(){comma}{sets} \
             where (excluded._last_event_created, excluded._last_event_seq) >= (t._last_event_created, t._last_event_seq)",
            names = names.join(", "),
            selects = selects.join(", "),
            unnests = unnests.join(", "),
            aliases = aliases.join(", "),
            sets = sets.join(", "),
        );
        out.push(Some(PlainTable { columns, sql }));
    }
    Ok(out)
}

/// The applier-side extraction: a typed column's value as text for its cast, the way the j_* functions read it.
fn extract(
    object: &serde_json::Map<String, Value>,
    column: &str,
    data_type: &str,
) -> Option<String> {
    let value = object.get(column)?;
    match (data_type, value) {
        (_, Value::Null) => None,
        ("text", Value::String(s)) => Some(s.clone()),
        ("text", Value::Object(o)) => Some(
            o.get("id")
                .and_then(Value::as_str)
                .map_or_else(|| value.to_string(), str::to_owned),
        ),
        ("text", other) => Some(other.to_string()),
        ("bigint", Value::Number(n)) => n.as_i64().map(|v| v.to_string()),
        ("numeric", Value::Number(n)) => Some(n.to_string()),
        ("boolean", Value::Bool(b)) => Some(b.to_string()),
        ("jsonb", other) => Some(other.to_string()),
        _ => None,
    }
}

async fn apply_plain(
    pool: &PgPool,
    tables: &[Option<PlainTable>],
    events: &[Incoming],
) -> anyhow::Result<()> {
    let registry = Registry::shipped();
    let mut tx = pool.begin().await?;
    let all: Vec<&Incoming> = events.iter().collect();
    let inserted = store::insert_events(&mut tx, &all, "platform").await?;
    let new = all.into_iter().filter(|e| {
        inserted.contains(&(
            e.account.clone().unwrap_or_else(|| "platform".into()),
            e.id.clone(),
        ))
    });
    let plan = plan::plan(new, registry, "platform");
    for (spec, rows) in plan
        .tables
        .iter()
        .flat_map(|t| t.rounds.iter().map(move |r| (t.spec, r)))
    {
        let index = registry.index_of(&spec.object_type).unwrap_or_default();
        let Some(table) = &tables[index] else {
            continue;
        };
        let parsed: Vec<serde_json::Map<String, Value>> = rows
            .iter()
            .map(|r| serde_json::from_str(r.object_json).unwrap_or_default())
            .collect();
        let mut query = sqlx::query(AssertSqlSafe(table.sql.as_str()))
            .bind(rows.iter().map(|r| r.account).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.id.as_ref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.object_json).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.livemode).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.deleted).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.event_id).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.created).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.seq).collect::<Vec<_>>());
        for (column, data_type) in &table.columns {
            query = query.bind(
                parsed
                    .iter()
                    .map(|o| extract(o, column, data_type))
                    .collect::<Vec<_>>(),
            );
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Runs both ways `rounds` times on fresh databases (alternating) and keeps each way's best run.
pub async fn run(events: usize, batch: usize, rounds: usize) -> anyhow::Result<Report> {
    let bodies = crate::events::generate(events, 0.3, 7);
    let parsed: Vec<Incoming> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| Incoming::parse(i as u64 + 1, b))
        .collect::<Result<_, _>>()?;
    let mut best_generated = Duration::MAX;
    let mut best_written = Duration::MAX;
    for _ in 0..rounds {
        let db = TestDb::create().await;
        let pool = db.pool().await;
        store::migrate(&pool).await?;
        let applier = Applier::new(pool.clone(), Registry::shipped(), "platform");
        let start = Instant::now();
        for chunk in parsed.chunks(batch) {
            applier.apply(chunk, Mode::Normal).await?;
        }
        best_generated = best_generated.min(start.elapsed());
        pool.close().await;
        drop(db);

        let db = TestDb::create().await;
        let pool = db.pool().await;
        store::migrate(&pool).await?;
        let tables = plain_tables(&pool, Registry::shipped()).await?;
        let start = Instant::now();
        for chunk in parsed.chunks(batch) {
            apply_plain(&pool, &tables, chunk).await?;
        }
        best_written = best_written.min(start.elapsed());
        pool.close().await;
    }
    Ok(Report {
        events,
        generated_per_sec: events as f64 / best_generated.as_secs_f64(),
        applier_written_per_sec: events as f64 / best_written.as_secs_f64(),
    })
}
