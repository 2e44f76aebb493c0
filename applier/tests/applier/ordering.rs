//! Dedupe and ordering: what a user sees in the tables whatever order, batching and number of times events arrive,
//! including Stripe's same-second bursts delivered out of order. Database-only rules go through the batch writer
//! directly; the first test goes through NATS and the worker.

use serde_json::{Value, json};
use stripe_sync_testkit::stripe;

use crate::helpers::{Direct, TestEnv, customer_event};

#[tokio::test]
async fn the_same_event_delivered_twice_applies_once() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    let first = customer_event(
        "evt_dup",
        "customer.created",
        100,
        "cus_dup",
        "first@example.com",
    );
    env.publish(&first).await;
    env.wait_drained().await;
    let updated_at: String = env
        .scalar("select _updated_at::text from stripe.customers where id = 'cus_dup'")
        .await;

    // Stripe retries days later: JetStream's dedupe window is long gone, the database still knows the event.
    env.publish(&first).await;
    env.wait_drained().await;
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.events where id = 'evt_dup'")
            .await,
        1
    );
    let again: String = env
        .scalar("select _updated_at::text from stripe.customers where id = 'cus_dup'")
        .await;
    assert_eq!(
        again, updated_at,
        "a redelivered event must not touch the row"
    );
    applier.stop().await;
}

async fn email(db: &Direct, id: &str) -> String {
    db.scalar(&format!(
        "select email from stripe.customers where id = '{id}'"
    ))
    .await
}

#[tokio::test]
async fn a_late_older_event_never_overwrites_newer_state() {
    let db = Direct::new().await;
    db.apply(&[customer_event(
        "evt_new",
        "customer.updated",
        200,
        "cus_late",
        "new@example.com",
    )])
    .await;
    let report = db
        .apply(&[customer_event(
            "evt_old",
            "customer.updated",
            100,
            "cus_late",
            "old@example.com",
        )])
        .await;
    assert_eq!(report.rows_stale, 1);
    assert_eq!(email(&db, "cus_late").await, "new@example.com");
    assert_eq!(
        db.scalar::<i64>("select count(*) from stripe.events where object_id = 'cus_late'")
            .await,
        2,
        "the older event is still recorded as received"
    );
}

