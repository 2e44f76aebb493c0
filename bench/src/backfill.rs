//! The backfill against the fake Stripe API with a million synthetic objects over eight types, 50 ms per page:
//! (a) with the fake enforcing Stripe's budget (100 requests/s, 25 per endpoint): objects/s against the budget's
//! bound of 10,000/s (100 pages of 100); (b) with no limit: objects/s into Postgres end to end, one applier running
//! alongside, against the applier's own drain rate. The backfill's peak memory in both.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use stripe_sync_testkit::db::TestDb;
use stripe_sync_testkit::fake_stripe::{Behaviour, FakeStripe, PLATFORM};
use stripe_sync_testkit::nats::TestNats;
use stripe_sync_testkit::{stripe, unique_name};

use crate::harness::{Binaries, Proc};

/// The types loaded: listable by `created`, without embedded lists (a synthetic object is one template).
const TYPES: &[(&str, &str)] = &[
    ("customer", "/v1/customers"),
    ("product", "/v1/products"),
    ("price", "/v1/prices"),
    ("payment_intent", "/v1/payment_intents"),
    ("refund", "/v1/refunds"),
    ("coupon", "/v1/coupons"),
    ("dispute", "/v1/disputes"),
    ("setup_intent", "/v1/setup_intents"),
];

/// One run's result.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct BackfillRun {
    pub limited: bool,
    pub objects: u64,
    /// Objects published per second by the backfill.
    pub published_per_second: f64,
    /// With an applier running: objects per second until the last row was in Postgres.
    pub applied_per_second: Option<f64>,
    pub requests: usize,
    pub rate_limited: usize,
    pub peak_rss_mib: f64,
}

async fn fake(objects: usize) -> FakeStripe {
    let fake = FakeStripe::start(
        "sk_live_bench",
        TYPES
            .iter()
            .map(|(k, p)| ((*p).to_owned(), (*k).to_owned())),
    )
    .await;
    let per_type = objects / TYPES.len();
    let now = stripe::now();
    for (kind, _) in TYPES {
        let mut template = stripe::fixture(kind);
        template["livemode"] = json!(true);
        // About 2 years of objects, several per second at the busiest.
        fake.put_synthetic(
            PLATFORM,
            &template,
            &kind.replace('_', ""),
            per_type,
            now - 60_000_000,
            3,
        );
    }
    fake
}

fn env(
    fake: &FakeStripe,
    nats: &TestNats,
    db: &TestDb,
    stream: &str,
    prefix: &str,
) -> HashMap<String, String> {
    HashMap::from([
        ("NATS_URL".into(), nats.url()),
        ("METRICS_PORT".into(), "0".into()),
        ("DATABASE_URL".into(), db.url().to_owned()),
        ("STRIPE_SYNC__STREAM__NAME".into(), stream.to_owned()),
        // Each run its own subjects: both runs share one NATS server.
        (
            "STRIPE_SYNC__STREAM__SUBJECT_PREFIX".into(),
            stream.to_lowercase(),
        ),
        (
            "STRIPE_SYNC__STREAM__DLQ_NAME".into(),
            format!("{stream}_DLQ"),
        ),
        (
            "STRIPE_SYNC__APPLIER__CONSUMER_PREFIX".into(),
            prefix.to_owned(),
        ),
        ("STRIPE_API_KEY".into(), "sk_live_bench".into()),
        ("STRIPE_API_BASE".into(), fake.base().to_owned()),
        ("RUST_LOG".into(), "warn".into()),
    ])
}

/// One backfill of `objects` objects; `limited`: the fake enforces Stripe's budget and the client is set just under
/// it (97/s, 23 per endpoint: a second never holds more than 98 and 24 as sent, leaving 2 and 1 for requests that
/// arrive closer together than they left); otherwise neither limits. `with_applier`: one applier applies meanwhile.
pub(crate) async fn run(
    bins: &Binaries,
    nats: &TestNats,
    objects: usize,
    limited: bool,
    with_applier: bool,
) -> anyhow::Result<BackfillRun> {
    let fake = fake(objects).await;
    fake.set_behaviour(Behaviour {
        global_rate: limited.then_some(100),
        endpoint_rate: limited.then_some(25),
        latency: Duration::from_millis(50),
        ..Behaviour::default()
    });
    let db = TestDb::create().await;
    let stream = unique_name("BENCH_BACKFILL");
    let prefix = unique_name("bench");
    let mut env = env(&fake, nats, &db, &stream, &prefix);
    let (rate, endpoint, ranges) = if limited {
        ("97", "23", "4")
    } else {
        ("100000", "100000", "4")
    };
    env.insert(
        "STRIPE_SYNC__STRIPE__LIVE_REQUESTS_PER_SECOND".into(),
        rate.into(),
    );
    env.insert(
        "STRIPE_SYNC__STRIPE__ENDPOINT_REQUESTS_PER_SECOND".into(),
        endpoint.into(),
    );
    env.insert("STRIPE_SYNC__STRIPE__RANGES_PER_TYPE".into(), ranges.into());
    let migrate = Proc::spawn(&bins.applier, &["migrate"], &env, "backfill-migrate")?;
    anyhow::ensure!(migrate.wait().await == Some(0), "migrate failed");
    let applier = if with_applier {
        Some(Proc::spawn(
            &bins.applier,
            &["run"],
            &env,
            "backfill-applier",
        )?)
    } else {
        None
    };
    let kinds: Vec<&str> = TYPES.iter().map(|(k, _)| *k).collect();
    let objects_arg = kinds.join(",");
    let started = Instant::now();
    let backfill = Proc::spawn(
        &bins.applier,
        &["backfill", "--objects", &objects_arg],
        &env,
        if limited {
            "backfill-limited"
        } else {
            "backfill-unlimited"
        },
    )?;
    let pid = backfill.pid();
    let peak = std::sync::Arc::new(std::sync::Mutex::new(0.0f64));
    let watcher = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    && let Some(kb) = status
                        .lines()
                        .find(|l| l.starts_with("VmHWM:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                    && let Ok(mut p) = peak.lock()
                {
                    *p = p.max(kb / 1024.0);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let code = backfill.wait().await;
    watcher.abort();
    let published_in = started.elapsed();
    anyhow::ensure!(code == Some(0), "the backfill failed (bench/out/logs)");
    let total = (objects / TYPES.len() * TYPES.len()) as u64;
    let applied_per_second = match applier {
        Some(applier) => {
            let pool = db.pool().await;
            loop {
                let n: i64 = sqlx::query_scalar(
                    "select (select count(*) from stripe.customers) + (select count(*) from stripe.products) \
                     + (select count(*) from stripe.prices) + (select count(*) from stripe.payment_intents) \
                     + (select count(*) from stripe.refunds) + (select count(*) from stripe.coupons) \
                     + (select count(*) from stripe.disputes) + (select count(*) from stripe.setup_intents)",
                )
                .fetch_one(&pool)
                .await?;
                if n as u64 >= total {
                    break;
                }
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(3600),
                    "not applied within an hour"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let rate = total as f64 / started.elapsed().as_secs_f64();
            applier.stop().await;
            Some(rate)
        }
        None => None,
    };
    let peak_rss_mib = *peak.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    Ok(BackfillRun {
        limited,
        objects: total,
        published_per_second: total as f64 / published_in.as_secs_f64(),
        applied_per_second,
        requests: fake.requests().len(),
        rate_limited: fake.rate_limited(),
        peak_rss_mib,
    })
}
