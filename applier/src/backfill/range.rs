//! One object type of one account: its ranges, paged in parallel, split while there is room, checkpointed after
//! every page the stream has stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::mpsc;

use super::{Backfill, Options, TypeOutcome, base_query};
use crate::api::ApiError;
use crate::registry::{ListEndpoint, ObjectSpec};
use crate::snapshot::Snapshot;

/// Objects per page, Stripe's most.
pub(crate) const PAGE: usize = 100;

/// A range of `created` being paged newest first.
#[derive(Debug, Clone)]
pub(super) struct Range {
    /// Its row in `stripe.backfill_ranges`.
    id: i64,
    /// `created >= start`.
    pub(super) start: i64,
    /// `created < end`.
    pub(super) end: i64,
    /// The last object published, and its `created`.
    cursor: Option<(String, i64)>,
}

/// One object type of one account in a run.
#[derive(Debug)]
pub(super) struct TypeJob {
    pub(super) backfill: Backfill,
    pub(super) run: i64,
    pub(super) account: Option<String>,
    pub(super) spec: &'static ObjectSpec,
    pub(super) since: i64,
}

/// The unfinished run that asked for the same, or a new one.
pub(super) async fn find_or_create_run(
    pool: &PgPool,
    objects: &[String],
    options: &Options,
) -> anyhow::Result<i64> {
    // One finder at a time: two backfills of the same objects started together find the same run (and the second
    // then finds it locked), rather than each creating its own.
    let mut tx = pool.begin().await?;
    sqlx::query("select pg_advisory_xact_lock('stripe.backfill_runs'::regclass::oid::int, 0)")
        .execute(&mut *tx)
        .await?;
    if !options.restart {
        let found: Option<i64> = sqlx::query_scalar(
            "select id from stripe.backfill_runs where finished_at is null and objects = $1 and since = $2 \
             and connected_accounts = $3 order by id desc limit 1",
        )
        .bind(objects)
        .bind(options.since)
        .bind(options.connected_accounts)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(run) = found {
            tracing::info!(run, "resuming an unfinished backfill");
            tx.commit().await?;
            return Ok(run);
        }
    }
    let run = sqlx::query_scalar(
        "insert into stripe.backfill_runs (objects, since, connected_accounts) values ($1, $2, $3) returning id",
    )
    .bind(objects)
    .bind(options.since)
    .bind(options.connected_accounts)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(run)
}

