//! `stripe-sync-applier reconcile`, and the scheduled reconcile (`reconcile.interval`): finds where the tables and
//! Stripe's API disagree, and makes them agree through the stream.
//!
//! Per type, the walk pages the API's list (at `reconcile.share` of the API budget), compares each object with its
//! row ([`same`]), and publishes as snapshots the objects that differ or have no row. The ids it saw go to
//! `stripe.reconcile_seen` (Postgres, not memory); a row not seen, and not touched since the walk began, is read
//! again by id: Stripe's 404 makes it a tombstone (deleted with no event), an object the list leaves out comes back
//! as it is. Drift per table is recorded in `stripe.reconcile_tables` and each id logged.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::api::ApiError;
use crate::backfill::{Backfill, Options, PAGE, base_query, list_page};
use crate::hydrate::{Hydrator, Read};
use crate::registry::ObjectSpec;
use crate::settings::StripeSettings;
use crate::snapshot::Snapshot;

/// What a reconcile found in one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// The table.
    pub table: String,
    /// Objects the API listed.
    pub listed: u64,
    /// Listed objects whose row differed.
    pub changed: u64,
    /// Listed objects with no row.
    pub added: u64,
    /// Rows Stripe no longer has (404): marked deleted.
    pub deleted: u64,
    /// Rows the list left out that still exist: read by id and published again.
    pub unlisted: u64,
    /// Rows the list left out that can't be read by id (a 400 or 403 for that object): logged, left as they are.
    pub unreadable: u64,
    /// Why the table was not reconciled although nothing failed (the account can't list it, or it is read per
    /// connected account).
    pub skipped: Option<String>,
    /// Why the table was not (wholly) reconciled.
    pub error: Option<String>,
}

impl Drift {
    /// Rows that were not equal to the API.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.changed + self.added + self.deleted
    }
}

/// What one reconcile did.
#[derive(Debug, Default)]
pub struct Report {
    /// Its run (`stripe.reconcile_runs.id`).
    pub run: i64,
    /// Per table.
    pub tables: Vec<Drift>,
    /// How long it took.
    pub elapsed: Duration,
}

impl Report {
    /// True when every table was reconciled.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.tables.iter().all(|t| t.error.is_none())
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let drift: u64 = self.tables.iter().map(Drift::total).sum();
        writeln!(
            f,
            "reconcile run {}: {drift} rows differed from Stripe's API, fixed through the stream ({:.1}s)",
            self.run,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "TABLE\tLISTED\tCHANGED\tADDED\tDELETED\tUNLISTED")?;
        for t in &self.tables {
            write!(
                f,
                "{}\t{}\t{}\t{}\t{}\t{}",
                t.table, t.listed, t.changed, t.added, t.deleted, t.unlisted
            )?;
            match (&t.error, &t.skipped) {
                (Some(why), _) => writeln!(f, "\tNOT RECONCILED: {why}")?,
                (None, Some(why)) => writeln!(f, "\tskipped: {why}")?,
                (None, None) => writeln!(f)?,
            }
        }
        Ok(())
    }
}

/// True when a row's `_raw_data` says what the API's object says. Embedded lists are left out on both sides: the
/// API cuts them short in lists (the row holds them whole), and their items have tables of their own.
#[must_use]
pub fn same(row: &Value, object: &Value) -> bool {
    without_lists(row) == without_lists(object)
}

fn without_lists(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| v.get("object").and_then(Value::as_str) != Some("list"))
                .map(|(k, v)| (k.clone(), without_lists(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_lists).collect()),
        other => other.clone(),
    }
}

/// A client with `share` of each of `settings`' budgets (at least one request per second).
#[must_use]
pub fn budget_share(settings: &StripeSettings, share: f64) -> StripeSettings {
    let scale = |n: std::num::NonZeroU32| {
        let scaled = (f64::from(n.get()) * share.clamp(0.0, 1.0)).floor();
        std::num::NonZeroU32::new(scaled as u32).unwrap_or(std::num::NonZeroU32::MIN)
    };
    StripeSettings {
        live_requests_per_second: scale(settings.live_requests_per_second),
        test_requests_per_second: scale(settings.test_requests_per_second),
        endpoint_requests_per_second: scale(settings.endpoint_requests_per_second),
        ..settings.clone()
    }
}

/// Everything a reconcile needs: the hydrator reads rows by id (and holds the client, stream and pool).
#[derive(Debug, Clone)]
pub struct Reconcile {
    /// Reads by id; its backfill lists and publishes.
    pub hydrator: Hydrator,
}

