//! How many API reads hydration asks for in `ambiguous` mode: the benchmark corpus applied with hydration on, in
//! stream order and then delivered out of order within each second (as Stripe does), counting the objects queued
//! and the extra list pages cut-short lists need. No API is called: what is counted is what would be read.

use stripe_sync_applier::apply::{Applier, Mode};
use stripe_sync_applier::event::Incoming;
use stripe_sync_applier::hydrate::{self, Policy};
use stripe_sync_applier::registry::Registry;
use stripe_sync_testkit::db::TestDb;

/// Reads per 1,000 events for one delivery order.
#[derive(Debug)]
pub(crate) struct Reads {
    pub order: &'static str,
    pub events: usize,
    pub objects: i64,
    pub by_reason: Vec<(String, i64)>,
    pub list_pages: i64,
}

impl Reads {
    pub(crate) fn per_thousand(&self) -> f64 {
        (self.objects + self.list_pages) as f64 * 1000.0 / self.events as f64
    }
}

async fn count(events: &[Incoming], order: &'static str) -> anyhow::Result<Reads> {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    stripe_sync_applier::migrate::run(&pool).await?;
    let applier =
        Applier::new(pool.clone(), Registry::shipped(), "platform").with_hydration(Policy {
            mode: hydrate::Mode::Ambiguous,
            api_version: "2026-07-29.dahlia".into(),
            live: false,
            settle: std::time::Duration::from_secs(2),
        });
    for chunk in events.chunks(500) {
        applier.apply(chunk, Mode::Normal).await?;
    }
    let by_reason: Vec<(String, i64)> =
        sqlx::query_as("select reason, count(*) from stripe.hydrate_queue group by 1 order by 1")
            .fetch_all(&pool)
            .await?;
    // The sweep queues each cut-short list's parent (counted above once it is queued; here, not yet): one read of
    // the parent plus a page per 100 missing items.
    let (lists, pages): (i64, i64) = sqlx::query_as(
        "select count(*), coalesce(sum(ceil(greatest(coalesce(total_count, 0) - 10, 0) / 100.0)), 0)::int8 \
         from stripe.incomplete_lists where livemode = false",
    )
    .fetch_one(&pool)
    .await?;
    Ok(Reads {
        order,
        events: events.len(),
        objects: by_reason.iter().map(|r| r.1).sum::<i64>() + lists,
        by_reason,
        list_pages: pages,
    })
}

pub(crate) async fn run(n: usize) -> anyhow::Result<Vec<Reads>> {
    let in_order = crate::events::parsed(n)?;
    // Out of order within each second: the corpus has 50 events per second; shuffle each second's events but keep
    // their stream sequences increasing in arrival order (the stream numbers what arrives).
    let mut shuffled = in_order.clone();
    let mut rng = fastrand::Rng::with_seed(5);
    for second in shuffled.chunk_by_mut(|a, b| a.created == b.created) {
        rng.shuffle(second);
    }
    let shuffled: Vec<Incoming> = shuffled
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e.seq = i as u64 + 1;
            e
        })
        .collect();
    Ok(vec![
        count(&in_order, "in stream order").await?,
        count(&shuffled, "shuffled within each second").await?,
    ])
}

