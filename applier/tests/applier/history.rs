//! History: every version of every row, and the tables as of any moment (docs/history.md), against the state the
//! tables really had at that moment.

use serde_json::Value;
use stripe_sync_testkit::history::{self, History};

use crate::helpers::Direct;

/// The tables the generated history writes.
const TABLES: &[&str] = &[
    "products",
    "prices",
    "customers",
    "subscriptions",
    "subscription_items",
    "invoices",
    "invoice_line_items",
];

/// A row as both sides must agree on it: every column but the ones that depend on where and when it was applied
/// (the stream position, the time of the write, and the flag a bare tie sets).
const ROW: &str = "to_jsonb(t) - '_updated_at' - '_last_event_seq' - '_ambiguous'";

fn generated() -> History {
    // 90 days ending a little before now.
    let start = stripe_sync_testkit::stripe::now() - 91 * 86_400;
    history::generate(13, 10_000, start, 90)
}

/// Delivers `events` in batches of 1 to 200, in the given order.
async fn deliver(direct: &Direct, events: &[Value], rng: &mut fastrand::Rng) {
    let mut rest = events;
    while !rest.is_empty() {
        let n = rng.usize(1..=200).min(rest.len());
        let (batch, tail) = rest.split_at(n);
        direct.apply(batch).await;
        rest = tail;
    }
}

/// Stripe's delivery: every event in a random order, some twice.
fn shuffled(events: &[Value], rng: &mut fastrand::Rng) -> Vec<Value> {
    let mut out: Vec<Value> = events.to_vec();
    for _ in 0..events.len() / 50 {
        out.push(events[rng.usize(0..events.len())].clone());
    }
    rng.shuffle(&mut out);
    out
}

async fn rows(direct: &Direct, from: &str) -> Vec<Value> {
    let sql = format!("select {ROW} from {from} t order by 1");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_all(&direct.pool)
        .await
        .unwrap_or_else(|e| panic!("{from}: {e}"))
}

/// The first row that differs, for a readable failure.
fn first_difference(a: &[Value], b: &[Value]) -> String {
    for (x, y) in a.iter().zip(b) {
        if x != y {
            return format!("\n  as_of: {x}\n  table: {y}");
        }
    }
    format!("{} rows against {}", a.len(), b.len())
}

/// For 20 moments over 90 days, `as_of` on a database that received all 10,000 events out of order equals the tables
/// of a database that received, in stream order, only the events up to that moment.
#[tokio::test]
async fn as_of_any_moment_equals_the_tables_as_they_were_then() {
    let generated = generated();
    let mut rng = fastrand::Rng::with_seed(7);
    let delivered = shuffled(&generated.events, &mut rng);
    let all = Direct::new().await;
    deliver(&all, &delivered, &mut rng).await;
    // With statistics, `as_of` reads a whole table in slices of its ids (one per parallel worker): the slices
    // together must hold every row once.
    sqlx::query("analyze").execute(&all.pool).await.unwrap();

    // Moments: random seconds, and seconds at which several versions of one object meet.
    let mut moments: Vec<i64> = (0..14)
        .map(|_| rng.i64(generated.start..=generated.end))
        .collect();
    let seconds: Vec<i64> = generated
        .events
        .windows(2)
        .filter(|w| {
            w[0]["created"] == w[1]["created"]
                && w[0]["data"]["object"]["id"] == w[1]["data"]["object"]["id"]
        })
        .filter_map(|w| w[0]["created"].as_i64())
        .collect();
    for _ in 0..6 {
        moments.push(seconds[rng.usize(0..seconds.len())]);
    }
    moments.sort_unstable();

    let replayed = Direct::new().await;
    let mut applied = 0;
    for (n, at) in moments.iter().enumerate() {
        // The stream up to the moment: what the tables had received by then, in the order they received it.
        let upto: Vec<Value> = delivered
            .iter()
            .filter(|e| e["created"].as_i64().is_some_and(|c| c <= *at))
            .cloned()
            .collect();
        let fresh: Vec<Value> = upto
            .iter()
            .filter(|e| {
                e["created"]
                    .as_i64()
                    .is_some_and(|c| n == 0 || c > moments[n - 1])
            })
            .cloned()
            .collect();
        deliver(&replayed, &fresh, &mut rng).await;
        applied += fresh.len();
        for table in TABLES {
            let then = rows(
                &all,
                &format!("stripe.as_of(null::stripe.{table}, to_timestamp({at}))"),
            )
            .await;
            let tables = rows(&replayed, &format!("stripe.{table}")).await;
            assert!(
                then == tables,
                "{table} as of {at} (moment {n}, {applied} events): {}",
                first_difference(&then, &tables)
            );
            if n % 4 == 0 && !table.ends_with("_items") {
                // The view's version valid then is the same row. (An owned item's removal version names the
                // parent state that removed it, where the table keeps the last one that listed it.)
                let valid = rows(
                    &all,
                    &format!(
                        "(select (jsonb_populate_record(null::stripe.{table}, to_jsonb(h))).* \
                          from stripe.{table}_history h \
                          where h._valid_from <= to_timestamp({at}) \
                            and (h._valid_to is null or h._valid_to > to_timestamp({at})))"
                    ),
                )
                .await;
                assert!(
                    valid == then,
                    "{table}_history valid at {at} (view, then as_of): {}",
                    first_difference(&valid, &then)
                );
            }
        }
    }
    let versions: i64 = all
        .scalar("select count(*) from stripe.subscriptions_history")
        .await;
    assert!(
        versions > 1_000,
        "a real history: {versions} subscription versions"
    );
}

