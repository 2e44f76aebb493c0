//! Hydration: reading again from Stripe's API the objects whose rows webhooks could not settle, and applying what
//! the API answers as snapshots, through the stream, under the same ordering rule (see [`crate::snapshot`]).
//!
//! - What asks for it: the apply transaction queues, in `stripe.hydrate_queue`, each row a bare same-second tie
//!   decided, each object whose event came at another API version than the pinned one (and, with `always`, every
//!   object an event touched); a sweep queues the parents of lists Stripe cut short (`stripe.incomplete_lists`).
//!   Only objects of the key's mode (a live key can't read test objects) whose type Stripe can retrieve by id.
//! - Coalesced: one row per object; each new ask moves its read to a settle delay after the ask, so a burst of
//!   events for one object costs one read, made after the burst, in a later second than its events (a read in the
//!   same second would yield to them).
//! - Durable and bounded: the queue is a Postgres table (one row per object at most). A reader claims due rows
//!   with a lease (`for update skip locked`: several appliers share the work), reads, publishes, and only then
//!   removes them; a crash leaves them to be claimed again when the lease ends. A row asked for again while it was
//!   being read (`dirty`) is read again.
//! - The API budget is the process's one client: a read waits for its slot; a 429 storm slows hydration down,
//!   the queue holds what waits. A 404 is a tombstone; a 403 (a permission the key lacks) drops the row with a
//!   warning; other failures back off exponentially.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::api::ApiError;
use crate::backfill::Backfill;
use crate::registry::{ObjectSpec, Registry};
use crate::snapshot::Snapshot;

/// `applier.hydrate`: which objects are read again from the API (when a key is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Rows a bare same-second tie decided, objects whose event came at another API version, cut-short lists.
    #[default]
    Ambiguous,
    /// Every object an event touched (rows always at the pinned API version), plus the above.
    Always,
    /// None.
    Never,
}

/// Why an object is queued (`stripe.hydrate_queue.reason`).
pub mod reason {
    /// A bare same-second tie decided the row.
    pub const TIE: &str = "tie";
    /// The event came at another API version than the pinned one.
    pub const VERSION: &str = "version";
    /// An embedded list Stripe cut short.
    pub const LIST: &str = "list";
    /// `applier.hydrate = always`.
    pub const ALWAYS: &str = "always";
    /// A thin event: its payload has no object.
    pub const THIN: &str = "thin";
}

/// What the apply transaction needs to queue objects.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Which objects.
    pub mode: Mode,
    /// The pinned API version.
    pub api_version: String,
    /// The key's mode: only objects of this mode can be read.
    pub live: bool,
    /// Delay between the newest ask and the read.
    pub settle: Duration,
}

impl Policy {
    /// The asks for rows of `spec` a bare tie decided (`(_account_id, livemode, id)`), those the key can read.
    pub fn asks_of_ties(
        &self,
        spec: &ObjectSpec,
        ties: Vec<(String, bool, String)>,
    ) -> impl Iterator<Item = Ask> {
        ties.into_iter()
            .filter(move |(_, livemode, _)| self.readable(spec, *livemode))
            .map(|(account, livemode, id)| Ask {
                account,
                livemode,
                table: spec.table.clone(),
                id,
                reason: reason::TIE,
            })
    }

    /// True when objects of `spec` in mode `livemode` can be read by id with this key.
    #[must_use]
    pub fn readable(&self, spec: &ObjectSpec, livemode: bool) -> bool {
        self.mode != Mode::Never && livemode == self.live && spec.list.is_some()
    }
}

/// One object to queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ask {
    /// `_account_id`.
    pub account: String,
    /// The object's mode.
    pub livemode: bool,
    /// Its table.
    pub table: String,
    /// Its id.
    pub id: String,
    /// One of [`reason`].
    pub reason: &'static str,
}