#[tokio::test]
async fn a_deleted_object_stays_deleted_when_a_late_create_or_a_same_second_update_arrives() {
    let db = Direct::new().await;
    db.apply(&[customer_event(
        "evt_del",
        "customer.deleted",
        500,
        "cus_gone",
        "gone@example.com",
    )])
    .await;
    db.apply(&[
        customer_event(
            "evt_late_create",
            "customer.created",
            400,
            "cus_gone",
            "zombie@example.com",
        ),
        customer_event(
            "evt_same_second",
            "customer.updated",
            500,
            "cus_gone",
            "zombie@example.com",
        ),
    ])
    .await;
    let (deleted, email): (bool, String) =
        sqlx::query_as("select deleted, email from stripe.customers where id = 'cus_gone'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(deleted);
    assert_eq!(
        email, "gone@example.com",
        "the row keeps the object as it was when deleted"
    );
}

/// One invoice's life within one second, as Stripe sends it: created (draft), finalized (open), paid,
/// payment_succeeded, and an update whose `previous_attributes` name the paid state.
fn invoice_burst() -> Vec<Value> {
    let state = |status: &str, finalized: Option<i64>, paid: Option<i64>, memo: &str| {
        let mut invoice = stripe::object("invoice", "in_burst");
        invoice["status"] = json!(status);
        invoice["paid"] = json!(paid.is_some());
        invoice["description"] = json!(memo);
        invoice["status_transitions"] = json!({
            "finalized_at": finalized, "paid_at": paid, "voided_at": null, "marked_uncollectible_at": null
        });
        invoice
    };
    let mut updated = stripe::event(
        "evt_5_updated",
        "invoice.updated",
        1_000,
        state("paid", Some(1_000), Some(1_000), "thanks"),
    );
    updated["data"]["previous_attributes"] = json!({ "description": "paid" });
    vec![
        stripe::event(
            "evt_1_created",
            "invoice.created",
            1_000,
            state("draft", None, None, "draft"),
        ),
        stripe::event(
            "evt_2_finalized",
            "invoice.finalized",
            1_000,
            state("open", Some(1_000), None, "open"),
        ),
        stripe::event(
            "evt_3_paid",
            "invoice.paid",
            1_000,
            state("paid", Some(1_000), Some(1_000), "paid"),
        ),
        stripe::event(
            "evt_4_succeeded",
            "invoice.payment_succeeded",
            1_000,
            state("paid", Some(1_000), Some(1_000), "paid"),
        ),
        updated,
    ]
}

#[tokio::test]
async fn a_created_event_delivered_after_a_same_second_payment_never_makes_the_invoice_a_draft_again()
 {
    let db = Direct::new().await;
    let burst = invoice_burst();
    db.apply(std::slice::from_ref(&burst[3])).await;
    db.apply(std::slice::from_ref(&burst[0])).await;
    let (status, description): (String, String) =
        sqlx::query_as("select status, description from stripe.invoices where id = 'in_burst'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), description.as_str()), ("paid", "paid"));
}

#[tokio::test]
async fn same_second_updates_are_ordered_by_their_previous_attributes_not_by_arrival() {
    let db = Direct::new().await;
    let burst = invoice_burst();
    // The update that follows `paid` arrives first, then the paid state it came from.
    db.apply(std::slice::from_ref(&burst[4])).await;
    db.apply(std::slice::from_ref(&burst[2])).await;
    let (description, ambiguous): (String, bool) =
        sqlx::query_as("select description, _ambiguous from stripe.invoices where id = 'in_burst'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(description, "thanks");
    assert!(!ambiguous, "the payloads settled it");
}

/// Every order and batching of the burst ends in the same row, the last state, with nothing left ambiguous: the
/// rank (created < finalized < paid) and `previous_attributes` order them; `paid` and `payment_succeeded` carry
/// the same object, so their order does not matter.
#[tokio::test]
async fn any_interleaving_of_one_invoices_same_second_events_ends_in_its_last_state() {
    let burst = invoice_burst();
    let mut rng = fastrand::Rng::with_seed(7);
    for case in 0..12 {
        let db = Direct::new().await;
        let mut order: Vec<usize> = (0..burst.len()).collect();
        rng.shuffle(&mut order);
        // Stream positions follow arrival; batches split the arrival order at random points.
        let mut at = 0;
        while at < order.len() {
            let n = rng.usize(1..=order.len() - at);
            let batch: Vec<(u64, &Value)> = order[at..at + n]
                .iter()
                .enumerate()
                .map(|(i, &e)| ((at + i + 1) as u64, &burst[e]))
                .collect();
            db.apply_at(&batch).await;
            at += n;
        }
        let row: (String, String, bool) = sqlx::query_as(
            "select _last_event_id, description, _ambiguous from stripe.invoices where id = 'in_burst'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            row,
            ("evt_5_updated".to_owned(), "thanks".to_owned(), false),
            "case {case}, arrival order {order:?}"
        );
    }
}

#[tokio::test]
async fn a_bare_same_second_tie_is_decided_by_stream_order_and_flagged_whatever_the_arrival_order()
{
    for (first, second) in [("a", "b"), ("b", "a")] {
        let db = Direct::new().await;
        let event = |id: &str| {
            customer_event(
                &format!("evt_tie_{id}"),
                "customer.updated",
                300,
                "cus_tie",
                &format!("{id}@example.com"),
            )
        };
        let (a, b) = (event("a"), event("b"));
        let by_name = |name: &str| if name == "a" { &a } else { &b };
        // `a` is earlier in the stream than `b`, whichever the applier sees first.
        let seq = |name: &str| if name == "a" { 10 } else { 20 };
        db.apply_at(&[(seq(first), by_name(first))]).await;
        db.apply_at(&[(seq(second), by_name(second))]).await;
        let (email, ambiguous): (String, bool) =
            sqlx::query_as("select email, _ambiguous from stripe.customers where id = 'cus_tie'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(email, "b@example.com", "arrival {first} then {second}");
        assert!(
            ambiguous,
            "arrival {first} then {second}: the row is flagged for the API side"
        );
    }
}

#[tokio::test]
async fn same_second_events_carrying_the_same_object_are_not_ambiguous() {
    let db = Direct::new().await;
    let burst = invoice_burst();
    db.apply(std::slice::from_ref(&burst[3])).await;
    db.apply(std::slice::from_ref(&burst[2])).await;
    assert!(
        !db.scalar::<bool>("select _ambiguous from stripe.invoices where id = 'in_burst'")
            .await
    );
}

#[tokio::test]
async fn a_later_event_clears_the_ambiguity() {
    let db = Direct::new().await;
    db.apply(&[
        customer_event(
            "evt_x1",
            "customer.updated",
            300,
            "cus_amb",
            "x1@example.com",
        ),
        customer_event(
            "evt_x2",
            "customer.updated",
            300,
            "cus_amb",
            "x2@example.com",
        ),
    ])
    .await;
    assert!(
        db.scalar::<bool>("select _ambiguous from stripe.customers where id = 'cus_amb'")
            .await
    );
    db.apply(&[customer_event(
        "evt_x3",
        "customer.updated",
        301,
        "cus_amb",
        "x3@example.com",
    )])
    .await;
    assert!(
        !db.scalar::<bool>("select _ambiguous from stripe.customers where id = 'cus_amb'")
            .await
    );
}

/// A subscription set to cancel at period end and reactivated within one second: `canceled_at` is set, then cleared.
/// It can move back, so it orders nothing. Both payloads fit either order (each one's `previous_attributes` is the
/// other's state), so the row is the reactivation or it is flagged for a re-read, in either arrival order; ranking
/// by `canceled_at` made the cancellation win, unflagged.
#[tokio::test]
async fn a_same_second_reactivation_is_not_undone_by_the_cancellation_it_reverts() {
    let subscription = |cancel: bool| {
        let mut s = stripe_sync_testkit::stripe::object("subscription", "sub_undo");
        s["cancel_at_period_end"] = json!(cancel);
        s["canceled_at"] = if cancel {
            json!(1_700_000_000)
        } else {
            Value::Null
        };
        s["status"] = json!("active");
        s
    };
    let with_previous = |mut event: Value, previous: Value| {
        event["data"]["previous_attributes"] = previous;
        event
    };
    let cancel = with_previous(
        stripe_sync_testkit::stripe::event(
            "evt_cancel",
            "customer.subscription.updated",
            1_700_000_000,
            subscription(true),
        ),
        json!({ "cancel_at_period_end": false, "canceled_at": null }),
    );
    let undo = with_previous(
        stripe_sync_testkit::stripe::event(
            "evt_undo",
            "customer.subscription.updated",
            1_700_000_000,
            subscription(false),
        ),
        json!({ "cancel_at_period_end": true, "canceled_at": 1_700_000_000 }),
    );
    for (first, second) in [(&cancel, &undo), (&undo, &cancel)] {
        let db = Direct::new().await;
        db.apply(std::slice::from_ref(first)).await;
        db.apply(std::slice::from_ref(second)).await;
        let row: (String, bool, bool) = sqlx::query_as(
            "select _last_event_id, cancel_at_period_end, _ambiguous from stripe.subscriptions where id = 'sub_undo'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert!(
            row.2 || (row.0 == "evt_undo" && !row.1),
            "{} first: {row:?}",
            first["id"]
        );
    }
}