/// The history views hold the same versions, with the same validity, whether events came in order, or shuffled
/// with duplicates and same-second events reversed.
#[tokio::test]
async fn out_of_order_delivery_gives_the_same_history() {
    let generated = generated();
    let mut rng = fastrand::Rng::with_seed(11);
    let in_order = Direct::new().await;
    deliver(&in_order, &generated.events, &mut rng).await;
    let out_of_order = Direct::new().await;
    deliver(
        &out_of_order,
        &shuffled(&generated.events, &mut rng),
        &mut rng,
    )
    .await;
    for table in TABLES {
        let view = format!("stripe.{table}_history");
        let a = rows(&in_order, &view).await;
        let b = rows(&out_of_order, &view).await;
        assert!(a == b, "{view}: {}", first_difference(&a, &b));
        assert!(!a.is_empty(), "{view} has versions");
    }
    // Same-second versions: the one the table kept is the last, valid until the next second's.
    let open: i64 = in_order
        .scalar(
            "select count(*) from stripe.invoices_history h \
             where h._valid_to is null and h.status = 'draft' \
               and exists (select 1 from stripe.invoices_history f where f.id = h.id and f.status <> 'draft')",
        )
        .await;
    assert_eq!(
        open, 0,
        "a draft is never an invoice's current version once it was finalized"
    );
}

/// Looking up one object as of a moment, and a subscription's items then.
#[tokio::test]
async fn one_object_and_its_items_as_of_a_moment() {
    let direct = Direct::new().await;
    let sub = |at: i64, status: &str, items: &[(&str, i64)]| {
        let mut s = stripe_sync_testkit::stripe::object("subscription", "sub_one");
        s["status"] = status.into();
        s["livemode"] = false.into();
        s["items"] = serde_json::json!({
            "object": "list", "has_more": false, "total_count": items.len(),
            "data": items.iter().map(|(id, q)| {
                let mut i = stripe_sync_testkit::stripe::object("subscription_item", id);
                i["quantity"] = (*q).into();
                i
            }).collect::<Vec<_>>(),
        });
        stripe_sync_testkit::stripe::event(
            &format!("evt_one_{at}"),
            "customer.subscription.updated",
            at,
            s,
        )
    };
    // Delivered newest first.
    direct
        .apply(&[
            sub(3_000, "canceled", &[]),
            sub(2_000, "active", &[("si_b", 3)]),
            sub(1_000, "trialing", &[("si_a", 1), ("si_b", 2)]),
        ])
        .await;
    let status_at = |at: i64| {
        format!(
            "select status from stripe.as_of(null::stripe.subscriptions, to_timestamp({at}), array['sub_one'])"
        )
    };
    for (at, want) in [(1_500, "trialing"), (2_000, "active"), (9_999, "canceled")] {
        assert_eq!(
            direct.scalar::<String>(&status_at(at)).await,
            want,
            "status as of {at}"
        );
    }
    let none: i64 = direct
        .scalar("select count(*) from stripe.as_of(null::stripe.subscriptions, to_timestamp(999))")
        .await;
    assert_eq!(none, 0, "nothing before the first version");
    let items_at = |at: i64| {
        format!(
            "select coalesce(string_agg(id || ':' || quantity || case when deleted then ' gone' else '' end, ', ' \
               order by id), '') \
             from stripe.as_of(null::stripe.subscription_items, to_timestamp({at}), array['sub_one'])"
        )
    };
    for (at, want) in [
        (1_000, "si_a:1, si_b:2"),
        (2_500, "si_a:1 gone, si_b:3"),
        (3_000, "si_a:1 gone, si_b:3 gone"),
    ] {
        assert_eq!(
            direct.scalar::<String>(&items_at(at)).await,
            want,
            "items as of {at}"
        );
    }
    let timeline: String = direct
        .scalar(
            "select string_agg(status || ' ' || extract(epoch from _valid_from)::bigint || '-' \
               || coalesce(extract(epoch from _valid_to)::bigint::text, 'now'), ', ' order by _valid_from) \
             from stripe.subscriptions_history where id = 'sub_one'",
        )
        .await;
    assert_eq!(
        timeline,
        "trialing 1000-2000, active 2000-3000, canceled 3000-now"
    );
}