/// Queues `asks` (in the apply transaction): a new object is read a settle delay from now; one already queued is
/// read a settle delay after this ask at the earliest, and again if a reader holds it.
pub async fn queue(
    conn: &mut sqlx::PgConnection,
    asks: &[Ask],
    settle: Duration,
) -> Result<(), sqlx::Error> {
    // One row per object in the statement (Postgres refuses to update a row twice in one insert): a batch can
    // ask for an object several times (several ties, an old-version event and a tie).
    let mut seen = std::collections::HashSet::new();
    let asks: Vec<&Ask> = asks
        .iter()
        .filter(|a| seen.insert((&a.account, a.livemode, &a.table, &a.id)))
        .collect();
    if asks.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&Ask) -> String| asks.iter().map(|a| f(a)).collect::<Vec<String>>();
    sqlx::query(
        "insert into stripe.hydrate_queue as q (_account_id, livemode, table_name, id, reason, not_before) \
         select a, l, t, i, r, now() + $6 * interval '1 millisecond' \
         from unnest($1::text[], $2::bool[], $3::text[], $4::text[], $5::text[]) as x(a, l, t, i, r) \
         on conflict (_account_id, livemode, table_name, id) do update \
           set dirty = true, reason = excluded.reason, not_before = greatest(q.not_before, excluded.not_before)",
    )
    .bind(column(|a| a.account.clone()))
    .bind(asks.iter().map(|a| a.livemode).collect::<Vec<bool>>())
    .bind(column(|a| a.table.clone()))
    .bind(column(|a| a.id.clone()))
    .bind(column(|a| a.reason.to_owned()))
    .bind(i64::try_from(settle.as_millis()).unwrap_or(i64::MAX))
    .execute(conn)
    .await?;
    Ok(())
}

/// A claimed row.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Claimed {
    _account_id: String,
    livemode: bool,
    table_name: String,
    id: String,
    attempts: i32,
    /// The lease this claim set: a finish only touches the row while it still holds it.
    not_before: time::OffsetDateTime,
}

/// How one read ended.
#[derive(Debug)]
pub(crate) enum Read {
    /// Published: the object, or (`gone`: Stripe answered 404) its tombstone.
    Published {
        /// The object no longer exists.
        gone: bool,
    },
    /// Stripe refused the key: nothing else will be read either.
    Unauthorized(String),
    /// Can't be read with this key (403, 400...): dropped.
    Dropped(String),
    /// Try again later.
    Failed(String),
}

/// The reader: claims due objects, reads them, publishes them.
#[derive(Debug, Clone)]
pub struct Hydrator {
    /// The API client, stream and pool (the backfill's, for its list completion).
    pub backfill: Backfill,
    /// The `_account_id` of the platform's own objects.
    pub platform_account: String,
    /// The key's mode.
    pub live: bool,
    /// Settle delay (also the delay before a `dirty` row is read again).
    pub settle: Duration,
    /// Rows claimed, and read, at once (a claim never waits behind other reads of its own batch).
    pub batch: usize,
    /// How long a claim holds a row.
    pub lease: Duration,
}

/// How often the reader looks for due rows when there were none, and sweeps cut-short lists.
const IDLE: Duration = Duration::from_millis(500);

