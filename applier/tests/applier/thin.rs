//! Thin events (API v2 event destinations): ingest verifies them with the destination's own secret; the applier
//! records them and reads their objects from the API, so the rows end equal to it.

use serde_json::{Value, json};
use stripe_sync_applier::hydrate::{Mode, Policy};
use stripe_sync_applier::reconcile::same;
use stripe_sync_applier::registry::Registry;
use stripe_sync_testkit::fake_stripe::PLATFORM;
use stripe_sync_testkit::{eventually, stripe};
use time::format_description::well_known::Rfc3339;

use crate::api_side::{fake, test_env, with};
use crate::helpers::{Direct, PATIENCE, customer_event};

const THIN_SECRET: &str = "whsec_thin_destination";

/// A thin event about `kind` `id`, created at unix second `created`.
fn thin_event(id: &str, kind: &str, object_id: &str, created: i64) -> Value {
    let at = time::OffsetDateTime::from_unix_timestamp(created)
        .unwrap()
        .format(&Rfc3339)
        .unwrap();
    json!({
        "id": id,
        "object": "v2.core.event",
        "type": format!("v1.{kind}.updated"),
        "created": at,
        "livemode": false,
        "reason": null,
        "related_object": { "id": object_id, "type": kind, "url": format!("/v1/things/{object_id}") },
    })
}

async fn post(http: &reqwest::Client, url: &str, secret: &str, event: &Value) -> u16 {
    let body = serde_json::to_vec(event).unwrap();
    http.post(url)
        .header(
            "stripe-signature",
            stripe::sign(secret, stripe::now(), &body),
        )
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn thin_events_for_ten_object_types_end_equal_to_the_api() {
    let kinds = [
        "customer",
        "product",
        "price",
        "coupon",
        "invoice",
        "subscription",
        "charge",
        "payment_intent",
        "setup_intent",
        "refund",
    ];
    let fake = fake(&[]).await;
    let now = stripe::now();
    for (i, kind) in kinds.iter().enumerate() {
        fake.put(
            PLATFORM,
            &with(
                kind,
                &format!("{kind}_thin"),
                now - 100,
                json!({ "metadata": { "n": i.to_string() } }),
            ),
        );
    }
    let env = test_env(
        &fake,
        &[
            ("STRIPE_SYNC__APPLIER__HYDRATE_SETTLE", "500ms"),
            ("STRIPE_THIN_WEBHOOK_SECRET", THIN_SECRET),
        ],
    )
    .await;
    let (ingest, _ingest) = env.start_ingest().await;
    let applier = env.start_applier().await;
    let http = reqwest::Client::new();
    let url = format!("{ingest}/webhooks/thin");

    let first = thin_event("evt_thin_0", kinds[0], "customer_thin", now - 5);
    assert_eq!(
        post(&http, &url, stripe::SECRET, &first).await,
        400,
        "the destination's own secret, not the snapshot endpoint's"
    );
    for (i, kind) in kinds.iter().enumerate() {
        let event = thin_event(
            &format!("evt_thin_{i}"),
            kind,
            &format!("{kind}_thin"),
            now - 5,
        );
        assert_eq!(post(&http, &url, THIN_SECRET, &event).await, 200, "{kind}");
    }
    let v2 = json!({
        "id": "evt_thin_v2", "object": "v2.core.event", "type": "v2.core.account[requirements].updated",
        "created": "2026-11-29T10:00:00.000Z", "livemode": false,
        "related_object": { "id": "acct_v2", "type": "v2.core.account", "url": "/v2/core/accounts/acct_v2" },
    });
    assert_eq!(post(&http, &url, THIN_SECRET, &v2).await, 200);

    for kind in kinds {
        let table = &Registry::shipped().get(kind).unwrap().table;
        let want = fake
            .objects(PLATFORM, kind)
            .into_iter()
            .find(|o| o["id"] == format!("{kind}_thin"))
            .unwrap();
        let sql = format!("select _raw_data from stripe.\"{table}\" where id = '{kind}_thin'");
        eventually(PATIENCE, &sql, || async {
            let got: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                .fetch_one(&env.pool)
                .await
                .ok()?;
            same(&got, &want).then_some(())
        })
        .await;
    }
    // Every thin event is recorded, the v2 one without a table too.
    env.wait_count(
        "select count(*) from stripe.events where id like 'evt_thin_%'",
        11,
    )
    .await;
    env.wait_count("select count(*) from stripe.hydrate_queue", 0)
        .await;
    applier.stop().await;
}

#[tokio::test]
async fn a_thin_event_whose_v1_event_is_recorded_asks_for_no_read() {
    let direct = Direct::new().await.hydrating(Policy {
        mode: Mode::Ambiguous,
        api_version: "2026-07-29.dahlia".into(),
        live: false,
        settle: std::time::Duration::from_secs(2),
    });
    let now = stripe::now();
    direct
        .apply(&[customer_event(
            "evt_v1",
            "customer.updated",
            now - 5,
            "cus_t",
            "t@example.com",
        )])
        .await;
    let mut covered = thin_event("evt_thin_a", "customer", "cus_t", now - 5);
    covered["snapshot_event"] = json!("evt_v1");
    let mut uncovered = thin_event("evt_thin_b", "customer", "cus_u", now - 5);
    uncovered["snapshot_event"] = json!("evt_not_seen");
    direct.apply(&[covered, uncovered]).await;
    let queued: Vec<String> = sqlx::query_scalar("select id from stripe.hydrate_queue order by id")
        .fetch_all(&direct.pool)
        .await
        .unwrap();
    assert_eq!(
        queued,
        ["cus_u"],
        "only the object whose change came as a thin event alone is read"
    );
    assert_eq!(
        direct
            .scalar::<i64>("select count(*) from stripe.customers where id = 'cus_u'")
            .await,
        0,
        "a thin event writes no row by itself"
    );
}