impl Reconcile {
    /// A reconcile reading through its own client, at `reconcile.share` of the API budget.
    pub fn new(
        settings: &crate::settings::Settings,
        js: async_nats::jetstream::Context,
        topology: stripe_sync_shared::subjects::Topology,
        pool: PgPool,
    ) -> anyhow::Result<Self> {
        let stripe = budget_share(&settings.stripe, settings.reconcile.share);
        let api = std::sync::Arc::new(crate::api::StripeClient::new(&stripe)?);
        let live = stripe
            .api_key
            .as_ref()
            .is_some_and(|k| crate::api::is_live_key(secrecy::ExposeSecret::expose_secret(k)));
        Ok(Self {
            hydrator: Hydrator {
                backfill: Backfill::new(settings, api, js, topology, pool),
                platform_account: settings.applier.account_id.clone(),
                live,
                settle: settings.applier.hydrate_settle,
                batch: 16,
                lease: Duration::from_secs(60),
            },
        })
    }

    fn backfill(&self) -> &Backfill {
        &self.hydrator.backfill
    }

    fn pool(&self) -> &PgPool {
        &self.backfill().pool
    }

    /// Reconciles the types `objects` names (object types or tables; empty: every listable type), one at a time.
    /// One reconcile at a time per database: a second one refuses.
    pub async fn run(&self, objects: &[String]) -> anyhow::Result<Report> {
        let started = std::time::Instant::now();
        let mut types = self.backfill().types(&Options {
            objects: objects.to_vec(),
            ..Options::default()
        })?;
        let mut named = std::collections::HashSet::new();
        types.retain(|s| named.insert(&s.object_type));
        let mut lock = self.pool().acquire().await?.detach();
        let locked: bool = sqlx::query_scalar(
            "select pg_try_advisory_lock('stripe.reconcile_runs'::regclass::oid::int, 0)",
        )
        .fetch_one(&mut lock)
        .await?;
        anyhow::ensure!(locked, "another reconcile is running against this database");
        // Left by a reconcile that crashed mid-walk (none runs now: the lock says so).
        sqlx::query("delete from stripe.reconcile_seen")
            .execute(self.pool())
            .await?;
        let run: i64 = sqlx::query_scalar(
            "insert into stripe.reconcile_runs (objects) values ($1) returning id",
        )
        .bind(objects)
        .fetch_one(self.pool())
        .await?;
        let mut report = Report {
            run,
            ..Report::default()
        };
        for spec in types {
            // A connected account's own lists (`/v1/accounts/{account}/...`) are not the platform's.
            if spec
                .list
                .as_ref()
                .is_some_and(|l| l.path.contains("{account}"))
            {
                continue;
            }
            // Connected accounts themselves: each row is its own account's (`account_field`), not the platform's.
            if spec
                .list
                .as_ref()
                .is_some_and(|l| l.account_field.is_some())
            {
                report.tables.push(Drift {
                    table: spec.table.clone(),
                    skipped: Some(
                        "rows of connected accounts are not reconciled yet: use `sync`".into(),
                    ),
                    ..Drift::default()
                });
                continue;
            }
            let drift = self.table(run, spec).await;
            if let Some(why) = &drift.error
                && why.starts_with("unauthorized")
            {
                anyhow::bail!("{why}");
            }
            report.tables.push(drift);
        }
        sqlx::query("update stripe.reconcile_runs set finished_at = now() where id = $1")
            .bind(run)
            .execute(self.pool())
            .await?;
        let _ = sqlx::Connection::close(lock).await;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Reconciles every `interval` until `stop` (one applier at a time: the others skip their turn).
    pub async fn every(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        tracing::info!(?interval, "scheduled reconcile on");
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            tokio::select! {
                report = self.run(&[]) => match report {
                    Ok(report) => {
                        let drift: u64 = report.tables.iter().map(Drift::total).sum();
                        tracing::info!(run = report.run, drift, ok = report.ok(), "reconcile done");
                    }
                    Err(err) => tracing::warn!(error = %format!("{err:#}"), "reconcile did not run"),
                },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Reconciles one table; errors end up in the drift's `error`.
    async fn table(&self, run: i64, spec: &'static ObjectSpec) -> Drift {
        let mut drift = Drift {
            table: spec.table.clone(),
            ..Drift::default()
        };
        let outcome = self.walk(run, spec, &mut drift).await;
        match outcome {
            Ok(()) => {}
            Err(Failure::Api(err @ ApiError::Unauthorized { .. })) => {
                drift.error = Some(format!("unauthorized: {err}"));
            }
            Err(Failure::Unauthorized(why)) => drift.error = Some(format!("unauthorized: {why}")),
            Err(Failure::Api(ApiError::Refused {
                status, message, ..
            })) if drift.listed == 0 && matches!(status, 400 | 403 | 404) => {
                drift.skipped = Some(format!("the account can't list it ({status}: {message})"));
            }
            Err(err) => drift.error = Some(err.to_string()),
        }
        if let Some(why) = drift.error.as_ref().or(drift.skipped.as_ref()) {
            tracing::warn!(table = %spec.table, %why, "table not reconciled");
        }
        metrics::gauge!(stripe_sync_shared::metrics::names::RECONCILE_DRIFT, "table" => spec.table.clone())
            .set(drift.total() as f64);
        let recorded = sqlx::query(
            "insert into stripe.reconcile_tables \
               (run_id, table_name, listed, changed, added, deleted, unlisted, unreadable, skipped, error, finished_at) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now()) \
             on conflict (run_id, table_name) do update set listed = $3, changed = $4, added = $5, deleted = $6, \
               unlisted = $7, unreadable = $8, skipped = $9, error = $10, finished_at = now()",
        )
        .bind(run)
        .bind(&spec.table)
        .bind(count(drift.listed))
        .bind(count(drift.changed))
        .bind(count(drift.added))
        .bind(count(drift.deleted))
        .bind(count(drift.unlisted))
        .bind(count(drift.unreadable))
        .bind(&drift.skipped)
        .bind(&drift.error)
        .execute(self.pool())
        .await;
        if let Err(err) = recorded {
            tracing::warn!(table = %spec.table, error = %err, "could not record the table's drift");
        }
        let _ =
            sqlx::query("delete from stripe.reconcile_seen where run_id = $1 and table_name = $2")
                .bind(run)
                .bind(&spec.table)
                .execute(self.pool())
                .await;
        drift
    }

    async fn walk(&self, run: i64, spec: &ObjectSpec, drift: &mut Drift) -> Result<(), Failure> {
        let Some(list) = &spec.list else {
            return Ok(());
        };
        let backfill = self.backfill();
        let live = self.hydrator.live;
        let platform = &self.hydrator.platform_account;
        let table = &spec.table;
        // Rows touched after this may be objects created during the walk, after the list's first pages.
        let began: time::OffsetDateTime = sqlx::query_scalar(
            "insert into stripe.reconcile_tables (run_id, table_name) values ($1, $2) returning started_at",
        )
        .bind(run)
        .bind(table)
        .fetch_one(self.pool())
        .await?;
        let mut after: Option<String> = None;
        loop {
            let mut query = base_query(list);
            query.push(("limit".into(), PAGE.to_string()));
            if let Some(after) = &after {
                query.push(("starting_after".into(), after.clone()));
            }
            let read_at = time::OffsetDateTime::now_utc().unix_timestamp();
            let page = backfill
                .api
                .get(&list.path, &list.path, &query, None)
                .await?;
            let (objects, more) = list_page(page, false)?;
            // The cursor is the page's last item, whatever its mode.
            let last = objects
                .last()
                .and_then(|o| o["id"].as_str())
                .map(str::to_owned);
            // Objects without a mode of their own (files) are the key's.
            let objects: Vec<Value> = objects
                .into_iter()
                .filter(|o| o["livemode"].as_bool().unwrap_or(live) == live)
                .collect();
            let ids: Vec<String> = objects
                .iter()
                .filter_map(|o| o["id"].as_str().map(str::to_owned))
                .collect();
            sqlx::query(
                "insert into stripe.reconcile_seen (run_id, table_name, id) \
                 select $1, $2, unnest($3::text[]) on conflict do nothing",
            )
            .bind(run)
            .bind(table)
            .bind(&ids)
            .execute(self.pool())
            .await?;
            let rows: HashMap<String, (Value, bool)> = sqlx::query_as::<_, (String, Value, bool)>(sqlx::AssertSqlSafe(format!(
                "select id, _raw_data, deleted from stripe.\"{table}\" where _account_id = $1 and livemode = $2 and id = any($3)"
            )))
            .bind(platform)
            .bind(live)
            .bind(&ids)
            .fetch_all(self.pool())
            .await?
            .into_iter()
            .map(|(id, raw, deleted)| (id, (raw, deleted)))
            .collect();
            drift.listed += objects.len() as u64;
            for mut object in objects {
                let id = object["id"].as_str().unwrap_or_default().to_owned();
                match rows.get(&id) {
                    // Stripe lists only live objects: a listed object whose row says deleted is drift too.
                    Some((row, false)) if same(row, &object) => continue,
                    Some(_) => {
                        drift.changed += 1;
                        tracing::info!(%table, %id, drift = "changed", "row differed from Stripe's API");
                    }
                    None => {
                        drift.added += 1;
                        tracing::info!(%table, %id, drift = "added", "object had no row");
                    }
                }
                backfill.complete_lists(spec, &mut object, None).await?;
                backfill
                    .publisher
                    .publish_all(&[Snapshot {
                        account: None,
                        read_at,
                        object: &object,
                    }])
                    .await
                    .map_err(|e| Failure::Stream(format!("{e:#}")))?;
            }
            after = last;
            if !more || after.is_none() {
                break;
            }
        }
        self.unseen(run, spec, began, drift).await
    }

    /// Reads again by id, a page at a time, every live row of the table the walk did not see.
    async fn unseen(
        &self,
        run: i64,
        spec: &ObjectSpec,
        began: time::OffsetDateTime,
        drift: &mut Drift,
    ) -> Result<(), Failure> {
        let table = &spec.table;
        let platform = &self.hydrator.platform_account;
        let mut after = String::new();
        loop {
            let ids: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "select t.id from stripe.\"{table}\" t where t._account_id = $1 and t.livemode = $2 \
                   and not t.deleted and t._updated_at < $3 and t.id > $4 \
                   and not exists (select 1 from stripe.reconcile_seen s \
                                   where s.run_id = $5 and s.table_name = $6 and s.id = t.id) \
                 order by t.id limit 500"
            )))
            .bind(platform)
            .bind(self.hydrator.live)
            .bind(began)
            .bind(&after)
            .bind(run)
            .bind(table)
            .fetch_all(self.pool())
            .await?;
            let Some(last) = ids.last() else {
                return Ok(());
            };
            after.clone_from(last);
            for id in &ids {
                match self
                    .hydrator
                    .read_one(platform, self.hydrator.live, table, id)
                    .await
                {
                    Read::Published { gone: true } => {
                        drift.deleted += 1;
                        tracing::info!(%table, %id, drift = "deleted", "object deleted with no event; marked deleted");
                    }
                    Read::Published { gone: false } => drift.unlisted += 1,
                    Read::Unauthorized(why) => return Err(Failure::Unauthorized(why)),
                    Read::Dropped(why) => {
                        drift.unreadable += 1;
                        tracing::warn!(%table, %id, %why, "can't read this row's object by id; left as it is");
                    }
                    Read::Failed(why) => {
                        return Err(Failure::Stream(format!("reading {id}: {why}")));
                    }
                }
            }
        }
    }
}