impl Hydrator {
    fn registry(&self) -> &'static Registry {
        self.backfill.registry
    }

    fn pool(&self) -> &PgPool {
        &self.backfill.pool
    }

    /// Reads until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        tracing::info!(live = self.live, "hydration on");
        let mut last_sweep = None::<std::time::Instant>;
        let mut failures = 0;
        loop {
            if *stop.borrow() {
                return;
            }
            if last_sweep.is_none_or(|t| t.elapsed() >= self.settle.max(IDLE)) {
                if let Err(err) = self.sweep_lists().await {
                    tracing::warn!(error = %err, "queueing cut-short lists failed");
                }
                last_sweep = Some(std::time::Instant::now());
            }
            let wait = match self.run_once().await {
                Ok(n) => {
                    failures = 0;
                    if n == 0 { IDLE } else { Duration::ZERO }
                }
                Err(err) => {
                    failures += 1;
                    let wait = backoff(failures).min(Duration::from_secs(600));
                    tracing::warn!(error = %format!("{err:#}"), retry_in = ?wait, "hydration failed; retrying");
                    wait
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }

    /// Queues the parents of cut-short lists not read since the list was last cut short (a new event cutting it
    /// short again clears `hydrated_at`); a list without a `url` can't be completed and is left alone.
    pub async fn sweep_lists(&self) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool().begin().await?;
        let queued = sqlx::query(
            "insert into stripe.hydrate_queue (_account_id, livemode, table_name, id, reason, not_before) \
             select l._account_id, l.livemode, l.parent_table, l.parent_id, $2, now() from stripe.incomplete_lists l \
             where l.livemode = $1 and l.hydrated_at is null and l.url is not null \
               and l._updated_at < now() - $3 * interval '1 millisecond' \
             on conflict do nothing",
        )
        .bind(self.live)
        .bind(reason::LIST)
        .bind(i64::try_from(self.settle.as_millis()).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "update stripe.incomplete_lists l set hydrated_at = now() from stripe.hydrate_queue q \
             where q.reason = $1 and q._account_id = l._account_id and q.livemode = l.livemode \
               and q.table_name = l.parent_table and q.id = l.parent_id and l.hydrated_at is distinct from now()",
        )
        .bind(reason::LIST)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(queued)
    }

    /// Claims the due rows (up to `batch`), reads and publishes each; the number claimed.
    pub async fn run_once(&self) -> anyhow::Result<usize> {
        let claimed: Vec<Claimed> = sqlx::query_as(
            "update stripe.hydrate_queue q set not_before = now() + $2 * interval '1 millisecond', \
               attempts = q.attempts + 1, dirty = false \
             from (select _account_id, livemode, table_name, id from stripe.hydrate_queue \
                   where not_before <= now() and livemode = $3 order by not_before limit $1 for update skip locked) d \
             where (q._account_id, q.livemode, q.table_name, q.id) = (d._account_id, d.livemode, d.table_name, d.id) \
             returning q._account_id, q.livemode, q.table_name, q.id, q.attempts, q.not_before",
        )
        .bind(i64::try_from(self.batch).unwrap_or(i64::MAX))
        .bind(i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX))
        .bind(self.live)
        .fetch_all(self.pool())
        .await?;
        let n = claimed.len();
        let reads = claimed.into_iter().map(|row| async move {
            let read = self.read(&row).await;
            (row, read)
        });
        let mut reads = futures::stream::iter(reads).buffer_unordered(self.batch);
        let mut refused = None;
        while let Some((row, read)) = reads.next().await {
            if let Read::Unauthorized(err) = &read {
                refused.get_or_insert(err.clone());
            }
            self.finish(&row, &read).await?;
        }
        match refused {
            Some(err) => anyhow::bail!("{err}"),
            None => Ok(n),
        }
    }

    /// Reads one claimed object and publishes it.
    async fn read(&self, row: &Claimed) -> Read {
        self.read_one(&row._account_id, row.livemode, &row.table_name, &row.id)
            .await
    }

    /// Reads one object (`_account_id`, table, id) and publishes it (a 404: its tombstone).
    pub(crate) async fn read_one(
        &self,
        account_id: &str,
        livemode: bool,
        table: &str,
        id: &str,
    ) -> Read {
        let Some(spec) = self.registry().objects().iter().find(|s| s.table == table) else {
            return Read::Dropped(format!("no table {table}"));
        };
        let Some(list) = &spec.list else {
            return Read::Dropped(format!("{} can't be read by id", spec.object_type));
        };
        let account = (account_id != self.platform_account).then_some(account_id);
        let per_account = list.path.contains("{account}");
        if per_account && account.is_none() {
            return Read::Dropped(format!(
                "{} is read per connected account, and this row is the platform's",
                spec.object_type
            ));
        }
        let base = list
            .path
            .replace("{account}", &crate::api::path_segment(account_id));
        let endpoint = format!("{}/{{id}}", list.path);
        let path = format!("{base}/{}", crate::api::path_segment(id));
        // Read from the platform's side, as the backfill lists them: objects under `/v1/accounts/{account}/`, and
        // objects that name their account in a field (connected accounts themselves).
        let header = if per_account || list.account_field.is_some() {
            None
        } else {
            account
        };
        let read_at = time::OffsetDateTime::now_utc().unix_timestamp();
        let object = match self.backfill.api.get(&endpoint, &path, &[], header).await {
            // A deleted object Stripe still answers for (`{id, object, deleted: true}`): the row keeps the data it
            // last had, recorded deleted.
            Ok(object) if object["id"].as_str() == Some(id) && object["deleted"] == json!(true) => {
                match self.last_known(table, account_id, livemode, id).await {
                    Ok(mut last) => {
                        if let (Some(last), Some(answer)) =
                            (last.as_object_mut(), object.as_object())
                        {
                            last.extend(answer.clone());
                        }
                        last
                    }
                    Err(err) => {
                        return Read::Failed(format!("reading the row's last state: {err}"));
                    }
                }
            }
            Ok(mut object) if object["id"].as_str() == Some(id) => {
                match self
                    .backfill
                    .complete_lists(spec, &mut object, header)
                    .await
                {
                    Ok(()) => object,
                    Err(err @ ApiError::Unauthorized { .. }) => {
                        return Read::Unauthorized(err.to_string());
                    }
                    Err(err) => return Read::Failed(err.to_string()),
                }
            }
            Ok(other) => {
                return Read::Failed(format!(
                    "Stripe answered {path} with another object: {}",
                    other["id"]
                ));
            }
            // Gone at Stripe: the row is recorded deleted, with the data it last had (Stripe answering 404 says
            // nothing new about the object's fields).
            Err(err) if err.is_not_found() => match self
                .last_known(table, account_id, livemode, id)
                .await
            {
                Ok(mut object) => {
                    object["deleted"] = json!(true);
                    object
                }
                Err(err) => return Read::Failed(format!("reading the row's last state: {err}")),
            },
            Err(err @ ApiError::Unauthorized { .. }) => return Read::Unauthorized(err.to_string()),
            Err(err @ ApiError::Refused { .. }) => return Read::Dropped(err.to_string()),
            Err(err) => return Read::Failed(err.to_string()),
        };
        let snapshot = Snapshot {
            account,
            read_at,
            object: &object,
        };
        let gone = object["deleted"] == json!(true);
        match self.backfill.publisher.publish_all(&[snapshot]).await {
            Ok(()) => Read::Published { gone },
            Err(err) => Read::Failed(format!("publishing to the stream: {err:#}")),
        }
    }

    /// The object a row last held (`_raw_data`), or the bare `{id, object, livemode}` when there is no row.
    async fn last_known(
        &self,
        table: &str,
        account_id: &str,
        livemode: bool,
        id: &str,
    ) -> Result<Value, sqlx::Error> {
        let sql = format!(
            "select _raw_data from stripe.\"{table}\" where _account_id = $1 and livemode = $2 and id = $3"
        );
        let raw: Option<Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(account_id)
            .bind(livemode)
            .bind(id)
            .fetch_optional(&self.backfill.pool)
            .await?;
        let object_type = self
            .registry()
            .objects()
            .iter()
            .find(|s| s.table == table)
            .map(|s| s.object_type.as_str());
        Ok(raw
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({ "id": id, "object": object_type, "livemode": livemode })))
    }

    /// Removes a row read (or read again later, if asked for meanwhile), or backs it off; only while this claim's
    /// lease still holds the row (a lease that ran out belongs to the next reader).
    async fn finish(&self, row: &Claimed, read: &Read) -> Result<(), sqlx::Error> {
        let key = "_account_id = $1 and livemode = $2 and table_name = $3 and id = $4 and not_before = $5";
        let (sql, wait, error) = match read {
            Read::Published { .. } | Read::Dropped(_) => {
                if let Read::Dropped(why) = read {
                    tracing::warn!(table = %row.table_name, id = %row.id, %why, "can't read this object from the API; not hydrated");
                }
                (
                    format!(
                        "with gone as (delete from stripe.hydrate_queue where {key} and not dirty returning 1) \
                         update stripe.hydrate_queue set not_before = now() + $6 * interval '1 millisecond', \
                           attempts = 0 where {key} and dirty and $7::text is null"
                    ),
                    self.settle,
                    None,
                )
            }
            Read::Failed(why) | Read::Unauthorized(why) => {
                let wait = backoff(row.attempts);
                tracing::warn!(table = %row.table_name, id = %row.id, %why, attempts = row.attempts, retry_in = ?wait, "hydration read failed");
                (
                    format!(
                        "update stripe.hydrate_queue set not_before = now() + $6 * interval '1 millisecond', \
                           last_error = $7 where {key}"
                    ),
                    wait,
                    Some(why.as_str()),
                )
            }
        };
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&row._account_id)
            .bind(row.livemode)
            .bind(&row.table_name)
            .bind(&row.id)
            .bind(row.not_before)
            .bind(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX))
            .bind(error)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