/// Every SQL example of docs/history.md runs on a generated history and returns rows.
#[tokio::test]
async fn the_examples_of_the_history_docs_run() {
    let generated = generated();
    let direct = Direct::new().await;
    let mut rng = fastrand::Rng::with_seed(3);
    deliver(&direct, &generated.events, &mut rng).await;
    let doc = std::fs::read_to_string(crate::deploy::repo().join("docs/history.md")).unwrap();
    let examples: Vec<&str> = doc
        .split("```sql\n")
        .skip(1)
        .filter_map(|block| block.split("\n```").next())
        .collect();
    assert!(examples.len() >= 4, "the docs' examples");
    for sql in &examples {
        let rows = sqlx::query(sqlx::AssertSqlSafe((*sql).to_owned()))
            .fetch_all(&direct.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}\n{e}"));
        assert!(!rows.is_empty(), "no rows from:\n{sql}");
    }
    // And they compute something: the MRR example finds recurring revenue in the generated months.
    let mrr = examples
        .iter()
        .find(|sql| sql.contains(" as mrr"))
        .expect("the MRR example");
    let most: f64 = direct
        .scalar(&format!(
            "select max(mrr)::float8 from ({}) m",
            mrr.trim_end().trim_end_matches(';')
        ))
        .await;
    assert!(most > 0.0, "MRR at a month end: {most}");
}

/// Retention deletes versions older than the horizon that a newer one replaced, and keeps each row's last version
/// before it: the tables as of any later moment are unchanged.
#[tokio::test]
async fn pruning_keeps_every_moment_after_the_horizon() {
    let generated = generated();
    let direct = Direct::new().await;
    let mut rng = fastrand::Rng::with_seed(5);
    deliver(&direct, &generated.events, &mut rng).await;
    // What `history.retention = 45d` prunes.
    let retention = std::time::Duration::from_secs(45 * 86_400);
    let horizon = stripe_sync_testkit::stripe::now() - 45 * 86_400;
    let later = horizon + 10 * 86_400;
    let before: Vec<Vec<Value>> = tables_as_of(&direct, later).await;
    let events_before: i64 = direct.scalar("select count(*) from stripe.events").await;
    let pruned = stripe_sync_applier::history::Retention::new(direct.pool.clone(), retention)
        .prune()
        .await
        .unwrap()
        .unwrap();
    let pruned = i64::try_from(pruned).unwrap();
    let again: i64 = direct
        .scalar(&format!("select stripe.prune_history({horizon})"))
        .await;
    assert_eq!(again, 0, "nothing left to prune by hand");
    let events_after: i64 = direct.scalar("select count(*) from stripe.events").await;
    assert_eq!(events_before - events_after, pruned);
    assert!(pruned > 200, "old versions went: {pruned}");
    let after = tables_as_of(&direct, later).await;
    for ((table, then), now) in TABLES.iter().zip(&before).zip(&after) {
        assert!(
            then == now,
            "{table} as of {later}: {}",
            first_difference(now, then)
        );
    }
    let current: Vec<Vec<Value>> = tables_as_of(&direct, generated.end).await;
    for (table, then) in TABLES.iter().zip(&current) {
        let now = rows(&direct, &format!("stripe.{table}")).await;
        assert!(
            &now == then,
            "{table} now: {}",
            first_difference(then, &now)
        );
    }
}