/// Why a table's reconcile stopped.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Stream(String),
    #[error("{0}")]
    Unauthorized(String),
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_equal_to_the_api_are_the_same_whatever_their_embedded_lists() {
        let row = json!({"id": "in_1", "object": "invoice", "status": "paid", "amount_due": 100,
            "lines": {"object": "list", "data": [{"id": "il_1"}, {"id": "il_2"}], "has_more": false}});
        let listed = json!({"status": "paid", "object": "invoice", "id": "in_1", "amount_due": 100,
            "lines": {"object": "list", "data": [{"id": "il_1"}], "has_more": true}});
        assert!(
            same(&row, &listed),
            "a list cut short in the API's list is not drift"
        );
        let changed =
            json!({"id": "in_1", "object": "invoice", "status": "void", "amount_due": 100});
        assert!(!same(&row, &changed), "a changed field is drift");
        let grown = json!({"id": "in_1", "object": "invoice", "status": "paid", "amount_due": 100, "new": 1});
        assert!(!same(&row, &grown), "a field the row lacks is drift");
        let nested = json!({"id": "in_1", "object": "invoice", "status": "paid", "amount_due": 100,
            "customer_address": {"city": "Paris"}});
        let nested_changed = json!({"id": "in_1", "object": "invoice", "status": "paid", "amount_due": 100,
            "customer_address": {"city": "Lyon"}});
        assert!(!same(&nested, &nested_changed), "a nested change is drift");
    }

    #[test]
    fn a_reconcile_takes_its_share_of_every_budget_and_at_least_one_request_a_second() {
        let settings = StripeSettings::default();
        let low = budget_share(&settings, 0.1);
        assert_eq!(low.live_requests_per_second.get(), 8);
        assert_eq!(low.test_requests_per_second.get(), 2);
        assert_eq!(low.endpoint_requests_per_second.get(), 2);
        let tiny = budget_share(&settings, 0.0);
        assert_eq!(tiny.test_requests_per_second.get(), 1);
        assert_eq!(
            budget_share(&settings, 5.0).live_requests_per_second,
            settings.live_requests_per_second
        );
    }
}