/// The wait after the `attempts`th failed read: 5 s doubling, at most an hour.
fn backoff(attempts: i32) -> Duration {
    Duration::from_secs(5)
        .saturating_mul(1 << attempts.clamp(1, 12).saturating_sub(1))
        .min(Duration::from_secs(3600))
}

/// Shared by the applier's apply path: the policy, when hydration is on.
pub type Shared = Option<Arc<Policy>>;

/// The objects a batch's new events ask to have read, beside the rows ties decided (`ties`, keyed by table):
/// thin events' objects (unless the v1 event of the same change, their `snapshot_event`, is in `recorded`),
/// events at another API version than the pinned one, and with `always` every event's object. Snapshots never ask.
#[must_use]
pub fn asks_of_events<'a>(
    policy: &Policy,
    registry: &Registry,
    events: impl Iterator<Item = (&'a crate::event::Incoming, &'a str)>,
    recorded: &std::collections::HashSet<String>,
) -> Vec<Ask> {
    let mut out = Vec::new();
    for (event, account) in events {
        if event.kind() == crate::version::Kind::Snapshot {
            continue;
        }
        let reason = if event.thin {
            if event
                .snapshot_event
                .as_ref()
                .is_some_and(|id| recorded.contains(id))
            {
                continue;
            }
            reason::THIN
        } else if policy.mode == Mode::Always {
            reason::ALWAYS
        } else if event
            .api_version
            .as_deref()
            .is_some_and(|v| v != policy.api_version)
        {
            reason::VERSION
        } else {
            continue;
        };
        let (Some(kind), Some(id)) = (&event.object_type, &event.object_id) else {
            continue;
        };
        let Some(spec) = registry.get(kind) else {
            continue;
        };
        if !policy.readable(spec, event.livemode()) {
            continue;
        }
        out.push(Ask {
            account: account.to_owned(),
            livemode: event.livemode(),
            table: spec.table.clone(),
            id: id.clone(),
            reason,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_reads_back_off_from_5_seconds_to_an_hour() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(30), Duration::from_secs(3600));
        assert_eq!(backoff(0), Duration::from_secs(5));
    }

    #[test]
    fn events_ask_for_reads_by_mode_version_and_key_mode() {
        let registry = Registry::shipped();
        let none = std::collections::HashSet::new();
        let policy = Policy {
            mode: Mode::Ambiguous,
            api_version: "2026-07-29.dahlia".into(),
            live: true,
            settle: Duration::from_secs(2),
        };
        let event = |id: &str, version: &str, live: bool, kind: &str| {
            let body = json!({
                "id": id, "object": "event", "type": format!("{kind}.updated"), "created": 1,
                "livemode": live, "api_version": version,
                "data": { "object": { "id": format!("{kind}_1"), "object": kind, "livemode": live } },
            });
            crate::event::Incoming::parse(1, &serde_json::to_vec(&body).unwrap()).unwrap()
        };
        let events = [
            event("evt_same", "2026-07-29.dahlia", true, "customer"),
            event("evt_old", "2020-03-02", true, "customer"),
            event("evt_old_test", "2020-03-02", false, "customer"),
            event("evt_old_unknown", "2020-03-02", true, "no_such_thing"),
        ];
        let asks = asks_of_events(
            &policy,
            registry,
            events.iter().map(|e| (e, "platform")),
            &none,
        );
        assert_eq!(
            asks,
            vec![Ask {
                account: "platform".into(),
                livemode: true,
                table: "customers".into(),
                id: "customer_1".into(),
                reason: reason::VERSION,
            }],
            "only the live event at another version: a live key can't read test objects"
        );
        let always = Policy {
            mode: Mode::Always,
            ..policy.clone()
        };
        assert_eq!(
            asks_of_events(
                &always,
                registry,
                events.iter().map(|e| (e, "platform")),
                &none
            )
            .len(),
            2
        );
        let never = Policy {
            mode: Mode::Never,
            ..policy
        };
        assert!(
            asks_of_events(
                &never,
                registry,
                events.iter().map(|e| (e, "platform")),
                &none
            )
            .is_empty()
        );
    }
}
