//! Applying a batch of events in one transaction: record them (dedupe), plan the rows of the new ones, write each
//! table in rounds under the ordering guard, keep embedded lists, commit. No NATS in here: the worker, the
//! operator commands and the tests call it alike.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::PgPool;

use crate::error::ApplyError;
use crate::event::Incoming;
use crate::plan;
use crate::registry::{Key, Registry};
use crate::store::{self, Statements};

/// Whether events already recorded are skipped (normal) or applied again (`replay --force`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Events already in `stripe.events` change nothing.
    Normal,
    /// Every event is applied again, still under the ordering guard and in the order it was first applied in (a
    /// database restored from an older backup).
    Force,
}

/// What a batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Events in the batch.
    pub events: usize,
    /// Events applied for the first time (or again, with [`Mode::Force`]).
    pub new: usize,
    /// Rows written.
    pub rows_written: usize,
    /// Writes refused because the table already held a newer state.
    pub rows_stale: usize,
    /// Rows whose state a bare same-second tie decided (`_ambiguous`), for the API side to read again.
    pub ambiguous: usize,
    /// New events that change no table (unknown object type): kept in `stripe.events` only.
    pub unrouted: usize,
}

/// Writes batches of events: the applier's database, or a stand-in in the worker's unit tests.
pub trait Writer: Send + Sync {
    /// Applies `events` (in stream order) in one transaction.
    fn write(&self, events: &[Incoming])
    -> impl Future<Output = Result<Report, ApplyError>> + Send;
}

/// Applies batches to Postgres.
#[derive(Debug)]
pub struct Applier {
    pool: PgPool,
    registry: &'static Registry,
    /// Built on first use from the migrated tables' columns; rebuilt after a table changed.
    statements: std::sync::Mutex<Option<Arc<Statements>>>,
    platform_account: String,
    /// When on, what to queue for reading again from the API (see [`crate::hydrate`]).
    hydration: Option<crate::hydrate::Policy>,
}

impl Writer for Applier {
    fn write(
        &self,
        events: &[Incoming],
    ) -> impl Future<Output = Result<Report, ApplyError>> + Send {
        self.apply(events, Mode::Normal)
    }
}

/// An applier that applies recorded events again ([`Mode::Force`]).
#[derive(Debug)]
pub struct Forced<'a>(pub &'a Applier);

impl Writer for Forced<'_> {
    fn write(
        &self,
        events: &[Incoming],
    ) -> impl Future<Output = Result<Report, ApplyError>> + Send {
        self.0.apply(events, Mode::Force)
    }
}

impl Applier {
    /// An applier writing through `pool`; `platform_account` is the `_account_id` of events without `account`.
    pub fn new(
        pool: PgPool,
        registry: &'static Registry,
        platform_account: impl Into<String>,
    ) -> Self {
        Self {
            statements: std::sync::Mutex::new(None),
            pool,
            registry,
            platform_account: platform_account.into(),
            hydration: None,
        }
    }

