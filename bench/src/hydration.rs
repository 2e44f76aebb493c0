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
