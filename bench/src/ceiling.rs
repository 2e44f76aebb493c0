//! The applier's ceiling: Postgres doing the same writes by its own fastest batched path, COPY into a staging table
//! then `INSERT ... ON CONFLICT` per table, in batches of 500, on the same tables (typed columns, indexes, guard),
//! with the same events split over connections by partition as appliers split them. No NATS, no parsing timed.

use std::str::FromStr as _;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Executor, PgPool};
use stripe_sync_applier::event::Incoming;
use stripe_sync_applier::registry::Registry;
use stripe_sync_applier::store::Statements;
use stripe_sync_applier::store::{GUARD, SET_STATE};
use stripe_sync_shared::subjects::Topology;
use stripe_sync_testkit::db::TestDb;

/// The best rate over the connection counts tried.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ceiling {
    pub events: u64,
    pub batch: usize,
    /// (connections, events/s).
    pub by_connections: Vec<(usize, f64)>,
    pub best: f64,
}

/// Quotes a CSV field.
fn csv(out: &mut String, value: Option<&str>) {
    if let Some(v) = value {
        out.push('"');
        for c in v.chars() {
            if c == '"' {
                out.push('"');
            }
            out.push(c);
        }
        out.push('"');
    }
}

fn staging_rows(events: &[&Incoming], registry: &Registry) -> String {
    let mut out = String::with_capacity(events.len() * 6_000);
    for e in events {
        let table = e
            .object_type
            .as_deref()
            .and_then(|t| registry.get(t))
            .map(|s| s.table.as_str());
        let seq = e.seq.to_string();
        let created = e.created.to_string();
        let livemode = e.livemode.map(|l| l.to_string());
        let deleted = (e.is_delete()).to_string();
        let fields: [Option<&str>; 12] = [
            Some(e.account.as_deref().unwrap_or("platform")),
            Some(&e.id),
            Some(&e.event_type),
            Some(&created),
            livemode.as_deref(),
            e.api_version.as_deref(),
            e.object_type.as_deref(),
            e.object_id.as_deref(),
            Some(&seq),
            Some(e.json()),
            table,
            e.object_json(),
        ];
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            csv(&mut out, *f);
        }
        out.push(',');
        out.push_str(&deleted);
        out.push('\n');
    }
    out
}

