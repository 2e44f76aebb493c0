//! Applying a batch of events in one transaction: record them (dedupe), plan the rows of the new ones, upsert each
//! table once, replace embedded lists, commit. No NATS in here: the consumer and the tests call it alike.

use std::sync::Arc;

use sqlx::PgPool;

use crate::error::ApplyError;
use crate::event::Incoming;
use crate::plan;
use crate::registry::Registry;
use crate::store::{self, Statements};

/// Whether events already recorded are skipped (normal) or applied again (`replay --force`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Events already in `stripe.events` change nothing.
    Normal,
    /// Every event is applied again, still under the ordering guard (a database restored from an older backup).
    Force,
}

/// What a batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Events in the batch.
    pub events: usize,
    /// Events applied for the first time (or again, with [`Mode::Force`]).
    pub new: usize,
    /// Rows written (after keeping the newest event of each object).
    pub rows_written: usize,
    /// Rows left alone because the table already held newer state.
    pub rows_stale: usize,
    /// New events that change no table (unknown object type): kept in `stripe.events` only.
    pub unrouted: usize,
}

/// Applies batches to Postgres.
#[derive(Debug)]
pub struct Applier {
    pool: PgPool,
    registry: &'static Registry,
    /// Built on first use from the migrated tables' columns; rebuilt after a table changed.
    statements: std::sync::Mutex<Option<Arc<Statements>>>,
    platform_account: String,
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
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// [`Applier::apply`], retrying transient failures (database away) with backoff until they pass; returns
    /// permanent failures. For the command-line tools: the consumer's worker has its own loop (acks, shutdown).
    pub async fn apply_retrying(
        &self,
        events: &[Incoming],
        mode: Mode,
    ) -> Result<Report, ApplyError> {
        use backon::BackoffBuilder;
        let mut backoff = backon::ExponentialBuilder::new()
            .with_min_delay(std::time::Duration::from_millis(200))
            .with_max_delay(std::time::Duration::from_secs(10))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            match self.apply(events, mode).await {
                Err(err) if err.is_transient() => {
                    let delay = backoff.next().unwrap_or(std::time::Duration::from_secs(10));
                    tracing::warn!(error = %err, retry_in = ?delay, "database unavailable; retrying");
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
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

    async fn apply_with(
        &self,
        statements: &Statements,
        events: &[Incoming],
        mode: Mode,
    ) -> Result<Report, ApplyError> {
        let mut tx = self.pool.begin().await?;
        let all: Vec<&Incoming> = events.iter().collect();
        let inserted = store::insert_events(&mut tx, &all, &self.platform_account).await?;
        let mut seen = std::collections::HashSet::new();
        let new: Vec<&Incoming> = all
            .into_iter()
            .filter(|e| {
                let key = (
                    e.account
                        .as_deref()
                        .unwrap_or(&self.platform_account)
                        .to_owned(),
                    e.id.clone(),
                );
                // The first copy of an event in the batch is the one recorded.
                seen.insert(key.clone()) && (mode == Mode::Force || inserted.contains(&key))
            })
            .collect();
        let plan = plan::plan(new.iter().copied(), self.registry, &self.platform_account);
        let mut report = Report {
            events: events.len(),
            new: new.len(),
            unrouted: plan.unrouted,
            ..Report::default()
        };
        for table in &plan.tables {
            let index = self
                .registry
                .index_of(&table.spec.object_type)
                .unwrap_or_default();
            for rows in &table.rounds {
                let written = store::upsert_rows(&mut tx, statements, index, rows).await?;
                report.rows_written += written.len();
                report.rows_stale += rows.len() - written.len();
                store::replace_children(&mut tx, statements, index, &written).await?;
            }
        }
        tx.commit().await?;
        Ok(report)
    }
}
