//! Payloads from a future Stripe: unknown event and object types, new fields, bigger numbers, changed types.

use serde_json::json;
use stripe_sync_testkit::stripe;

use crate::helpers::{Direct, TestEnv, customer_event};

#[tokio::test]
async fn an_unknown_event_type_is_recorded_and_changes_no_table() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    let event = json!({
        "id": "evt_future", "object": "event", "type": "quantum_ledger.entangled", "created": 100,
        "data": { "object": { "id": "ql_1", "object": "quantum_ledger", "spin": 0.5 } }
    });
    env.publish(&event).await;
    env.publish(&customer_event(
        "evt_after",
        "customer.created",
        100,
        "cus_after",
        "a@example.com",
    ))
    .await;
    env.wait_drained().await;
    assert_eq!(
        env.scalar::<String>("select type from stripe.events where id = 'evt_future'")
            .await,
        "quantum_ledger.entangled"
    );
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.customers")
            .await,
        1,
        "the events after it flow"
    );
    assert_eq!(env.dead_letters().await, 0);
    applier.stop().await;
}

#[tokio::test]
async fn new_fields_bigger_numbers_and_changed_types_never_fail_an_insert() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    let mut price = stripe::object("price", "price_future");
    price["unit_amount"] = json!(1);
    price["brand_new_field"] = json!({ "nested": [1, 2, 3] });
    let mut event = stripe::event("evt_big", "price.updated", 100, price);
    // Numbers beyond bigint and floats where integers were, written as raw JSON text.
    let body = serde_json::to_string(&event)
        .unwrap()
        .replace(
            r#""unit_amount":1"#,
            r#""unit_amount":123456789012345678901234567890"#,
        )
        .replace(r#""nested":[1,2,3]"#, r#""nested":[1.5e400]"#);
    // A field that was a string is now an object, and an enum gains a value.
    let body = body
        .replace(
            r#""currency":"usd""#,
            r#""currency":{"code":"usd","minor_units":2}"#,
        )
        .replace(r#""type":"recurring""#, r#""type":"metered_hybrid""#)
        .replace(r#""type":"one_time""#, r#""type":"metered_hybrid""#);
    event["id"] = json!("evt_big");
    env.publish_raw(body.into_bytes(), &event).await;
    env.wait_drained().await;
    let (unit_amount, currency, kind, raw_amount): (Option<i64>, String, String, String) = sqlx::query_as(
        "select unit_amount, currency, type, _raw_data ->> 'unit_amount' from stripe.prices where id = 'price_future'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        unit_amount, None,
        "out of bigint range reads as null in the typed column"
    );
    assert_eq!(
        raw_amount, "123456789012345678901234567890",
        "the raw object keeps the exact value"
    );
    assert!(currency.contains("usd"), "{currency}");
    assert_eq!(kind, "metered_hybrid");
    assert_eq!(env.dead_letters().await, 0);
    applier.stop().await;
}

#[tokio::test]
async fn a_text_column_reads_every_json_shape_as_documented() {
    let db = Direct::new().await;
    // Each shape a text field may take, in a text field of its own customer, and what the typed column holds.
    let shapes = [
        ("description", json!("plain"), Some("plain")),
        (
            "name",
            json!("quote \" and \u{e9}"),
            Some("quote \" and \u{e9}"),
        ),
        ("phone", json!(""), Some("")),
        ("email", json!(null), None),
        ("currency", json!(1.5), Some("1.5")),
        ("tax_exempt", json!(true), Some("true")),
        (
            "default_source",
            json!({ "id": "card_1", "object": "card" }),
            Some("card_1"),
        ),
        ("test_clock", json!({ "id": 7 }), Some("7")),
        (
            "invoice_prefix",
            json!({ "id": null, "a": 1 }),
            Some(r#"{"a": 1, "id": null}"#),
        ),
        ("description", json!(["a", 1]), Some(r#"["a", 1]"#)),
        ("name", json!({}), Some("{}")),
        ("phone", json!([]), Some("[]")),
        ("email", json!({ "id": true }), Some("true")),
        (
            "currency",
            json!({ "id": { "id": "x" } }),
            Some(r#"{"id": "x"}"#),
        ),
        ("tax_exempt", json!(-7), Some("-7")),
    ];
    let events: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(i, (field, value, _))| {
            let mut object = stripe::object("customer", &format!("cus_shape{i}"));
            object[*field] = value.clone();
            stripe::event(&format!("evt_shape{i}"), "customer.updated", 100, object)
        })
        .collect();
    db.apply(&events).await;
    for (i, (field, value, expected)) in shapes.into_iter().enumerate() {
        let id = format!("cus_shape{i}");
        let sql = format!("select {field} from stripe.customers where id = '{id}'");
        let in_table: Option<String> = db.scalar(&sql).await;
        assert_eq!(in_table.as_deref(), expected, "{field} = {value}");
        let sql = format!(
            "select {field} from stripe.as_of(null::stripe.customers, to_timestamp(100)) where id = '{id}'"
        );
        let in_history: Option<String> = db.scalar(&sql).await;
        assert_eq!(
            in_history.as_deref(),
            expected,
            "{field} = {value}, as of then"
        );
    }
}

#[tokio::test]
async fn a_column_added_for_a_new_stripe_field_is_filled_and_underscore_columns_are_left_alone() {
    let env = TestEnv::new().await;
    stripe_sync_applier::migrate::run(&env.pool).await.unwrap();
    // An operator adds a column for a field Stripe started sending, and one of their own.
    sqlx::raw_sql(
        "alter table stripe.prices add column recurring_hint text, add column _team text default 'unassigned'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let applier = env.start_applier().await;
    let mut price = stripe::object("price", "price_hint");
    price["recurring_hint"] = json!("monthly");
    env.publish(&stripe::event(
        "evt_h1",
        "price.created",
        100,
        price.clone(),
    ))
    .await;
    env.wait_drained().await;
    sqlx::query("update stripe.prices set _team = 'growth' where id = 'price_hint'")
        .execute(&env.pool)
        .await
        .unwrap();
    price["recurring_hint"] = json!({ "id": "hint_yearly", "object": "hint" });
    env.publish(&stripe::event("evt_h2", "price.updated", 101, price))
        .await;
    env.wait_drained().await;
    let (hint, team): (String, String) =
        sqlx::query_as("select recurring_hint, _team from stripe.prices where id = 'price_hint'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        hint, "hint_yearly",
        "the new column follows the object (an expanded object reads as its id)"
    );
    assert_eq!(team, "growth", "a column starting with _ is the operator's");
    applier.stop().await;
}

#[tokio::test]
async fn a_typed_column_dropped_while_running_stops_nothing() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    env.publish(&customer_event(
        "evt_d1",
        "customer.created",
        100,
        "cus_d",
        "a@example.com",
    ))
    .await;
    env.wait_drained().await;
    sqlx::raw_sql("alter table stripe.customers drop column email, drop column phone")
        .execute(&env.pool)
        .await
        .unwrap();
    env.publish(&customer_event(
        "evt_d2",
        "customer.updated",
        101,
        "cus_d",
        "b@example.com",
    ))
    .await;
    env.wait_count(
        "select count(*) from stripe.customers where _last_event_id = 'evt_d2' \
         and _raw_data ->> 'email' = 'b@example.com'",
        1,
    )
    .await;
    assert_eq!(
        env.dead_letters().await,
        0,
        "a schema change is not the event's fault"
    );
    applier.stop().await;
}

#[tokio::test]
async fn connect_events_are_kept_per_account_and_platform_events_use_the_configured_id() {
    let env = TestEnv::with_env(&[("STRIPE_ACCOUNT_ID", "acct_platform")]).await;
    let applier = env.start_applier().await;
    // The same user-chosen product id in two accounts.
    let mut connected = stripe::event(
        "evt_c1",
        "product.created",
        100,
        stripe::object("product", "gold"),
    );
    connected["account"] = json!("acct_connected");
    env.publish(&connected).await;
    env.publish(&stripe::event(
        "evt_p1",
        "product.created",
        100,
        stripe::object("product", "gold"),
    ))
    .await;
    let mut deleted = stripe::event(
        "evt_c2",
        "product.deleted",
        200,
        stripe::object("product", "gold"),
    );
    deleted["account"] = json!("acct_connected");
    env.publish(&deleted).await;
    env.wait_drained().await;
    let rows: Vec<(String, bool)> = sqlx::query_as(
        "select _account_id, deleted from stripe.products where id = 'gold' order by 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            ("acct_connected".into(), true),
            ("acct_platform".into(), false)
        ]
    );
    applier.stop().await;
}

#[tokio::test]
async fn a_nul_character_in_a_payload_is_replaced_not_dead_lettered() {
    let env = TestEnv::new().await;
    let applier = env.start_applier().await;
    let event = customer_event(
        "evt_nul",
        "customer.created",
        100,
        "cus_nul",
        "x@example.com",
    );
    let body = serde_json::to_string(&event)
        .unwrap()
        .replace("x@example.com", r"x\u0000y@example.com");
    env.publish_raw(body.into_bytes(), &event).await;
    env.wait_drained().await;
    assert_eq!(
        env.scalar::<String>("select email from stripe.customers where id = 'cus_nul'")
            .await,
        "x\u{fffd}y@example.com"
    );
    assert_eq!(env.dead_letters().await, 0);
    applier.stop().await;
}