async fn batch(
    pool: &PgPool,
    events: &[&Incoming],
    registry: &Registry,
    statements: &Statements,
) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let fresh: bool = sqlx::query_scalar("select to_regclass('pg_temp.staging') is null")
        .fetch_one(&mut *conn)
        .await?;
    conn.execute(
        "create temp table if not exists staging (acct text, id text, type text, created bigint, livemode boolean, \
         api_version text, object_type text, object_id text, seq bigint, raw text, tbl text, obj text, deleted boolean) \
         on commit delete rows",
    )
    .await?;
    // Staging is scratch: no compression of the JSON on its way through.
    if fresh {
        conn.execute("alter table staging alter column raw set storage external, alter column obj set storage external").await?;
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let mut copy = tx
        .copy_in_raw("copy staging from stdin (format csv)")
        .await?;
    copy.send(staging_rows(events, registry).into_bytes())
        .await?;
    copy.finish().await?;
    tx.execute(
        "insert into stripe.events (_account_id, id, type, created, livemode, api_version, object_type, object_id, \
           _stream_seq, _raw_data) \
         select acct, id, type, created, livemode, api_version, object_type, object_id, seq, raw::jsonb from staging \
         on conflict (_account_id, id) do nothing",
    )
    .await?;
    let mut tables: Vec<&str> = events
        .iter()
        .filter_map(|e| {
            e.object_type
                .as_deref()
                .and_then(|t| registry.get(t))
                .map(|s| s.table.as_str())
        })
        .collect();
    tables.sort_unstable();
    tables.dedup();
    for table in tables {
        let index = registry
            .objects()
            .iter()
            .position(|o| o.table == table)
            .unwrap_or_default();
        let (names, values, sets) = statements.typed_columns(index, "o.object");
        let sql = format!(
            "insert into stripe.\"{table}\" as t (_account_id, id, _raw_data, livemode, deleted, _last_event_id, \
               _last_event_created, _last_event_seq{names}) \
             select o.acct, o.object_id, o.object, o.livemode, o.deleted, o.id, o.created, o.seq{values} \
             from (select distinct on (s.acct, s.object_id) s.*, ev._raw_data -> 'data' -> 'object' as object \
               from staging s cross join lateral (select e._raw_data from stripe.events e \
                 where e._account_id = s.acct and e.id = s.id limit 1) ev \
               where s.tbl = '{table}' order by s.acct, s.object_id, s.created desc, s.deleted desc, s.seq desc) o \
             on conflict (_account_id, id) do update set {SET_STATE}{sets} where {GUARD} \
             returning _account_id, id"
        );
        let written: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(sql))
            .fetch_all(&mut *tx)
            .await?;
        // The same embedded lists (subscription items, invoice lines...) as the applier writes.
        stripe_sync_applier::store::replace_children(&mut tx, statements, index, &written).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn run_once(
    events: &[Incoming],
    connections: usize,
    batch_size: usize,
) -> anyhow::Result<Duration> {
    let db = TestDb::create().await;
    // Planned once per connection, like the applier's statements.
    let options = sqlx::postgres::PgConnectOptions::from_str(db.url())?
        .options([("plan_cache_mode", "force_generic_plan")]);
    let pool = PgPoolOptions::new()
        .max_connections(connections as u32)
        .connect_with(options)
        .await?;
    stripe_sync_applier::store::migrate(&pool).await?;
    // Experiments: BENCH_AFTER_MIGRATE_SQL runs after the migrations (e.g. to try another storage setting).
    if let Ok(sql) = std::env::var("BENCH_AFTER_MIGRATE_SQL") {
        pool.execute(AssertSqlSafe(sql)).await?;
    }
    let registry = Registry::shipped();
    let statements = &Statements::load(&pool, registry).await?;
    let topology = Topology {
        prefix: "stripe".into(),
        partitions: 16,
    };
    // Split like appliers do: by partition of the object id, so connections never touch the same rows.
    let mut shares: Vec<Vec<&Incoming>> = vec![Vec::new(); connections];
    for e in events {
        let p = topology.partition_of(e.object_id.as_deref().unwrap_or(&e.id));
        shares[p as usize % connections].push(e);
    }
    let started = Instant::now();
    let tasks = shares.into_iter().map(|share| {
        let pool = pool.clone();
        async move {
            for chunk in share.chunks(batch_size) {
                batch(&pool, chunk, registry, statements).await?;
            }
            anyhow::Ok(())
        }
    });
    for result in futures::future::join_all(tasks).await {
        result?;
    }
    let elapsed = started.elapsed();
    pool.close().await;
    Ok(elapsed)
}

/// Measures the ceiling with 1, 2 and 4 connections.
pub async fn run(n: usize, batch_size: usize) -> anyhow::Result<Ceiling> {
    let bodies = crate::events::generate(n, 0.3, 3);
    let events: Vec<Incoming> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| Incoming::parse(i as u64 + 1, b))
        .collect::<Result<_, _>>()?;
    drop(bodies);
    let mut by_connections = Vec::new();
    let counts: Vec<usize> = std::env::var("BENCH_CEILING_CONNECTIONS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4]);
    for connections in counts {
        let elapsed = run_once(&events, connections, batch_size).await?;
        by_connections.push((connections, n as f64 / elapsed.as_secs_f64()));
    }
    let best = by_connections.iter().map(|(_, r)| *r).fold(0.0, f64::max);
    Ok(Ceiling {
        events: n as u64,
        batch: batch_size,
        by_connections,
        best,
    })
}
