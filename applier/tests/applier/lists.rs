//! Embedded lists: a subscription's items follow the subscription.

use serde_json::{Value, json};
use stripe_sync_testkit::stripe;

use crate::helpers::TestEnv;

fn item(id: &str, quantity: i64) -> Value {
    let mut item = stripe::object("subscription_item", id);
    item["quantity"] = json!(quantity);
    item
}

fn subscription(items: Vec<Value>, has_more: bool) -> Value {
    let mut sub = stripe::object("subscription", "sub_items");
    sub["items"] = json!({ "object": "list", "data": items, "has_more": has_more, "total_count": 5, "url": "/v1/subscription_items?subscription=sub_items" });
    sub
}

async fn items(env: &TestEnv) -> Vec<(String, i64, bool)> {
    sqlx::query_as("select id, quantity, deleted from stripe.subscription_items where _parent_id = 'sub_items' order by id")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn subscription_items_are_replaced_with_their_subscription() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    let created = subscription(vec![item("si_a", 1), item("si_b", 2)], false);
    env.publish(&stripe::event(
        "evt_sub_1",
        "customer.subscription.created",
        100,
        created,
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(
        items(&env).await,
        vec![("si_a".into(), 1, false), ("si_b".into(), 2, false)]
    );

    // si_a is removed from the subscription, si_b changes, si_c is added.
    let updated = subscription(vec![item("si_b", 5), item("si_c", 1)], false);
    env.publish(&stripe::event(
        "evt_sub_2",
        "customer.subscription.updated",
        200,
        updated,
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(
        items(&env).await,
        vec![
            ("si_a".into(), 1, true),
            ("si_b".into(), 5, false),
            ("si_c".into(), 1, false)
        ]
    );

    // A late, older update doesn't change the subscription; it is still the newest state that named si_a, so si_a
    // shows what that state said of it, and stays removed (the subscription's current list lacks it).
    let stale = subscription(vec![item("si_a", 9)], false);
    env.publish(&stripe::event(
        "evt_sub_0",
        "customer.subscription.updated",
        150,
        stale,
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(
        items(&env).await,
        vec![
            ("si_a".into(), 9, true),
            ("si_b".into(), 5, false),
            ("si_c".into(), 1, false)
        ]
    );
    assert_eq!(
        env.scalar::<String>(
            "select _last_event_id from stripe.subscriptions where id = 'sub_items'"
        )
        .await,
        "evt_sub_2"
    );
    applier.stop().await;
}

#[tokio::test]
async fn a_truncated_list_is_recorded_and_removes_nothing() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    env.publish(&stripe::event(
        "evt_t1",
        "customer.subscription.created",
        100,
        subscription(vec![item("si_a", 1), item("si_b", 1)], false),
    ))
    .await;
    env.wait_drained().await;
    // Stripe embedded only part of the list: si_a is not known to be gone.
    env.publish(&stripe::event(
        "evt_t2",
        "customer.subscription.updated",
        200,
        subscription(vec![item("si_b", 3)], true),
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(
        items(&env).await,
        vec![("si_a".into(), 1, false), ("si_b".into(), 3, false)]
    );
    let (total, url): (i64, String) = sqlx::query_as(
        "select total_count, url from stripe.incomplete_lists where parent_table = 'subscriptions' and parent_id = 'sub_items' and field = 'items'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (total, url.as_str()),
        (5, "/v1/subscription_items?subscription=sub_items")
    );

    // Complete again: the record goes away.
    env.publish(&stripe::event(
        "evt_t3",
        "customer.subscription.updated",
        300,
        subscription(vec![item("si_b", 3)], false),
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.incomplete_lists")
            .await,
        0
    );
    assert_eq!(
        items(&env).await,
        vec![("si_a".into(), 1, true), ("si_b".into(), 3, false)]
    );
    applier.stop().await;
}

/// Child tables end the same whatever order and batching the parent's events are applied in (redeliveries,
/// failovers, replays): every event keeps its place in the stream; only application order changes.
#[tokio::test]
async fn child_tables_end_the_same_whatever_order_events_are_applied_in() {
    use crate::helpers::Direct;
    let mut rng = fastrand::Rng::with_seed(11);
    // 12 states of one subscription over 4 seconds (many in the same second), each naming 0-3 of 5 items with
    // changing quantities; some lists cut short.
    let events: Vec<Value> = (0..12)
        .map(|i| {
            let named: Vec<usize> = (0..5).filter(|_| rng.bool()).take(3).collect();
            let items = named
                .into_iter()
                .map(|j| item(&format!("si_p{j}"), rng.i64(1..5)))
                .collect();
            let kind = if i == 0 {
                "customer.subscription.created"
            } else {
                "customer.subscription.updated"
            };
            stripe::event(
                &format!("evt_p{i}"),
                kind,
                100 + rng.i64(0..4),
                subscription(items, rng.u8(..10) == 0),
            )
        })
        .collect();
    let mut outcomes = Vec::new();
    for _ in 0..8 {
        let db = Direct::new().await;
        let mut order: Vec<usize> = (0..events.len()).collect();
        rng.shuffle(&mut order);
        let mut at = 0;
        while at < order.len() {
            let n = rng.usize(1..=(order.len() - at).min(4));
            let batch: Vec<(u64, &Value)> = order[at..at + n]
                .iter()
                .map(|&e| (e as u64 + 1, &events[e]))
                .collect();
            db.apply_at(&batch).await;
            at += n;
        }
        let rows: Vec<(String, i64, bool, String)> = sqlx::query_as(
            "select id, quantity, deleted, _last_event_id from stripe.subscription_items order by id",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let marker: i64 = db
            .scalar("select count(*) from stripe.incomplete_lists")
            .await;
        outcomes.push((order, rows, marker));
    }
    for (order, rows, marker) in &outcomes[1..] {
        assert_eq!(
            (rows, marker),
            (&outcomes[0].1, &outcomes[0].2),
            "order {order:?} against {:?}",
            outcomes[0].0
        );
    }
}

#[tokio::test]
async fn line_ids_repeated_across_invoices_on_old_api_versions_keep_every_line() {
    use crate::helpers::Direct;
    let db = Direct::new().await;
    // Before API version 2019-12-03 a subscription line's id was the subscription's: it repeats on every invoice.
    let invoice = |id: &str, amount: i64| {
        let mut line = stripe::object("line_item", "sub_old_api");
        line["amount"] = json!(amount);
        let mut invoice = stripe::object("invoice", id);
        invoice["lines"] = json!({ "object": "list", "data": [line], "has_more": false, "url": format!("/v1/invoices/{id}/lines") });
        stripe::event(&format!("evt_{id}"), "invoice.finalized", 100, invoice)
    };
    db.apply(&[invoice("in_jan", 1000), invoice("in_feb", 2000)])
        .await;
    let lines: Vec<(String, String, i64)> = sqlx::query_as(
        "select _parent_id, id, amount from stripe.invoice_line_items order by _parent_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        lines,
        vec![
            ("in_feb".into(), "sub_old_api".into(), 2000),
            ("in_jan".into(), "sub_old_api".into(), 1000)
        ]
    );
}

#[tokio::test]
async fn a_parent_whose_payload_lacks_the_list_keeps_its_incomplete_marker_and_its_items() {
    use crate::helpers::Direct;
    let db = Direct::new().await;
    db.apply(&[stripe::event(
        "evt_l1",
        "customer.subscription.updated",
        100,
        subscription(vec![item("si_a", 1), item("si_b", 1)], true),
    )])
    .await;
    // A later payload without `items` at all (absent is not empty).
    let mut bare = stripe::object("subscription", "sub_items");
    bare.as_object_mut().unwrap().remove("items");
    db.apply(&[stripe::event(
        "evt_l2",
        "customer.subscription.updated",
        200,
        bare,
    )])
    .await;
    assert_eq!(
        db.scalar::<i64>(
            "select count(*) from stripe.incomplete_lists where parent_id = 'sub_items'"
        )
        .await,
        1,
        "the list is still known to be cut short"
    );
    assert_eq!(
        db.scalar::<i64>(
            "select count(*) from stripe.subscription_items where _parent_id = 'sub_items' and not deleted"
        )
        .await,
        2
    );
}

/// Item `si_a` of `sub_items` as the table has it, as `as_of` has it at each moment, and as the history view's
/// version valid at each moment has it: `deleted` each time.
async fn si_a_deleted(
    db: &crate::helpers::Direct,
    moments: &[i64],
) -> (bool, Vec<bool>, Vec<bool>) {
    let table = db
        .scalar("select deleted from stripe.subscription_items where id = 'si_a'")
        .await;
    let mut as_of = Vec::new();
    let mut history = Vec::new();
    for at in moments {
        as_of.push(
            db.scalar(&format!(
                "select deleted from stripe.as_of(null::stripe.subscription_items, to_timestamp({at}), \
                 array['sub_items']) where id = 'si_a'"
            ))
            .await,
        );
        history.push(
            db.scalar(&format!(
                "select bool_and(deleted) from stripe.subscription_items_history where id = 'si_a' \
                 and _valid_from <= to_timestamp({at}) and (_valid_to is null or _valid_to > to_timestamp({at}))"
            ))
            .await,
        );
    }
    (table, as_of, history)
}

/// A complete list removes si_a; later states whose list is cut short, or absent, never bring it back: in the
/// table whatever order the states arrive in, in `as_of` at every moment and in the history view.
#[tokio::test]
async fn a_removed_item_stays_removed_when_later_lists_are_cut_short_or_absent() {
    use crate::helpers::Direct;
    let mut bare = stripe::object("subscription", "sub_items");
    bare.as_object_mut().unwrap().remove("items");
    let events = [
        stripe::event(
            "evt_r1",
            "customer.subscription.created",
            100,
            subscription(vec![item("si_a", 1), item("si_b", 1)], false),
        ),
        stripe::event(
            "evt_r2",
            "customer.subscription.updated",
            200,
            subscription(vec![item("si_b", 2)], false),
        ),
        stripe::event(
            "evt_r3",
            "customer.subscription.updated",
            300,
            subscription(vec![item("si_b", 3)], true),
        ),
        stripe::event("evt_r4", "customer.subscription.updated", 400, bare),
    ];
    let moments = [150, 250, 350, 450];
    let removed_from_200 = vec![false, true, true, true];
    // In stream order, in reverse, and the removal last: one event per batch, and all in one.
    for order in [[0, 1, 2, 3], [3, 2, 1, 0], [0, 2, 3, 1], [2, 0, 3, 1]] {
        let db = Direct::new().await;
        for &i in &order {
            db.apply_at(&[(i as u64 + 1, &events[i])]).await;
        }
        assert_eq!(
            si_a_deleted(&db, &moments).await,
            (true, removed_from_200.clone(), removed_from_200.clone()),
            "order {order:?}: (table, as_of, history) at {moments:?}"
        );
    }
    let db = Direct::new().await;
    db.apply(&events).await;
    assert_eq!(
        si_a_deleted(&db, &moments).await,
        (true, removed_from_200.clone(), removed_from_200),
        "one batch"
    );
    // A newer state naming it brings it back.
    db.apply(&[stripe::event(
        "evt_r5",
        "customer.subscription.updated",
        500,
        subscription(vec![item("si_a", 7)], true),
    )])
    .await;
    assert_eq!(
        si_a_deleted(&db, &[550]).await,
        (false, vec![false], vec![false])
    );
}

/// A refund in a charge's list is ranked by its own fields: within one second, the refund's own
/// `charge.refund.updated` is newer than the charge's copy of it, whichever arrives first (a charge `paid` and
/// `captured` used to lend its rank to the copy).
#[tokio::test]
async fn a_refunds_own_event_beats_its_charges_older_copy_of_the_same_second() {
    use crate::helpers::Direct;
    let refund = |status: &str| {
        let mut r = stripe::object("refund", "re_own");
        r["status"] = json!(status);
        r["charge"] = json!("ch_own");
        r
    };
    let mut charge = stripe::object("charge", "ch_own");
    charge["paid"] = json!(true);
    charge["captured"] = json!(true);
    charge["refunds"] = json!({ "object": "list", "data": [refund("pending")], "has_more": false, "url": "/v1/charges/ch_own/refunds" });
    let events = [
        stripe::event("evt_ch", "charge.updated", 100, charge),
        stripe::event("evt_re", "charge.refund.updated", 100, refund("succeeded")),
    ];
    for order in [[0, 1], [1, 0]] {
        let db = Direct::new().await;
        for &i in &order {
            db.apply_at(&[(i as u64 + 1, &events[i])]).await;
        }
        assert_eq!(
            db.scalar::<String>(
                "select status || ' ' || _last_event_id from stripe.refunds where id = 're_own'"
            )
            .await,
            "succeeded evt_re",
            "order {order:?}"
        );
    }
}
