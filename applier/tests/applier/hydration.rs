//! Hydration against the fake Stripe API: what webhooks can't settle ends equal to the API.

use serde_json::{Value, json};
use stripe_sync_applier::hydrate::{Mode, Policy};
use stripe_sync_applier::snapshot::Snapshot;
use stripe_sync_testkit::fake_stripe::{Behaviour, FakeStripe, PLATFORM};
use stripe_sync_testkit::stripe;

use crate::api_side::{fake, invoice_with_lines, test_env, with};
use crate::helpers::{Direct, TestEnv, customer_event};

/// Settle quickly: the tests wait for conditions, not for time.
const FAST: &[(&str, &str)] = &[("STRIPE_SYNC__APPLIER__HYDRATE_SETTLE", "500ms")];

async fn hydrating(fake: &FakeStripe) -> TestEnv {
    test_env(fake, FAST).await
}

/// The object as the fake API renders it.
fn api_object(fake: &FakeStripe, kind: &str, id: &str) -> Value {
    fake.objects(PLATFORM, kind)
        .into_iter()
        .find(|o| o["id"] == id)
        .unwrap()
}

fn reads_of(fake: &FakeStripe, endpoint: &str) -> usize {
    fake.requests()
        .iter()
        .filter(|(e, _)| e == endpoint)
        .count()
}

/// Waits until `sql` (one jsonb) returns `want`.
async fn row_becomes(env: &TestEnv, sql: &str, want: &Value) {
    stripe_sync_testkit::eventually(crate::helpers::PATIENCE, sql, || async {
        let got: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&env.pool)
            .await
            .ok()?;
        (&got == want).then_some(())
    })
    .await;
}

async fn wait_queue_empty(env: &TestEnv) {
    env.wait_count("select count(*) from stripe.hydrate_queue", 0)
        .await;
}

#[tokio::test]
async fn rows_a_bare_same_second_tie_decided_are_read_again_once_and_end_equal_to_the_api() {
    let fake = fake(&[]).await;
    let now = stripe::now();
    fake.put(
        PLATFORM,
        &with(
            "customer",
            "cus_tie",
            now - 5000,
            json!({ "email": "final@example.com" }),
        ),
    );
    let truth = api_object(&fake, "customer", "cus_tie");
    let env = hydrating(&fake).await;
    let applier = env.start_applier().await;
    // Ten updates of one second, no previous_attributes: nothing orders them, the stream order decides.
    for i in 0..10 {
        let mut event = customer_event(
            &format!("evt_tie_{i}"),
            "customer.updated",
            now - 60,
            "cus_tie",
            &format!("v{i}@example.com"),
        );
        event["data"]["object"]["created"] = json!(now - 5000);
        env.publish(&event).await;
    }
    env.wait_drained().await;
    row_becomes(
        &env,
        "select _raw_data from stripe.customers where id = 'cus_tie' and not _ambiguous",
        &truth,
    )
    .await;
    wait_queue_empty(&env).await;
    // One read for the burst; a second only if the burst outlasted the settle delay (publishing ten events takes
    // milliseconds; the delay is 500 ms), never one per event.
    let reads = reads_of(&fake, "GET /v1/customers/{id}");
    assert!(
        (1..=2).contains(&reads),
        "a burst of ties for one object costs one read, not {reads}"
    );
    applier.stop().await;
}

#[tokio::test]
async fn an_event_at_another_api_version_ends_with_the_pinned_versions_row_and_a_404_is_a_tombstone()
 {
    let fake = fake(&[]).await;
    let now = stripe::now();
    fake.put(
        PLATFORM,
        &with(
            "customer",
            "cus_old",
            now - 5000,
            json!({ "email": "pinned@example.com", "new_field_at_pinned": { "a": 1 } }),
        ),
    );
    let truth = api_object(&fake, "customer", "cus_old");
    let env = hydrating(&fake).await;
    let applier = env.start_applier().await;
    for (id, object) in [("evt_old", "cus_old"), ("evt_gone", "cus_gone")] {
        let mut event = customer_event(id, "customer.updated", now - 60, object, "old@example.com");
        event["api_version"] = json!("2020-03-02");
        env.publish(&event).await;
    }
    env.wait_drained().await;
    row_becomes(
        &env,
        "select _raw_data from stripe.customers where id = 'cus_old'",
        &truth,
    )
    .await;
    env.wait_count(
        "select count(*) from stripe.customers where id = 'cus_gone' and deleted",
        1,
    )
    .await;
    wait_queue_empty(&env).await;
    applier.stop().await;
}

#[tokio::test]
async fn a_list_of_250_invoice_lines_cut_short_by_its_event_ends_complete() {
    let fake = fake(&[]).await;
    let now = stripe::now();
    let invoice = invoice_with_lines("in_big", 250, now - 400);
    fake.put(PLATFORM, &invoice);
    let env = hydrating(&fake).await;
    let applier = env.start_applier().await;
    // The webhook embeds the first 10 lines and says there are more.
    let mut object = invoice.clone();
    object["lines"]["data"] = json!(invoice["lines"]["data"].as_array().unwrap()[..10]);
    object["lines"]["has_more"] = json!(true);
    object["lines"]["total_count"] = json!(250);
    env.publish(&stripe::event(
        "evt_big",
        "invoice.finalized",
        now - 60,
        object,
    ))
    .await;
    env.wait_count(
        "select count(*) from stripe.invoice_line_items where _parent_id = 'in_big' and not deleted",
        250,
    )
    .await;
    env.wait_count("select count(*) from stripe.incomplete_lists", 0)
        .await;
    wait_queue_empty(&env).await;
    applier.stop().await;
}