async fn tables_as_of(direct: &Direct, at: i64) -> Vec<Vec<Value>> {
    let mut out = Vec::new();
    for table in TABLES {
        out.push(
            rows(
                direct,
                &format!("stripe.as_of(null::stripe.{table}, to_timestamp({at}))"),
            )
            .await,
        );
    }
    out
}

/// The lists history reads (`stripe.history_lists`, migrations/0006) are the registry's embedded lists, with the
/// same owners: a list added to the registry needs its row (a new migration), or its items have no history.
#[tokio::test]
async fn history_reads_every_embedded_list_of_the_registry() {
    let direct = Direct::new().await;
    let registry = stripe_sync_applier::registry::Registry::shipped();
    let mut want: Vec<(String, String, String, bool)> = registry
        .objects()
        .iter()
        .flat_map(|parent| {
            registry.children_of(&parent.object_type).iter().map(|c| {
                (
                    c.child.table.clone(),
                    parent.table.clone(),
                    c.field.clone(),
                    c.owned,
                )
            })
        })
        .collect();
    want.sort();
    let got: Vec<(String, String, String, bool)> = sqlx::query_as(
        "select child_table, parent_table, field, owned from stripe.history_lists order by 1, 2, 3",
    )
    .fetch_all(&direct.pool)
    .await
    .unwrap();
    assert_eq!(got, want);
    let views: i64 = direct
        .scalar("select count(*) from pg_views where schemaname = 'stripe' and viewname like '%\\_history'")
        .await;
    assert_eq!(
        views,
        registry.objects().len() as i64,
        "one history view per table"
    );
    // Each view has its table's columns, in order, then history's own: a migration that adds a column without
    // `select stripe.create_history_views()` fails here.
    let stale: Vec<String> = sqlx::query_scalar(
        "select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         where n.nspname = 'stripe' and c.relkind = 'r' \
           and exists (select 1 from pg_attribute a where a.attrelid = c.oid and a.attname = '_last_event_rank') \
           and (select array_agg(a.attname::text order by a.attnum) from pg_attribute a \
                where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped) \
               || array['_valid_from', '_valid_to', '_event_id', '_event_type'] \
             is distinct from (select array_agg(a.attname::text order by a.attnum) from pg_attribute a \
                where a.attrelid = to_regclass(format('stripe.%I', c.relname || '_history')) and a.attnum > 0)",
    )
    .fetch_all(&direct.pool)
    .await
    .unwrap();
    assert!(
        stale.is_empty(),
        "views without their table's columns: {stale:?}"
    );
}

/// A `customer.updated` of cus_tie at second 3,000, from `previous` to `email`.
fn tied_update(id: &str, email: &str, previous: &str) -> Value {
    let mut event = crate::helpers::customer_event(id, "customer.updated", 3_000, "cus_tie", email);
    event["data"]["previous_attributes"] = serde_json::json!({ "email": previous });
    event
}

