//! `history`: reading history back. A table of `versions` versions (100,000 customers by default, each changed every
//! few days over a year, 1,000,000 versions) loaded straight into `stripe.events` as the applier records them, then:
//! `stripe.as_of` for the whole table (at the end, and half-way), for one object by id, and one object's timeline
//! from `stripe.customers_history`; reading the current table is the yardstick.

use std::time::Instant;

use sqlx::PgPool;
use stripe_sync_testkit::db::TestDb;

/// What was measured, milliseconds (medians).
#[derive(Debug, serde::Serialize)]
pub(crate) struct Report {
    pub versions: usize,
    pub objects: usize,
    pub load_s: f64,
    /// Reading the current table whole, for comparison. Whole tables are read as `count(t)` of whole rows, so every
    /// column is computed (a plain `count(*)` lets Postgres skip them).
    pub current_table_ms: f64,
    pub as_of_whole_end_ms: f64,
    pub as_of_whole_middle_ms: f64,
    /// The same through the table's own function (`stripe.customers_as_of`).
    pub table_as_of_whole_end_ms: f64,
    /// `as_of` for the whole table on one core (`max_parallel_workers_per_gather = 0`: no parallel slices).
    pub as_of_whole_one_core_ms: f64,
    pub as_of_one_p50_ms: f64,
    pub as_of_one_p99_ms: f64,
    pub timeline_one_p50_ms: f64,
    pub events_mib: f64,
    pub versions_index_mib: f64,
}

const YEAR: i64 = 365 * 86_400;
const CHUNK: usize = 100_000;

pub(crate) async fn run(versions: usize, objects: usize) -> anyhow::Result<Report> {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    stripe_sync_applier::migrate::run(&pool).await?;
    let start = time::OffsetDateTime::now_utc().unix_timestamp() - YEAR;
    let loaded = Instant::now();
    load(&pool, versions, objects, start).await?;
    let load_s = loaded.elapsed().as_secs_f64();
    eprintln!("loaded {versions} versions in {load_s:.0} s");
    sqlx::query(
        "insert into stripe.customers select * from stripe.as_of(null::stripe.customers, now())",
    )
    .execute(&pool)
    .await?;
    sqlx::query("vacuum analyze stripe.events")
        .execute(&pool)
        .await?;
    sqlx::query("vacuum analyze stripe.customers")
        .execute(&pool)
        .await?;
    let end = start + YEAR;
    let whole = |at: i64| {
        format!("select count(t) from stripe.as_of(null::stripe.customers, to_timestamp({at})) t")
    };
    let current_table_ms = median_ms(&pool, "select count(t) from stripe.customers t", 5).await?;
    let as_of_whole_end_ms = median_ms(&pool, &whole(end), 5).await?;
    let as_of_whole_middle_ms = median_ms(&pool, &whole(start + YEAR / 2), 5).await?;
    let table_as_of_whole_end_ms = median_ms(
        &pool,
        &format!("select count(t) from stripe.customers_as_of(to_timestamp({end})) t"),
        5,
    )
    .await?;
    let one_core = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(db.url())?
                .options([("max_parallel_workers_per_gather", "0")]),
        )
        .await?;
    let as_of_whole_one_core_ms = median_ms(&one_core, &whole(end), 5).await?;
    let mut rng = fastrand::Rng::with_seed(1);
    let mut one = Vec::new();
    let mut timeline = Vec::new();
    for _ in 0..200 {
        let id = customer(rng.usize(0..objects));
        let at = start + rng.i64(0..YEAR);
        one.push(
            time_ms(
                &pool,
                &format!(
                    "select count(*) from stripe.as_of(null::stripe.customers, to_timestamp({at}), array['{id}'])"
                ),
            )
            .await?,
        );
        timeline.push(
            time_ms(
                &pool,
                &format!("select count(*) from stripe.customers_history where id = '{id}'"),
            )
            .await?,
        );
    }
    one.sort_by(f64::total_cmp);
    timeline.sort_by(f64::total_cmp);
    let events_mib = mib(&pool, "select pg_total_relation_size('stripe.events')").await?;
    let versions_index_mib = mib(
        &pool,
        "select pg_relation_size('stripe.events_versions_idx')",
    )
    .await?;
    let report = Report {
        versions,
        objects,
        load_s,
        current_table_ms,
        as_of_whole_end_ms,
        as_of_whole_middle_ms,
        table_as_of_whole_end_ms,
        as_of_whole_one_core_ms,
        as_of_one_p50_ms: one[one.len() / 2],
        as_of_one_p99_ms: one[one.len() * 99 / 100],
        timeline_one_p50_ms: timeline[timeline.len() / 2],
        events_mib,
        versions_index_mib,
    };
    Ok(report)
}

async fn mib(pool: &PgPool, sql: &'static str) -> anyhow::Result<f64> {
    let bytes: i64 = sqlx::query_scalar(sql).fetch_one(pool).await?;
    Ok(bytes as f64 / 1_048_576.0)
}

fn customer(i: usize) -> String {
    format!("cus_{i:07}")
}

/// `versions` customer versions, object `v % objects` at version `v / objects`, evenly over the year from `start`:
/// the rows the applier records for `customer.created` and `customer.updated` events.
async fn load(pool: &PgPool, versions: usize, objects: usize, start: i64) -> anyhow::Result<()> {
    let template = stripe_sync_testkit::stripe::object("customer", "cus_x");
    for first in (0..versions).step_by(CHUNK) {
        let last = (first + CHUNK).min(versions);
        sqlx::query(
            "insert into stripe.events (_account_id, id, type, created, livemode, api_version, object_type, \
               object_id, _stream_seq, _raw_data, _table, _row_id, _rank) \
             select 'platform', 'evt_' || v, t, c, false, '2026-07-29.dahlia', 'customer', o, v, \
               jsonb_build_object('id', 'evt_' || v, 'object', 'event', 'type', t, 'created', c, 'livemode', false, \
                 'data', jsonb_build_object('object', $1::jsonb || jsonb_build_object('id', o, 'created', $2::bigint, \
                   'livemode', false, 'email', o || '.' || (v / $3) || '@example.com'))), \
               'customers', o, case when v < $3 then 0 else 2 end \
             from generate_series($4::bigint, $5::bigint - 1) as v \
             cross join lateral (select 'cus_' || lpad((v % $3)::text, 7, '0') as o, \
               case when v < $3 then 'customer.created' else 'customer.updated' end as t, \
               $2::bigint + v * $6::bigint / $7::bigint as c) x",
        )
        .bind(&template)
        .bind(start)
        .bind(objects as i64)
        .bind(first as i64)
        .bind(last as i64)
        .bind(YEAR)
        .bind(versions as i64)
        .execute(pool)
        .await?;
    }
    Ok(())
}

async fn time_ms(pool: &PgPool, sql: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await?;
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// The median time of `runs` runs of `sql` (after one to warm the cache).
async fn median_ms(pool: &PgPool, sql: &str, runs: usize) -> anyhow::Result<f64> {
    time_ms(pool, sql).await?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        times.push(time_ms(pool, sql).await?);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}
