//! The applier's ceiling: Postgres doing the same writes by its own fastest batched path, COPY into a staging table
//! then `INSERT ... ON CONFLICT` per table, in batches of 500, on the same tables (typed columns, indexes, guard),
//! with the same events split over connections by partition as appliers split them. No NATS, no parsing timed.

use std::str::FromStr as _;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Executor, PgPool};
use stripe_sync_applier::event::Incoming;
use stripe_sync_applier::registry::{DeletePolicy, Registry};
use stripe_sync_applier::store::{self, SET_STATE, STATE_COLUMNS, Statements};
use stripe_sync_applier::version::Rank;
use stripe_sync_shared::subjects::Topology;
use stripe_sync_testkit::db::TestDb;

/// The best rate over the connection counts tried.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Ceiling {
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
        let spec = e.object_type.as_deref().and_then(|t| registry.get(t));
        let table = spec.map(|s| s.table.as_str());
        let seq = e.seq.to_string();
        let created = e.created.to_string();
        let livemode = e.livemode().to_string();
        let tombstone =
            e.is_delete() && spec.is_some_and(|s| s.on_delete == DeletePolicy::Tombstone);
        let deleted = tombstone.to_string();
        let progress = spec.map_or(0, |s| e.progress(s));
        let rank = Rank::new(tombstone, progress, e.kind()).get().to_string();
        let fields: [Option<&str>; 13] = [
            Some(e.account.as_deref().unwrap_or("platform")),
            Some(&e.id),
            Some(&e.event_type),
            Some(&created),
            Some(&livemode),
            e.api_version.as_deref(),
            e.object_type.as_deref(),
            e.object_id.as_deref(),
            Some(&seq),
            Some(e.json()),
            table,
            e.object_json(),
            Some(&rank),
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
         api_version text, object_type text, object_id text, seq bigint, raw text, tbl text, obj text, rank int, \
         deleted boolean) \
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
           _stream_seq, _raw_data, _table, _row_id, _rank) \
         select acct, id, type, created, livemode, api_version, object_type, object_id, seq, raw::jsonb, \
           nullif(tbl, ''), case when tbl <> '' then object_id end, rank from staging \
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
            "insert into stripe.\"{table}\" as t (_account_id, livemode, id, {STATE_COLUMNS}{names}) \
             select o.acct, o.livemode, o.object_id, o.deleted, o.id, o.created, o.rank, o.seq, o.object{values} \
             from (select distinct on (s.acct, s.livemode, s.object_id) s.*, ev._raw_data -> 'data' -> 'object' as object \
               from staging s cross join lateral (select e._raw_data from stripe.events e \
                 where e._account_id = s.acct and e.id = s.id limit 1) ev \
               where s.tbl = '{table}' order by s.acct, s.livemode, s.object_id, s.created desc, s.rank desc, s.seq desc) o \
             on conflict (_account_id, livemode, id) do update set {SET_STATE}{sets} where {guard} \
             returning _account_id, id",
            guard = store::newer("excluded", "t"),
        );
        sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        // The same embedded lists (subscription items, invoice lines...) as the applier writes: the newest state
        // of each parent.
        let newest = newest_rows(events, registry, index);
        if !newest.is_empty() {
            let won = vec![true; newest.len()];
            store::keep_lists(&mut tx, statements, index, &newest, &won).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// The newest write of each object of table `index` among `events`, as the applier plans them.
fn newest_rows<'a>(
    events: &[&'a Incoming],
    registry: &'a Registry,
    index: usize,
) -> Vec<stripe_sync_applier::plan::ObjectRow<'a>> {
    let plan = stripe_sync_applier::plan::plan(
        events.iter().map(|e| (*e, e.seq as i64)),
        registry,
        "platform",
    );
    plan.tables
        .into_iter()
        .filter(|t| t.index == index)
        .flat_map(|t| t.rounds.into_iter().last())
        .flatten()
        .collect()
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
    stripe_sync_applier::migrate::run(&pool).await?;
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
pub(crate) async fn run(n: usize, batch_size: usize) -> anyhow::Result<Ceiling> {
    let events = crate::events::parsed(n)?;
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
