//! Live and test data apart, and the delete policies that depend on what Stripe's objects really do.

use serde_json::{Value, json};
use stripe_sync_testkit::stripe;

use crate::helpers::Direct;

/// An event of connected account `acct_modes`, in live or test mode.
fn connect_event(id: &str, event_type: &str, livemode: bool, object: Value) -> Value {
    let mut event = stripe::event(id, event_type, 100, object);
    event["account"] = json!("acct_modes");
    event["livemode"] = json!(livemode);
    event["data"]["object"]["livemode"] = json!(livemode);
    event
}

#[tokio::test]
async fn a_connected_accounts_test_events_never_overwrite_its_live_rows() {
    let db = Direct::new().await;
    let mut live_capability = stripe::object("capability", "card_payments");
    live_capability["status"] = json!("active");
    let mut test_capability = live_capability.clone();
    test_capability["status"] = json!("inactive");
    let mut live_product = stripe::object("product", "gold");
    live_product["name"] = json!("Gold (live)");
    let mut test_product = live_product.clone();
    test_product["name"] = json!("Gold (test)");
    // The test events come later in the stream: under one key they would win.
    db.apply(&[
        connect_event("evt_m1", "capability.updated", true, live_capability),
        connect_event("evt_m2", "product.updated", true, live_product),
        connect_event(
            "evt_m3",
            "tax.settings.updated",
            true,
            stripe::fixture("tax.settings"),
        ),
    ])
    .await;
    db.apply(&[
        connect_event("evt_m4", "capability.updated", false, test_capability),
        connect_event("evt_m5", "product.updated", false, test_product),
        connect_event(
            "evt_m6",
            "tax.settings.updated",
            false,
            stripe::fixture("tax.settings"),
        ),
    ])
    .await;
    let capabilities: Vec<(bool, String)> = sqlx::query_as(
        "select livemode, status from stripe.capabilities where _account_id = 'acct_modes' order by livemode",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        capabilities,
        vec![(false, "inactive".into()), (true, "active".into())]
    );
    let products: Vec<(bool, String)> = sqlx::query_as(
        "select livemode, name from stripe.products where id = 'gold' order by livemode",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        products,
        vec![(false, "Gold (test)".into()), (true, "Gold (live)".into())]
    );
    assert_eq!(
        db.scalar::<i64>("select count(*) from stripe.tax_settings where id = 'acct_modes'")
            .await,
        2
    );
}

#[tokio::test]
async fn a_source_detached_from_a_customer_lives_on_but_a_detached_card_is_deleted() {
    let db = Direct::new().await;
    db.apply(&[
        stripe::event(
            "evt_src",
            "customer.source.deleted",
            100,
            stripe::object("source", "src_1"),
        ),
        stripe::event(
            "evt_card",
            "customer.source.deleted",
            100,
            stripe::object("card", "card_1"),
        ),
    ])
    .await;
    assert!(
        !db.scalar::<bool>("select deleted from stripe.sources where id = 'src_1'")
            .await
    );
    assert!(
        db.scalar::<bool>("select deleted from stripe.cards where id = 'card_1'")
            .await
    );
}
