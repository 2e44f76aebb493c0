//! The soak's final checks, once the appliers have drained: every event answered 200 is in `stripe.events`; every
//! object has exactly one row, holding the object of its newest event; every embedded list item one row; nothing in
//! the dead letter.

use std::collections::{BTreeMap, BTreeSet};

use futures::TryStreamExt as _;
use serde_json::Value;
use sqlx::PgPool;
use stripe_sync_applier::registry::Registry;

use crate::loadgen::{Bodies, event_id, event_number};

/// Rows of one table against what the accepted events say.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct TableCheck {
    pub table: String,
    /// `object` (a parent table: its rows are checked against their newest event) or `list item`.
    pub kind: &'static str,
    /// Distinct ids among the accepted events.
    pub expected: u64,
    pub rows: u64,
    /// Parent rows not holding the object of their newest event (see [`check_newest`]).
    pub not_newest: u64,
    /// Up to 5 of those ids.
    pub not_newest_sample: Vec<String>,
    /// Rows flagged `deleted`.
    pub deleted: u64,
}

/// Everything checked.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Verdict {
    pub accepted: u64,
    /// Accepted ids answered 200 more than once (the sender never does that: a check of the check).
    pub accepted_twice: u64,
    pub events_rows: u64,
    /// Accepted ids missing from `stripe.events`.
    pub lost: u64,
    pub lost_sample: Vec<String>,
    /// Ids in `stripe.events` never answered 200 (published by an ingest killed before it answered, and not retried).
    pub unanswered: u64,
    pub tables: Vec<TableCheck>,
    /// Rows more than distinct ids, over every table.
    pub extra_rows: u64,
    /// Rows fewer than distinct ids, over every table.
    pub missing_rows: u64,
    pub dead_letters: u64,
}

/// Runs every check.
pub(crate) async fn run(
    pool: &PgPool,
    bodies: &Bodies,
    accepted: &[u64],
    dead_letters: u64,
) -> anyhow::Result<Verdict> {
    let max = accepted.iter().copied().max().unwrap_or(0);
    let mut answered = vec![false; usize::try_from(max + 1)?];
    let mut accepted_twice = 0;
    for &n in accepted {
        let seen = &mut answered[usize::try_from(n)?];
        accepted_twice += u64::from(*seen);
        *seen = true;
    }
    let mut in_events = vec![false; answered.len()];
    let (mut events_rows, mut unanswered) = (0u64, 0u64);
    let mut ids = sqlx::query_scalar::<_, String>("select id from stripe.events").fetch(pool);
    while let Some(id) = ids.try_next().await? {
        events_rows += 1;
        match event_number(&id).and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n < in_events.len() && answered[n] => in_events[n] = true,
            _ => unanswered += 1,
        }
    }
    drop(ids);
    let lost_ids: Vec<u64> = (0..answered.len())
        .filter(|&n| answered[n] && !in_events[n])
        .map(|n| n as u64)
        .collect();

    let tables = tables(pool, bodies, &answered).await?;
    let extra_rows = tables
        .iter()
        .map(|t| t.rows.saturating_sub(t.expected))
        .sum();
    let missing_rows = tables
        .iter()
        .map(|t| t.expected.saturating_sub(t.rows))
        .sum();
    Ok(Verdict {
        accepted: accepted.len() as u64,
        accepted_twice,
        events_rows,
        lost: lost_ids.len() as u64,
        lost_sample: lost_ids.iter().take(20).map(|&n| event_id(n)).collect(),
        unanswered,
        tables,
        extra_rows,
        missing_rows,
        dead_letters,
    })
}

/// Expected ids per table, from the templates of the accepted events: each object's own table, and the tables of the
/// lists it embeds (the registry says which).
fn expected(
    bodies: &Bodies,
    answered: &[bool],
) -> BTreeMap<(String, &'static str, String), BTreeSet<String>> {
    let registry = Registry::shipped();
    let templates: BTreeSet<u64> = (0..answered.len())
        .filter(|&n| answered[n])
        .map(|n| n as u64 % bodies.templates())
        .collect();
    let mut out: BTreeMap<(String, &'static str, String), BTreeSet<String>> = BTreeMap::new();
    for t in templates {
        let Ok(event) = serde_json::from_slice::<Value>(bodies.template_of(t)) else {
            continue;
        };
        let object = &event["data"]["object"];
        let (Some(kind), Some(id)) = (object["object"].as_str(), object["id"].as_str()) else {
            continue;
        };
        let Some(spec) = registry.get(kind) else {
            continue;
        };
        out.entry((spec.table.clone(), "object", kind.to_owned()))
            .or_default()
            .insert(id.to_owned());
        for list in registry.children_of(kind) {
            let items = object[&list.field]["data"].as_array().into_iter().flatten();
            for item_id in items.filter_map(|i| i["id"].as_str()) {
                out.entry((
                    list.child.table.clone(),
                    "list item",
                    list.child.object_type.clone(),
                ))
                .or_default()
                .insert(item_id.to_owned());
            }
        }
    }
    out
}

async fn tables(
    pool: &PgPool,
    bodies: &Bodies,
    answered: &[bool],
) -> anyhow::Result<Vec<TableCheck>> {
    let mut conn = pool.acquire().await?;
    // Each object's newest version among its events: latest `created`, and within that second a later kind (any
    // event but `*.created`) above a creation. (Progress, the rule's other rank, is the same for every event of one
    // generated object: they all carry the same fixture.)
    sqlx::raw_sql(
        "create temp table soak_newest as \
         select distinct on (object_type, object_id) object_type, object_id, created, \
           type not like '%.created' as later_kind \
         from stripe.events \
         order by object_type, object_id, created desc, (type not like '%.created') desc",
    )
    .execute(&mut *conn)
    .await?;
    let mut out = Vec::new();
    for ((table, kind, object_type), ids) in expected(bodies, answered) {
        let ident = format!("stripe.\"{}\"", table.replace('"', "\"\""));
        let (rows, deleted): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select count(*), count(*) filter (where deleted) from {ident}"
        )))
        .fetch_one(&mut *conn)
        .await?;
        let (not_newest, not_newest_sample) = if kind == "object" {
            check_newest(&mut conn, &ident, &object_type).await?
        } else {
            (0, Vec::new())
        };
        out.push(TableCheck {
            table,
            kind,
            expected: ids.len() as u64,
            rows: u64::try_from(rows)?,
            not_newest,
            not_newest_sample,
            deleted: u64::try_from(deleted)?,
        });
    }
    Ok(out)
}

/// Rows of `table` whose `_last_event_id` is not one of their object's newest events, or whose `_raw_data` is not
/// that event's object; and objects with events but no row.
async fn check_newest(
    conn: &mut sqlx::PgConnection,
    table: &str,
    object_type: &str,
) -> anyhow::Result<(u64, Vec<String>)> {
    let (count, sample): (i64, Vec<String>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "with checked as ( \
           select n.object_id, \
             t.id is not null and e.id is not null and e.object_id = n.object_id and e.created = n.created \
               and (e.type not like '%.created') = n.later_kind \
               and t._raw_data = e._raw_data -> 'data' -> 'object' as ok \
           from soak_newest n \
           left join {table} t on t.id = n.object_id \
           left join stripe.events e on e._account_id = t._account_id and e.id = t._last_event_id \
           where n.object_type = $1) \
         select count(*) filter (where not ok), \
           coalesce((array_agg(object_id) filter (where not ok))[1:5], '{{}}') \
         from checked"
    )))
    .bind(object_type)
    .fetch_one(conn)
    .await?;
    Ok((u64::try_from(count)?, sample))
}