    /// The same, queueing objects for hydration by `policy`.
    #[must_use]
    pub fn with_hydration(mut self, policy: crate::hydrate::Policy) -> Self {
        self.hydration = (policy.mode != crate::hydrate::Mode::Never).then_some(policy);
        self
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies `events` (in stream order) in one transaction. Either all of it commits or nothing does.
    pub async fn apply(&self, events: &[Incoming], mode: Mode) -> Result<Report, ApplyError> {
        let statements = self.statements().await?;
        match self.apply_with(&statements, events, mode).await {
            Err(ApplyError::Database(err)) if crate::error::is_schema_change(&err) => {
                self.set_statements(None);
                Err(ApplyError::SchemaChanged(err))
            }
            other => other,
        }
    }

    async fn statements(&self) -> Result<Arc<Statements>, sqlx::Error> {
        if let Some(statements) = self.statements.lock().ok().and_then(|s| s.clone()) {
            return Ok(statements);
        }
        let statements = Arc::new(Statements::load(&self.pool, self.registry).await?);
        self.set_statements(Some(statements.clone()));
        Ok(statements)
    }

    fn set_statements(&self, statements: Option<Arc<Statements>>) {
        if let Ok(mut slot) = self.statements.lock() {
            *slot = statements;
        }
    }

    fn account_of<'a>(&'a self, event: &'a Incoming) -> &'a str {
        event.account.as_deref().unwrap_or(&self.platform_account)
    }

    async fn apply_with(
        &self,
        statements: &Statements,
        events: &[Incoming],
        mode: Mode,
    ) -> Result<Report, ApplyError> {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        let all: Vec<&Incoming> = events.iter().collect();
        let inserted =
            store::insert_events(&mut tx, &all, self.registry, &self.platform_account).await?;
        // The first copy of an event in the batch is the one recorded.
        let mut seen = HashSet::new();
        let new: Vec<&Incoming> = all
            .into_iter()
            .filter(|e| {
                let key = (self.account_of(e).to_owned(), e.id.clone());
                seen.insert(key.clone()) && (mode == Mode::Force || inserted.contains(&key))
            })
            .collect();
        // Again, each event takes the place it was first applied in: a copy Stripe re-sent after the stream's
        // duplicate window sits later in the stream, and must not beat a newer event of the same second.
        let recorded = if mode == Mode::Force {
            let keys: Vec<(&str, &str)> = new
                .iter()
                .map(|e| (self.account_of(e), e.id.as_str()))
                .collect();
            store::recorded_seqs(&mut tx, &keys).await?
        } else {
            HashMap::new()
        };
        let order = |e: &Incoming| {
            recorded
                .get(&(self.account_of(e).to_owned(), e.id.clone()))
                .copied()
                .unwrap_or(e.seq as i64)
        };
        let plan = plan::plan(
            new.iter().map(|e| (*e, order(e))),
            self.registry,
            &self.platform_account,
        );
        let mut report = Report {
            events: events.len(),
            new: new.len(),
            unrouted: plan.unrouted,
            ..Report::default()
        };
        let mut asks = match &self.hydration {
            Some(policy) => {
                let named: Vec<(&str, &str)> = new
                    .iter()
                    .filter(|e| e.thin)
                    .filter_map(|e| Some((self.account_of(e), e.snapshot_event.as_deref()?)))
                    .collect();
                let recorded = store::recorded_snapshot_events(&mut tx, &named).await?;
                crate::hydrate::asks_of_events(
                    policy,
                    self.registry,
                    new.iter().map(|e| (*e, self.account_of(e))),
                    &recorded,
                )
            }
            None => {
                if new.iter().any(|e| e.thin) && !THIN_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "thin events are recorded, but their objects can't be read without STRIPE_API_KEY (and applier.hydrate other than never): their rows are not written"
                    );
                }
                Vec::new()
            }
        };
        // New events per object type whose row was written, and whose row a newer state (in the table, or later
        // in the batch) made stale: together with the unrouted ones, one outcome per new event.
        let mut counts: Vec<(&str, usize, usize)> = Vec::with_capacity(plan.tables.len());
        for table in &plan.tables {
            counts.push((&table.spec.object_type, 0, table.superseded));
            for round in &table.rounds {
                let written = store::upsert_rows(&mut tx, statements, table.index, round).await?;
                report.rows_written += written.len();
                report.rows_stale += round.len() - written.len();
                counts.push((
                    &table.spec.object_type,
                    written.len(),
                    round.len() - written.len(),
                ));
                let mut ties: Vec<(String, bool, String)> = written
                    .iter()
                    .filter(|w| w.ambiguous)
                    .map(|w| w.key.clone())
                    .collect();
                let won_keys: HashSet<_> = written.iter().map(|w| w.key.clone()).collect();
                let won: Vec<bool> = round
                    .iter()
                    .map(|r| {
                        won_keys.contains(&(r.account.to_owned(), r.livemode, r.id.to_string()))
                    })
                    .collect();
                if table.spec.key != Key::Event && won.contains(&false) {
                    let losers: Vec<_> = round
                        .iter()
                        .zip(&won)
                        .filter(|(_, won)| !**won)
                        .map(|(r, _)| r.clone())
                        .collect();
                    ties.extend(
                        store::flag_tie_losers(&mut tx, statements, table.index, &losers).await?,
                    );
                }
                report.ambiguous += ties.len();
                if let Some(policy) = &self.hydration {
                    asks.extend(policy.asks_of_ties(table.spec, ties));
                }
                store::keep_lists(&mut tx, statements, table.index, round, &won).await?;
            }
        }
        if let Some(policy) = &self.hydration {
            crate::hydrate::queue(&mut tx, &asks, policy.settle).await?;
        }
        tx.commit().await?;
        record(events, &new, &counts, plan.unrouted, started);
        Ok(report)
    }
}

/// The metrics of a committed batch: its size and time, each new event's age, rows by outcome and duplicates.
fn record(
    events: &[Incoming],
    new: &[&Incoming],
    counts: &[(&str, usize, usize)],
    unrouted: usize,
    started: std::time::Instant,
) {
    use stripe_sync_shared::metrics::names;
    metrics::histogram!(names::BATCH_SIZE).record(events.len() as f64);
    metrics::histogram!(names::APPLY_DURATION).record(started.elapsed().as_secs_f64());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let age = metrics::histogram!(names::EVENT_AGE);
    for event in new {
        age.record((now - event.created).max(0) as f64);
    }
    for (object_type, written, stale) in counts {
        for (outcome, n) in [("applied", written), ("stale", stale)] {
            if *n > 0 {
                metrics::counter!(names::EVENTS_APPLIED, "object_type" => object_type.to_string(), "outcome" => outcome)
                    .increment(*n as u64);
            }
        }
    }
    // Events no table takes (an object type without one, v2 thin events): recorded in `stripe.events`, applied.
    if unrouted > 0 {
        metrics::counter!(names::EVENTS_APPLIED, "object_type" => "none", "outcome" => "applied")
            .increment(unrouted as u64);
    }
    if new.len() < events.len() {
        let fresh: HashSet<*const Incoming> = new.iter().map(|e| std::ptr::from_ref(*e)).collect();
        for event in events
            .iter()
            .filter(|e| !fresh.contains(&std::ptr::from_ref(*e)))
        {
            let object_type = event.object_type.clone().unwrap_or_else(|| "none".into());
            metrics::counter!(names::EVENTS_APPLIED, "object_type" => object_type, "outcome" => "duplicate")
                .increment(1);
        }
    }
}

/// Warned once per process: thin events without a key to read their objects.
static THIN_WARNED: AtomicBool = AtomicBool::new(false);