/// Marks a run finished: the next backfill starts afresh.
pub(super) async fn finish_run(pool: &PgPool, run: i64) -> anyhow::Result<()> {
    sqlx::query("update stripe.backfill_runs set finished_at = now() where id = $1")
        .bind(run)
        .execute(pool)
        .await?;
    Ok(())
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl TypeJob {
    fn account_key(&self) -> &str {
        self.account.as_deref().unwrap_or("")
    }

    fn list(&self) -> &'static ListEndpoint {
        self.spec
            .list
            .as_ref()
            .unwrap_or_else(|| unreachable!("only listable types get a job"))
    }

    /// The request's path and `Stripe-Account`: a path naming `{account}` is the platform's view of a connected
    /// account; any other path is read as the account itself.
    fn target(&self) -> (String, Option<&str>) {
        let list = self.list();
        match &self.account {
            Some(account) if list.path.contains("{account}") => (
                list.path
                    .replace("{account}", &crate::api::path_segment(account)),
                None,
            ),
            account => (list.path.clone(), account.as_deref()),
        }
    }

    async fn insert_range<'e>(
        &self,
        db: impl sqlx::PgExecutor<'e>,
        start: i64,
        end: i64,
    ) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "insert into stripe.backfill_ranges (run_id, _account_id, object_type, range_start, range_end) \
             values ($1, $2, $3, $4, $5) returning id",
        )
        .bind(self.run)
        .bind(self.account_key())
        .bind(&self.spec.object_type)
        .bind(start)
        .bind(end)
        .fetch_one(db)
        .await
    }

    /// Pages every unfinished range of the type to the end, splitting ranges while there is room.
    pub(super) async fn run(self) -> Result<TypeOutcome, ApiError> {
        let pool = &self.backfill.pool;
        let sql = |e: sqlx::Error| ApiError::GaveUp {
            attempts: 1,
            last: format!("checkpoint: {e}"),
        };
        type Row = (
            i64,
            i64,
            i64,
            Option<String>,
            Option<i64>,
            bool,
            i64,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "select id, range_start, range_end, cursor, cursor_created, done, objects, skipped \
             from stripe.backfill_ranges where run_id = $1 and _account_id = $2 and object_type = $3",
        )
        .bind(self.run)
        .bind(self.account_key())
        .bind(&self.spec.object_type)
        .fetch_all(pool)
        .await
        .map_err(sql)?;
        if let Some(why) = rows.iter().find_map(|r| r.7.clone()) {
            return Ok(TypeOutcome::Skipped(why));
        }
        let mut pending: Vec<Range> = rows
            .iter()
            .filter(|r| !r.5)
            .map(|r| Range {
                id: r.0,
                start: r.1,
                end: r.2,
                cursor: r.3.clone().zip(r.4),
            })
            .collect();
        let before: u64 = rows.iter().map(|r| r.6 as u64).sum();
        if rows.is_empty() {
            let (start, end) = (self.since, now() + 1);
            let id = self.insert_range(pool, start, end).await.map_err(sql)?;
            pending.push(Range {
                id,
                start,
                end,
                cursor: None,
            });
        }
        for range in &pending {
            let top = range.cursor.as_ref().map_or(range.end, |c| c.1);
            self.backfill
                .progress
                .to_page(&self.spec.object_type, top - range.start);
        }
        let job = Arc::new(self);
        let active = Arc::new(AtomicUsize::new(0));
        let (split_tx, mut split_rx) = mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        let spawn = |tasks: &mut tokio::task::JoinSet<_>, range: Range| {
            active.fetch_add(1, Ordering::SeqCst);
            let (job, active, split_tx) = (job.clone(), active.clone(), split_tx.clone());
            tasks.spawn(async move {
                let result = job.page(range, &active, &split_tx).await;
                active.fetch_sub(1, Ordering::SeqCst);
                result
            });
        };
        for range in pending {
            spawn(&mut tasks, range);
        }
        let mut published = 0u64;
        let mut first_error = None;
        loop {
            // A range sends its split before it goes on paging, so a split is always received before the
            // completion of the range that made it (the split branch comes first).
            tokio::select! {
                biased;
                Some(range) = split_rx.recv() => spawn(&mut tasks, range),
                done = tasks.join_next() => match done {
                    None => match split_rx.try_recv() {
                        Ok(range) => spawn(&mut tasks, range),
                        Err(_) => break,
                    },
                    Some(Ok(Ok(n))) => published += n,
                    Some(Ok(Err(err))) => {
                        if matches!(err, ApiError::Unauthorized { .. }) {
                            return Err(err);
                        }
                        first_error.get_or_insert(err);
                    }
                    Some(Err(join)) => {
                        first_error.get_or_insert(ApiError::GaveUp { attempts: 1, last: join.to_string() });
                    }
                },
            }
        }
        match first_error {
            Some(ApiError::Refused {
                status, message, ..
            }) if published == 0 && before == 0 && matches!(status, 400 | 403 | 404) => {
                let why = format!("{status}: {message}");
                tracing::warn!(object = %job.spec.object_type, account = job.account_key(), %why, "the account can't list this type; skipped");
                sqlx::query(
                    "update stripe.backfill_ranges set skipped = $4 where run_id = $1 and _account_id = $2 \
                     and object_type = $3",
                )
                .bind(job.run)
                .bind(job.account_key())
                .bind(&job.spec.object_type)
                .bind(&why)
                .execute(&job.backfill.pool)
                .await
                .map_err(sql)?;
                Ok(TypeOutcome::Skipped(why))
            }
            Some(err) => Ok(TypeOutcome::Failed(err.to_string())),
            None => Ok(TypeOutcome::Loaded(before + published)),
        }
    }

    /// Pages one range to its end; returns the objects published.
    async fn page(
        &self,
        mut range: Range,
        active: &AtomicUsize,
        split: &mpsc::UnboundedSender<Range>,
    ) -> Result<u64, ApiError> {
        let list = self.list();
        let (path, header) = self.target();
        let mut published = 0;
        let progress = &self.backfill.progress;
        let kind = self.spec.object_type.as_str();
        loop {
            let read_at = now();
            let mut query = base_query(list);
            query.push(("limit".into(), PAGE.to_string()));
            query.extend(range.created_query(list));
            if let Some((after, _)) = &range.cursor {
                query.push(("starting_after".into(), after.clone()));
            }
            let page = match self
                .backfill
                .api
                .get(&list.path, &path, &query, header)
                .await
            {
                // The cursor's object is gone (deleted since the checkpoint): go on below its second instead, or,
                // for a list without a `created` filter, from the top again (what is published twice is deduped
                // by the ordering guard).
                Err(ApiError::Refused {
                    status: 400 | 404, ..
                }) if range.cursor.is_some() => {
                    let (_, created) = range.cursor.take().unwrap_or_default();
                    if list.created {
                        range.end = created + 1;
                    }
                    continue;
                }
                other => other?,
            };
            let (mut items, has_more) = list_page(page, list.created)?;
            for item in &mut items {
                self.backfill
                    .complete_lists(self.spec, item, header)
                    .await?;
            }
            let snapshots: Vec<Snapshot<'_>> = items
                .iter()
                .map(|object| Snapshot {
                    account: list
                        .account_field
                        .as_deref()
                        .and_then(|f| object[f].as_str())
                        .or(self.account.as_deref()),
                    read_at,
                    object,
                })
                .collect();
            self.backfill
                .publisher
                .publish_all(&snapshots)
                .await
                .map_err(|e| ApiError::GaveUp {
                    attempts: 1,
                    last: format!("publishing to the stream: {e:#}"),
                })?;
            let top = range.cursor.as_ref().map_or(range.end, |c| c.1);
            range.cursor = items.last().map(|o| {
                (
                    o["id"].as_str().unwrap_or_default().to_owned(),
                    o["created"].as_i64().unwrap_or(range.start),
                )
            });
            published += items.len() as u64;
            progress.add(kind, items.len() as u64);
            let bottom = match (&range.cursor, has_more) {
                (Some((_, created)), true) => *created,
                _ => range.start,
            };
            // Above the page's newest object, the span held nothing: it leaves the estimate (see `Progress`).
            let newest = items
                .first()
                .and_then(|o| o["created"].as_i64())
                .unwrap_or(bottom)
                .clamp(bottom, top);
            progress.paged(kind, top - newest, true);
            progress.paged(kind, newest - bottom, false);
            let room = active.load(Ordering::SeqCst) < self.backfill.ranges_per_type;
            let older = if has_more && list.created && room {
                Self::split(&mut range)
            } else {
                None
            };
            // A busy or restarting Postgres delays the checkpoint; only one that keeps failing for minutes fails
            // the type (and a new run resumes from the last checkpoint).
            let mut attempt = 1;
            let older = loop {
                match self.checkpoint(&range, items.len(), !has_more, older).await {
                    Ok(older) => break older,
                    Err(e) if attempt < CHECKPOINT_ATTEMPTS => {
                        let wait = Duration::from_millis(250 << attempt.min(6));
                        tracing::warn!(object = kind, error = %e, attempt, retry_in = ?wait, "checkpoint failed; retrying");
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                    }
                    Err(e) => {
                        return Err(ApiError::GaveUp {
                            attempts: attempt,
                            last: format!("checkpoint: {e}"),
                        });
                    }
                }
            };
            if let Some(older) = older {
                let _ = split.send(older);
            }
            if !has_more {
                return Ok(published);
            }
        }
    }

    /// Splits off the older half of what is left of `range` (it keeps paging the newer half from its cursor):
    /// the split-off range's bounds, not recorded yet.
    fn split(range: &mut Range) -> Option<(i64, i64)> {
        let (_, below) = range.cursor.as_ref()?;
        let mid = range.start + (below - range.start) / 2;
        if mid <= range.start || *below - range.start < 2 {
            return None;
        }
        let older = (range.start, mid);
        range.start = mid;
        Some(older)
    }

    /// Records a page in one transaction: the range's cursor (and new start, if it split), and the split-off
    /// range, returned with its id.
    async fn checkpoint(
        &self,
        range: &Range,
        objects: usize,
        done: bool,
        split: Option<(i64, i64)>,
    ) -> Result<Option<Range>, sqlx::Error> {
        let mut tx = self.backfill.pool.begin().await?;
        sqlx::query(
            "update stripe.backfill_ranges set range_start = $2, range_end = $3, cursor = $4, cursor_created = $5, \
               objects = objects + $6, done = $7, _updated_at = now() where id = $1",
        )
        .bind(range.id)
        .bind(range.start)
        .bind(range.end)
        .bind(range.cursor.as_ref().map(|c| c.0.as_str()))
        .bind(range.cursor.as_ref().map(|c| c.1))
        .bind(objects as i64)
        .bind(done)
        .execute(&mut *tx)
        .await?;
        let older = match split {
            Some((start, end)) => Some(Range {
                id: self.insert_range(&mut *tx, start, end).await?,
                start,
                end,
                cursor: None,
            }),
            None => None,
        };
        tx.commit().await?;
        Ok(older)
    }
}

