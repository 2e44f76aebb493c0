//! History's retention (docs/history.md): every hour, one applier (an advisory lock elects it) deletes the versions
//! older than `history.retention` that a newer version, also older than it, replaced. The rule itself is SQL
//! (`stripe.prune_history_between`, migrations/0006); this only schedules it, a day of versions per transaction.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

/// Versions are pruned a day of `created` at a time, each day in its own transaction.
const DAY: i64 = 86_400;

/// How often retention runs.
pub const EVERY: Duration = Duration::from_secs(3600);

/// Prunes history older than `retention` from `pool`'s database.
#[derive(Debug, Clone)]
pub struct Retention {
    pool: PgPool,
    retention: Duration,
}

impl Retention {
    /// Retention of `retention` over `pool`.
    #[must_use]
    pub fn new(pool: PgPool, retention: Duration) -> Self {
        Self { pool, retention }
    }

    /// Prunes what is due now: the versions replaced before the horizon (now minus the retention), from where the
    /// last run stopped, a day per transaction. `None` when another applier is at it or pruned within the hour.
    pub async fn prune(&self) -> Result<Option<u64>, sqlx::Error> {
        let horizon = time::OffsetDateTime::now_utc().unix_timestamp()
            - i64::try_from(self.retention.as_secs()).unwrap_or(i64::MAX);
        let Some(mut lock) = locked(&self.pool, 0).await? else {
            return Ok(None);
        };
        let (recent, until): (bool, Option<i64>) = sqlx::query_as(
            "select coalesce(pruned_at > now() - interval '55 minutes', false), pruned_until \
             from stripe.history_state",
        )
        .fetch_one(&mut lock)
        .await?;
        if recent {
            return Ok(None);
        }
        let mut day = match until {
            Some(until) => until,
            // The first run starts at the first version (one scan of stripe.events).
            None => sqlx::query_scalar::<_, Option<i64>>(
                "select min(created) from stripe.events where _table is not null",
            )
            .fetch_one(&mut lock)
            .await?
            .unwrap_or(horizon),
        };
        let mut total = 0u64;
        while day < horizon {
            let next = (day + DAY).min(horizon);
            let n: i32 = sqlx::query_scalar("select stripe.prune_history_between($1, $2)")
                .bind(day)
                .bind(next)
                .fetch_one(&mut lock)
                .await?;
            sqlx::query("update stripe.history_state set pruned_until = $1")
                .bind(next)
                .execute(&mut lock)
                .await?;
            total += u64::try_from(n).unwrap_or(0);
            day = next;
        }
        sqlx::query("update stripe.history_state set pruned_at = now()")
            .execute(&mut lock)
            .await?;
        Ok(Some(total))
    }

    /// Prunes now and every [`EVERY`] until `stop`.
    pub async fn every(self, stop: watch::Receiver<bool>) {
        tracing::info!(retention = ?self.retention, "history retention on");
        hourly(stop, || async {
            match self.prune().await {
                Ok(Some(n)) => tracing::info!(events = n, "history pruned"),
                Ok(None) => tracing::debug!("another applier prunes history"),
                Err(err) => {
                    tracing::warn!(error = %err, "pruning history failed; next try in an hour")
                }
            }
        })
        .await;
    }
}

