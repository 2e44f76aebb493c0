//! The batch writer alone: generated events applied in batches of 500 on one connection, no NATS. Isolates the
//! cost of the upsert SQL from the stream and the worker.
use std::time::Instant;
use stripe_sync_applier::apply::{Applier, Mode};
use stripe_sync_applier::registry::Registry;
use stripe_sync_testkit::db::TestDb;

pub(crate) async fn run(n: usize) -> anyhow::Result<()> {
    let events = crate::events::parsed(n)?;
    let db = TestDb::create().await;
    let options = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(db.url())?
        .options([("plan_cache_mode", "force_generic_plan")]);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    stripe_sync_applier::migrate::run(&pool).await?;
    let applier = Applier::new(pool, Registry::shipped(), "platform");
    let started = Instant::now();
    for chunk in events.chunks(500) {
        applier.apply(chunk, Mode::Normal).await?;
    }
    let e = started.elapsed();
    println!(
        "direct apply: {n} events in {:.2}s = {:.0}/s",
        e.as_secs_f64(),
        n as f64 / e.as_secs_f64()
    );
    Ok(())
}