/// Attempts at a checkpoint before the type fails: about four minutes of waits at 16 s at most.
const CHECKPOINT_ATTEMPTS: u32 = 20;

/// A list page's items and whether more follow. A page that isn't one (no `data` array, an item without a string
/// id, or, where the list is paged by `created`, without an integer `created`) is an error: never the end of a list,
/// and never a cursor that would page from the top again.
pub(crate) fn list_page(page: Value, created: bool) -> Result<(Vec<Value>, bool), ApiError> {
    let has_more = page["has_more"] == json!(true);
    let Value::Array(items) = page.get("data").cloned().unwrap_or(Value::Null) else {
        return Err(ApiError::Unreadable(
            "a list page without a data array".into(),
        ));
    };
    if let Some(bad) = items
        .iter()
        .find(|o| !o["id"].is_string() || (created && !o["created"].is_i64()))
    {
        let shown: String = bad.to_string().chars().take(200).collect();
        return Err(ApiError::Unreadable(format!(
            "a list item without {}: {shown}",
            if bad["id"].is_string() {
                "an integer created"
            } else {
                "a string id"
            }
        )));
    }
    Ok((items.clone(), has_more && !items.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_that_is_not_a_list_page_is_an_error_not_the_end_of_the_list() {
        let ok = json!({"data": [{"id": "cus_1", "created": 5}], "has_more": true});
        assert!(list_page(ok, true).unwrap().1, "more follow");
        let empty = json!({"data": [], "has_more": true});
        assert_eq!(
            list_page(empty, true).unwrap(),
            (vec![], false),
            "an empty page ends the list"
        );
        for bad in [
            json!({"object": "list", "has_more": false}),
            json!({"data": {"id": "cus_1"}, "has_more": false}),
            json!({"data": [{"created": 5}], "has_more": true}),
            json!({"data": [{"id": 7, "created": 5}], "has_more": false}),
            json!({"data": [{"id": "cus_1", "created": "yesterday"}], "has_more": true}),
        ] {
            assert!(
                matches!(list_page(bad.clone(), true), Err(ApiError::Unreadable(_))),
                "{bad}"
            );
        }
        assert!(list_page(json!({"data": [{"id": "li_1"}], "has_more": false}), false).is_ok());
    }
}