/// The latency hydration adds: from the second of two same-second events (a bare tie) stored in the stream to the
/// object's snapshot, read from the (fake) API, applied. An applier in-process with the default settle delay.
#[derive(Debug)]
pub(crate) struct Latency {
    pub objects: usize,
    pub api_latency_ms: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub(crate) async fn latency(
    objects: usize,
    api_latency: std::time::Duration,
) -> anyhow::Result<Latency> {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use async_nats::HeaderMap;
    use serde_json::json;
    use stripe_sync_shared::subjects::{self, Topology};
    use stripe_sync_testkit::fake_stripe::{Behaviour, FakeStripe, PLATFORM};
    use stripe_sync_testkit::{nats::TestNats, stripe, unique_name};

    const KEY: &str = "sk_test_bench";
    let fake = FakeStripe::start(KEY, [("/v1/customers".to_owned(), "customer".to_owned())]).await;
    let now = stripe::now();
    for i in 0..objects {
        let mut object = stripe::object("customer", &format!("cus_lat{i}"));
        object["created"] = json!(now - 1000);
        object["livemode"] = json!(false);
        fake.put(PLATFORM, &object);
    }
    fake.set_behaviour(Behaviour {
        latency: api_latency,
        ..Behaviour::default()
    });
    let nats = TestNats::start();
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let stream_name = unique_name("BENCH_HYDRATE");
    let env: HashMap<String, String> = HashMap::from([
        ("NATS_URL".into(), nats.url()),
        ("METRICS_PORT".into(), "0".into()),
        ("DATABASE_URL".into(), db.url().to_owned()),
        ("STRIPE_API_KEY".into(), KEY.into()),
        ("STRIPE_API_BASE".into(), fake.base().to_owned()),
        ("STRIPE_SYNC__STREAM__NAME".into(), stream_name.clone()),
        (
            "STRIPE_SYNC__STREAM__DLQ_NAME".into(),
            format!("{stream_name}_DLQ"),
        ),
    ]);
    let settings = stripe_sync_applier::settings::Settings::load_from(&env)?;
    let topology = Topology {
        prefix: "stripe".into(),
        partitions: settings.stream.partitions.get(),
    };
    let app = stripe_sync_applier::startup::Application::build(settings).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until_stopped(async move {
        let _ = stop_rx.await;
    }));
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let publish = |id: String, object: String, created: i64| {
        let js = js.clone();
        let topology = topology.clone();
        async move {
            let event = json!({
                "id": id, "object": "event", "type": "customer.updated", "created": created,
                "livemode": false, "api_version": "2026-07-29.dahlia",
                "data": { "object": { "id": object, "object": "customer", "livemode": false, "email": id } },
            });
            let routing = subjects::routing_key(None, Some(&object), &id);
            let subject =
                topology.event_subject(topology.partition_of(&routing), "customer.updated");
            let mut headers = HeaderMap::new();
            headers.insert(subjects::HEADER_MSG_ID, id.as_str());
            js.publish_with_headers(subject, headers, serde_json::to_vec(&event)?.into())
                .await?
                .await?;
            anyhow::Ok(())
        }
    };
    // Objects arrive at 10 a second (half the test key's read budget): latency, not queueing, is measured.
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut done: Vec<Duration> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(60 + objects as u64);
    while done.len() < objects && Instant::now() < deadline {
        tick.tick().await;
        if next < objects {
            let object = format!("cus_lat{next}");
            let created = stripe::now();
            publish(format!("evt_lat{next}_a"), object.clone(), created).await?;
            publish(format!("evt_lat{next}_b"), object.clone(), created).await?;
            sent.insert(object, Instant::now());
            next += 1;
        }
        let pending: Vec<String> = sent.keys().cloned().collect();
        let snapped: Vec<String> = sqlx::query_scalar(
            "select id from stripe.customers where id = any($1) and _last_event_id like 'snap_%'",
        )
        .bind(&pending)
        .fetch_all(&pool)
        .await?;
        let at = Instant::now();
        for id in snapped {
            if let Some(t0) = sent.remove(&id) {
                done.push(at - t0);
            }
        }
    }
    let _ = stop_tx.send(());
    let _ = running.await;
    anyhow::ensure!(
        done.len() == objects,
        "only {} of {objects} objects were hydrated",
        done.len()
    );
    done.sort();
    let ms = |q: f64| {
        let i = ((done.len() as f64 * q).ceil() as usize).clamp(1, done.len()) - 1;
        done[i].as_secs_f64() * 1000.0
    };
    Ok(Latency {
        objects,
        api_latency_ms: api_latency.as_millis() as u64,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: ms(1.0),
    })
}