/// A whole table read in slices, whatever their number (one per parallel worker), holds every row once: a table of
/// one row too (its statistics have no histogram to split at). Reading leaves the session's settings as they were.
#[tokio::test]
async fn a_whole_table_read_in_slices_holds_every_row_once() {
    let direct = Direct::new().await;
    let customers: Vec<Value> = (0..40)
        .map(|i| {
            let id = format!("cus_slice{i:02}");
            crate::helpers::customer_event(
                &format!("evt_slice{i:02}"),
                "customer.created",
                1_000 + i,
                &id,
                &format!("{id}@example.com"),
            )
        })
        .collect();
    direct.apply(&customers).await;
    direct
        .apply(&[stripe_sync_testkit::stripe::event(
            "evt_product",
            "product.created",
            1_000,
            stripe_sync_testkit::stripe::object("product", "prod_one"),
        )])
        .await;
    sqlx::query("analyze").execute(&direct.pool).await.unwrap();
    let mut conn = direct.pool.acquire().await.unwrap();
    for workers in [0, 2, 8] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "set max_parallel_workers_per_gather = {workers}"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        for (table, rows) in [("customers", 40), ("products", 1)] {
            let (all, distinct): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "select count(*), count(distinct id) from stripe.as_of(null::stripe.{table}, to_timestamp(5000))"
            )))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
            assert_eq!((all, distinct), (rows, rows), "{table}, {workers} workers");
        }
        // A child table's reading turns hash joins on for itself only.
        sqlx::query("select count(*) from stripe.as_of(null::stripe.subscription_items, to_timestamp(5000))")
            .execute(&mut *conn)
            .await
            .unwrap();
        let settings: (String, String, String) = sqlx::query_as(
            "select current_setting('enable_hashjoin'), current_setting('enable_mergejoin'), current_setting('jit')",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(settings, ("on".into(), "on".into(), "on".into()));
    }
}

/// A tie whose newer place in the stream was recorded first (a replay of events retention had pruned, say): `as_of`
/// still decides it as the table did.
#[tokio::test]
async fn a_tie_recorded_against_stream_order_is_decided_as_the_table_decided_it() {
    let direct = Direct::new().await;
    let early = tied_update("evt_tie_b", "early@example.com", "first@example.com");
    let late = tied_update("evt_tie_a", "late@example.com", "early@example.com");
    direct.apply_at(&[(20, &early)]).await;
    direct.apply_at(&[(10, &late)]).await;
    for from in [
        "stripe.customers",
        "stripe.as_of(null::stripe.customers, to_timestamp(3000))",
    ] {
        assert_eq!(
            direct
                .scalar::<String>(&format!("select email from {from} where id = 'cus_tie'"))
                .await,
            "late@example.com",
            "{from}"
        );
    }
}

/// Events recorded before history existed (a database migrated from an earlier release) get their place in it, and
/// the work is done once.
#[tokio::test]
async fn events_recorded_before_history_join_it() {
    let direct = Direct::new().await;
    direct
        .apply(&[
            crate::helpers::customer_event(
                "evt_old_1",
                "customer.created",
                1_000,
                "cus_old",
                "first@example.com",
            ),
            crate::helpers::customer_event(
                "evt_old_2",
                "customer.updated",
                2_000,
                "cus_old",
                "second@example.com",
            ),
            // Two updates in one second, the later one first in the stream: a tie the table decided for the
            // update whose previous state is the other's.
            tied_update("evt_tie_1", "late@example.com", "early@example.com"),
            tied_update("evt_tie_2", "early@example.com", "first@example.com"),
        ])
        .await;
    assert_eq!(
        direct
            .scalar::<String>("select email from stripe.customers where id = 'cus_tie'")
            .await,
        "late@example.com"
    );
    // As the release before history recorded them.
    sqlx::query("update stripe.events set _table = null, _row_id = null, _rank = null")
        .execute(&direct.pool)
        .await
        .unwrap();
    let email_at = |at: i64| {
        format!(
            "select coalesce((select email from stripe.as_of(null::stripe.customers, to_timestamp({at}))), 'none')"
        )
    };
    assert_eq!(
        direct.scalar::<String>(&email_at(1_500)).await,
        "none",
        "not in history yet"
    );
    let registry = stripe_sync_applier::registry::Registry::shipped();
    let indexed = stripe_sync_applier::history::index_older_events(&direct.pool, registry)
        .await
        .unwrap();
    assert_eq!(indexed, Some(4));
    for (at, want) in [(1_500, "first@example.com"), (2_500, "second@example.com")] {
        assert_eq!(
            direct.scalar::<String>(&email_at(at)).await,
            want,
            "email as of {at}"
        );
    }
    assert_eq!(
        direct
            .scalar::<String>(
                "select email from stripe.as_of(null::stripe.customers, to_timestamp(3000), array['cus_tie'])"
            )
            .await,
        "late@example.com",
        "the tie decided as the table decided it"
    );
    let again = stripe_sync_applier::history::index_older_events(&direct.pool, registry)
        .await
        .unwrap();
    assert_eq!(again, Some(0), "done once");
}