/// Runs `task` now and every [`EVERY`] until `stop` (a run in progress is dropped at `stop`).
async fn hourly<F, Fut>(mut stop: watch::Receiver<bool>, mut task: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        tokio::select! {
            () = task() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// A connection of its own holding history's advisory lock `key` (0: retention, 1: indexing older events), or
/// `None` when another applier holds it. Closing the connection releases the lock.
async fn locked(pool: &PgPool, key: i32) -> Result<Option<sqlx::PgConnection>, sqlx::Error> {
    let mut connection = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar(
        "select pg_try_advisory_lock('stripe.history_lists'::regclass::oid::int, $1)",
    )
    .bind(key)
    .fetch_one(&mut connection)
    .await?;
    Ok(locked.then_some(connection))
}

/// Events one indexing transaction reads.
const INDEX_BATCH: i64 = 2_000;

/// Gives events recorded before history existed (`_rank` null) their place in it: the table and row they wrote,
/// their rank, and the row's `livemode`, computed by the code that routes new events. One applier at a time (an
/// advisory lock), a batch per transaction, in key order through `events_unranked_idx`; returns the number of
/// events indexed, or `None` when another applier is at it. Once none is left it is one lookup in an empty index:
/// the appliers run it at start and every hour (an applier of an earlier release may still record such events
/// during a rolling upgrade).
pub async fn index_older_events(
    pool: &PgPool,
    registry: &crate::registry::Registry,
) -> Result<Option<u64>, sqlx::Error> {
    let Some(mut lock) = locked(pool, 1).await? else {
        return Ok(None);
    };
    let mut after = (String::new(), String::new());
    let mut total = 0u64;
    loop {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "select _account_id, id, _raw_data::text from stripe.events \
             where (_account_id, id) > ($1, $2) and _rank is null order by _account_id, id limit $3",
        )
        .bind(&after.0)
        .bind(&after.1)
        .bind(INDEX_BATCH)
        .fetch_all(&mut lock)
        .await?;
        let Some(last) = rows.last() else { break };
        after = (last.0.clone(), last.1.clone());
        let mut update = Placed::default();
        for (account, id, raw) in &rows {
            // An unreadable body was never applied: it gets a rank of 0 and no row.
            let event = crate::event::Incoming::parse(0, raw.as_bytes()).ok();
            let placed = event
                .as_ref()
                .and_then(|e| crate::plan::placement(e, registry, account));
            update.accounts.push(account.clone());
            update.ids.push(id.clone());
            // An unreadable body keeps its stored mode.
            update
                .livemode
                .push(event.as_ref().map(crate::event::Incoming::livemode));
            update.rank.push(match (&placed, &event) {
                (Some(p), _) => p.2,
                (None, Some(e)) => crate::store::unplaced_rank(e),
                (None, None) => 0,
            });
            update.table.push(placed.as_ref().map(|p| p.0.to_owned()));
            update.row_id.push(placed.map(|p| p.1.into_owned()));
        }
        sqlx::query(
            "update stripe.events e set _table = u.tbl, _row_id = u.row_id, _rank = u.rank, \
               livemode = coalesce(u.livemode, e.livemode) \
             from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::bool[]) \
               as u(account, id, tbl, row_id, rank, livemode) \
             where e._account_id = u.account and e.id = u.id",
        )
        .bind(&update.accounts)
        .bind(&update.ids)
        .bind(&update.table)
        .bind(&update.row_id)
        .bind(&update.rank)
        .bind(&update.livemode)
        .execute(&mut lock)
        .await?;
        total += rows.len() as u64;
    }
    drop(lock);
    Ok(Some(total))
}

/// One batch's new values, by column.
#[derive(Default)]
struct Placed {
    accounts: Vec<String>,
    ids: Vec<String>,
    table: Vec<Option<String>>,
    row_id: Vec<Option<String>>,
    rank: Vec<i32>,
    livemode: Vec<Option<bool>>,
}

/// [`index_older_events`] now and every [`EVERY`] until `stop`, logging what it did.
pub async fn index_older_events_every_hour(
    pool: PgPool,
    registry: &'static crate::registry::Registry,
    stop: watch::Receiver<bool>,
) {
    hourly(stop, || async {
        match index_older_events(&pool, registry).await {
            Ok(Some(0) | None) => {}
            Ok(Some(n)) => tracing::info!(events = n, "events recorded before history now have their place in it"),
            Err(err) => tracing::warn!(error = %err, "indexing older events for history failed; next try in an hour"),
        }
    })
    .await;
}