#[tokio::test]
async fn hydration_under_a_429_storm_catches_up_without_loss() {
    let fake = fake(&[]).await;
    let now = stripe::now();
    for i in 0..20 {
        fake.put(
            PLATFORM,
            &with(
                "customer",
                &format!("cus_storm_{i:02}"),
                now - 5000,
                json!({ "email": format!("api{i}@example.com") }),
            ),
        );
    }
    fake.set_behaviour(Behaviour {
        rate_limit_storm: 30,
        ..Behaviour::default()
    });
    // Short pauses between attempts: with Stripe's 20 s the storm's 30 answers alone would take minutes when the
    // reads happen to come one at a time.
    let env = test_env(
        &fake,
        &[FAST[0], ("STRIPE_SYNC__STRIPE__RETRY_MAX_WAIT", "300ms")],
    )
    .await;
    let applier = env.start_applier().await;
    for i in 0..20 {
        let mut event = customer_event(
            &format!("evt_storm_{i}"),
            "customer.updated",
            now - 60,
            &format!("cus_storm_{i:02}"),
            "webhook@example.com",
        );
        event["api_version"] = json!("2020-03-02");
        env.publish(&event).await;
    }
    env.wait_count(
        "select count(*) from stripe.customers where id like 'cus_storm_%' and email like 'api%'",
        20,
    )
    .await;
    wait_queue_empty(&env).await;
    assert!(fake.rate_limited() >= 30, "the storm happened");
    applier.stop().await;
}

/// One batch holding several asks for one object (ties in several rounds, an old-version event too) applies, and
/// queues the object once.
#[tokio::test]
async fn a_batch_asking_several_times_for_one_object_applies_and_queues_it_once() {
    let direct = Direct::new().await.hydrating(Policy {
        mode: Mode::Ambiguous,
        api_version: "2026-07-29.dahlia".into(),
        live: false,
        settle: std::time::Duration::from_secs(2),
    });
    let events: Vec<Value> = (0..4)
        .map(|i| {
            let mut e = customer_event(
                &format!("evt_many_{i}"),
                "customer.updated",
                1_800_000_000,
                "cus_many",
                &format!("m{i}@example.com"),
            );
            e["livemode"] = json!(false);
            e["data"]["object"]["livemode"] = json!(false);
            if i == 3 {
                e["api_version"] = json!("2020-03-02");
            }
            e
        })
        .collect();
    let report = direct.apply(&events).await;
    assert!(report.ambiguous > 0, "{report:?}");
    assert_eq!(
        direct
            .scalar::<i64>("select count(*) from stripe.hydrate_queue where id = 'cus_many'")
            .await,
        1
    );
}

/// Whatever order one object's same-second events and same-second reads arrive in, the row ends equal to the API's
/// final state: either at once (the ordering rule settled it), or after hydration (a bare tie queued a read). Never
/// a stale row that nothing will read again. Random cases (seeded): 2-5 states in one second, with or without
/// `previous_attributes`, 0-2 reads made within the second (each returns the state of its moment), all shuffled.
#[tokio::test]
async fn same_second_events_and_reads_in_any_order_end_equal_to_the_api() {
    let direct = Direct::new().await.hydrating(Policy {
        mode: Mode::Ambiguous,
        api_version: "2026-07-29.dahlia".into(),
        live: false,
        settle: std::time::Duration::from_millis(1),
    });
    let mut rng = fastrand::Rng::with_seed(29);
    let second = 1_800_000_000;
    let (mut settled, mut hydrated) = (0, 0);
    for case in 0..60 {
        let id = format!("cus_prop_{case}");
        let n = rng.usize(2..=5);
        let with_previous = rng.bool();
        let state = |i: usize| {
            let mut o = stripe::object("customer", &id);
            o["email"] = json!(format!("s{i}@example.com"));
            o["livemode"] = json!(false);
            o
        };
        let mut deliveries: Vec<Value> = (0..n)
            .map(|i| {
                let mut e = stripe::event(
                    &format!("evt_{id}_{i}"),
                    "customer.updated",
                    second,
                    state(i),
                );
                e["livemode"] = json!(false);
                if with_previous && i > 0 {
                    e["data"]["previous_attributes"] =
                        json!({ "email": format!("s{}@example.com", i - 1) });
                }
                e
            })
            .collect();
        for _ in 0..rng.usize(0..=2) {
            let object = state(rng.usize(0..n));
            deliveries.push(read_at(&object, second));
        }
        rng.shuffle(&mut deliveries);
        for delivery in &deliveries {
            direct.apply(std::slice::from_ref(delivery)).await;
        }
        let truth = state(n - 1);
        let row_sql = format!("select _raw_data from stripe.customers where id = '{id}'");
        let queued: i64 = direct
            .scalar(&format!(
                "select count(*) from stripe.hydrate_queue where id = '{id}'"
            ))
            .await;
        if queued == 0 {
            let row: Value = direct.scalar(&row_sql).await;
            assert_eq!(
                row, truth,
                "case {case}: nothing queued a read, so the row must be the API's state ({deliveries:#?})"
            );
            settled += 1;
        } else {
            // A stale row may only be left by a bare tie, which hydration reads again a moment later (a snapshot
            // of a later second wins over every event of this one).
            let reason: String = direct
                .scalar(&format!(
                    "select reason from stripe.hydrate_queue where id = '{id}'"
                ))
                .await;
            assert_eq!(reason, "tie", "case {case}");
            hydrated += 1;
        }
    }
    assert!(
        settled > 0 && hydrated > 0,
        "both paths taken: {settled} settled, {hydrated} hydrated"
    );
}

/// The snapshot event of `object` read in `second`.
fn read_at(object: &Value, second: i64) -> Value {
    Snapshot {
        account: None,
        read_at: second,
        object,
    }
    .event("2026-07-29.dahlia", false)
}
