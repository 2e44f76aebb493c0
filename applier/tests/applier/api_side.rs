//! The API side against a fake Stripe API (testkit's): backfill, sync, recover, and how snapshots order against
//! webhook events.

use std::time::Duration;

use serde_json::{Value, json};
use stripe_sync_applier::backfill::{Options, TypeOutcome};
use stripe_sync_applier::registry::Registry;
use stripe_sync_testkit::fake_stripe::{Behaviour, FakeStripe, PLATFORM};
use stripe_sync_testkit::{eventually, stripe};

use crate::helpers::{Direct, PATIENCE, TestEnv, customer_event};

const KEY: &str = "sk_test_fake";

/// A fake serving every list the registry knows (a connected account's lists under its id).
pub(crate) async fn fake(connected: &[&str]) -> FakeStripe {
    let mut paths = Vec::new();
    for spec in Registry::shipped().objects() {
        let Some(list) = &spec.list else { continue };
        if list.path.contains("{account}") {
            for account in connected {
                paths.push((
                    list.path.replace("{account}", account),
                    spec.object_type.clone(),
                ));
            }
        } else {
            paths.push((list.path.clone(), spec.object_type.clone()));
        }
    }
    FakeStripe::start(KEY, paths).await
}

fn env_for(fake: &FakeStripe, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![
        ("STRIPE_API_KEY".to_owned(), KEY.to_owned()),
        ("STRIPE_API_BASE".to_owned(), fake.base().to_owned()),
    ];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    env
}

pub(crate) async fn test_env(fake: &FakeStripe, extra: &[(&str, &str)]) -> TestEnv {
    let env = env_for(fake, extra);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestEnv::with_env(&pairs).await
}

pub(crate) fn with(kind: &str, id: &str, created: i64, fields: Value) -> Value {
    let mut object = stripe::object(kind, id);
    object["created"] = json!(created);
    object["livemode"] = json!(false);
    if let (Some(object), Some(fields)) = (object.as_object_mut(), fields.as_object()) {
        for (k, v) in fields {
            object.insert(k.clone(), v.clone());
        }
    }
    object
}

/// An invoice created at `created` with `n` lines of its own (`il_<invoice>_<i>`), as the fake API stores it: Stripe
/// embeds the first 10 and says `has_more`, the rest is paged from its `url`.
pub(crate) fn invoice_with_lines(id: &str, n: usize, created: i64) -> Value {
    let lines: Vec<Value> = (0..n)
        .map(|i| {
            with(
                "line_item",
                &format!("il_{id}_{i:03}"),
                created,
                json!({ "amount": i }),
            )
        })
        .collect();
    let url = format!("/v1/invoices/{id}/lines");
    with(
        "invoice",
        id,
        created,
        json!({ "lines": { "object": "list", "data": lines, "url": url } }),
    )
}

/// `(id, _raw_data)` of a table, by id.
async fn rows(env: &TestEnv, table: &str) -> Vec<(String, Value)> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select id, _raw_data from stripe.\"{table}\" order by id"
    )))
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

fn ids(objects: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = objects
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_backfill_loads_the_account_table_by_table_and_skips_what_it_cannot_list() {
    let fake = fake(&[]).await;
    let now = stripe::now();
    for i in 0..250 {
        fake.put(
            PLATFORM,
            &with(
                "customer",
                &format!("cus_{i:03}"),
                now - 10_000 + i,
                json!({ "email": format!("c{i}@example.com") }),
            ),
        );
    }
    for (i, status) in ["active", "canceled", "past_due"].iter().enumerate() {
        fake.put(
            PLATFORM,
            &with(
                "subscription",
                &format!("sub_{i}"),
                now - 500,
                json!({ "status": status }),
            ),
        );
    }
    // An invoice with 25 lines: Stripe embeds 10 and says `has_more`.
    fake.put(PLATFORM, &invoice_with_lines("in_many", 25, now - 400));
    fake.put(
        PLATFORM,
        &with("product", "prod_1", now - 300, json!({ "name": "Gold" })),
    );
    fake.disable("/v1/issuing/cards");
    fake.forbid("/v1/disputes");
    let env = test_env(&fake, &[]).await;
    let applier = env.start_applier().await;

    let summary = stripe_sync_applier::commands::backfill(&env.settings(), &Options::default())
        .await
        .unwrap();
    assert!(summary.ok(), "{summary}");
    assert!(
        matches!(&summary.types[&(String::new(), "issuing.card".to_owned())], TypeOutcome::Skipped(why) if why.contains("not set up")),
        "{summary}"
    );
    assert!(
        matches!(&summary.types[&(String::new(), "dispute".to_owned())], TypeOutcome::Skipped(why) if why.starts_with("403")),
        "a restricted key without one permission skips that type only: {summary}"
    );
    assert_eq!(
        summary.types[&(String::new(), "customer".to_owned())],
        TypeOutcome::Loaded(250)
    );
    env.wait_drained().await;

    for (kind, table) in [
        ("customer", "customers"),
        ("subscription", "subscriptions"),
        ("invoice", "invoices"),
        ("product", "products"),
    ] {
        let expected = fake.objects(PLATFORM, kind);
        let got = rows(&env, table).await;
        assert_eq!(
            got.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
            ids(&expected),
            "{table}"
        );
        for (id, raw) in &got {
            let object = expected.iter().find(|o| o["id"] == id.as_str()).unwrap();
            if kind != "invoice" {
                assert_eq!(raw, object, "{table} {id}");
            }
        }
    }
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.subscriptions where status = 'canceled'")
            .await,
        1,
        "canceled subscriptions are loaded too (status=all)"
    );
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.invoice_line_items where _parent_id = 'in_many' and not deleted").await,
        25,
        "the invoice's lines are fetched to the end"
    );
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.incomplete_lists")
            .await,
        0
    );
    applier.stop().await;
}

#[tokio::test]
async fn a_snapshot_and_webhook_events_end_with_the_newest_state_whatever_arrives_first() {
    let fake = fake(&[]).await;
    let now = stripe::now();
    fake.put(
        PLATFORM,
        &with(
            "customer",
            "cus_new_event",
            now - 1000,
            json!({ "email": "api@example.com" }),
        ),
    );
    fake.put(
        PLATFORM,
        &with(
            "customer",
            "cus_old_event",
            now - 1000,
            json!({ "email": "api@example.com" }),
        ),
    );
    let env = test_env(&fake, &[]).await;
    let applier = env.start_applier().await;
    // A webhook of a change made after the read (a later second) arrives before the backfill...
    env.publish(&customer_event(
        "evt_later",
        "customer.updated",
        now + 60,
        "cus_new_event",
        "webhook@example.com",
    ))
    .await;
    env.wait_drained().await;
    let options = Options {
        objects: vec!["customers".into()],
        ..Options::default()
    };
    let summary = stripe_sync_applier::commands::backfill(&env.settings(), &options)
        .await
        .unwrap();
    assert!(summary.ok());
    env.wait_drained().await;
    // ...and a late webhook of a change made before the read arrives after it.
    env.publish(&customer_event(
        "evt_earlier",
        "customer.updated",
        now - 500,
        "cus_old_event",
        "old-webhook@example.com",
    ))
    .await;
    env.wait_drained().await;
    let email = |id: &str| format!("select email from stripe.customers where id = '{id}'");
    assert_eq!(
        env.scalar::<String>(&email("cus_new_event")).await,
        "webhook@example.com"
    );
    assert_eq!(
        env.scalar::<String>(&email("cus_old_event")).await,
        "api@example.com"
    );
    applier.stop().await;
}

/// The tie rule, decided by the writer alone: a snapshot read at second T beats the object's creation in T and
/// anything older, and yields to any other event of T and to anything newer.
#[tokio::test]
async fn within_its_second_a_snapshot_beats_the_creation_and_yields_to_a_change() {
    let db = Direct::new().await;
    let snapshot = |id: &str, email: &str| {
        let object = with("customer", id, 1, json!({ "email": email }));
        stripe_sync_applier::snapshot::Snapshot {
            account: None,
            read_at: 500,
            object: &object,
        }
        .event("2026-07-29.dahlia", false)
    };
    let db = &db;
    let email = |id: &'static str| async move {
        db.scalar::<String>(&format!(
            "select email from stripe.customers where id = '{id}'"
        ))
        .await
    };
    db.apply(&[customer_event(
        "evt_c",
        "customer.created",
        500,
        "cus_a",
        "created@example.com",
    )])
    .await;
    db.apply(&[snapshot("cus_a", "snapshot@example.com")]).await;
    assert_eq!(email("cus_a").await, "snapshot@example.com");
    db.apply(&[snapshot("cus_b", "snapshot@example.com")]).await;
    db.apply(&[customer_event(
        "evt_u",
        "customer.updated",
        500,
        "cus_b",
        "updated@example.com",
    )])
    .await;
    assert_eq!(email("cus_b").await, "updated@example.com");
    db.apply(&[customer_event(
        "evt_o",
        "customer.updated",
        499,
        "cus_b",
        "older@example.com",
    )])
    .await;
    assert_eq!(email("cus_b").await, "updated@example.com");
    db.apply(&[snapshot("cus_c", "snapshot@example.com")]).await;
    db.apply(&[customer_event(
        "evt_old",
        "customer.updated",
        499,
        "cus_c",
        "older@example.com",
    )])
    .await;
    assert_eq!(email("cus_c").await, "snapshot@example.com");
}

#[tokio::test]
async fn a_backfill_killed_mid_way_resumes_where_it_stopped_and_never_runs_twice_at_once() {
    let fake = fake(&[]).await;
    let now = stripe::now();
    for i in 0..3000 {
        fake.put(
            PLATFORM,
            &with(
                "customer",
                &format!("cus_{i:05}"),
                now - 100_000 + i * 10,
                json!({}),
            ),
        );
    }
    fake.set_behaviour(Behaviour {
        latency: Duration::from_millis(20),
        ..Behaviour::default()
    });
    // Four ranges at once: the kill lands while ranges split and page side by side.
    let env = test_env(&fake, &[("STRIPE_SYNC__STRIPE__RANGES_PER_TYPE", "4")]).await;
    let args = ["backfill", "--objects", "customers"];
    let mut first = env.spawn_applier_with_args("backfill-1", &args);
    eventually(PATIENCE, "some pages checkpointed", || async {
        let n: i64 = sqlx::query_scalar(
            "select coalesce(sum(objects), 0)::int8 from stripe.backfill_ranges",
        )
        .fetch_one(&env.pool)
        .await
        .ok()?;
        (n >= 500).then_some(())
    })
    .await;
    // While it runs (its pages now slow), a second backfill of the same objects refuses rather than fetch every
    // page twice.
    fake.set_behaviour(Behaviour {
        latency: Duration::from_secs(5),
        ..Behaviour::default()
    });
    let (ok, output) = env.applier_cli(&args).await;
    assert!(
        !ok && output.contains("another backfill is loading the same objects"),
        "{output}"
    );
    first.kill();
    fake.set_behaviour(Behaviour {
        latency: Duration::from_millis(20),
        ..Behaviour::default()
    });
    let pages_before = fake
        .requests()
        .iter()
        .filter(|(e, _)| e == "GET /v1/customers")
        .count();
    let (ok, output) = env.applier_cli(&args).await;
    assert!(ok, "{output}");
    let pages = fake
        .requests()
        .iter()
        .filter(|(e, _)| e == "GET /v1/customers")
        .count();
    // Every object checkpointed once; pages: 30 full ones, at most one partial page per range (ranges split as
    // they go), and at most one page in flight per running range (4) when the first run was killed.
    let (objects, ranges): (i64, i64) = sqlx::query_as(
        "select coalesce(sum(objects), 0)::int8, count(*) from stripe.backfill_ranges",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(objects, 3000);
    assert!(
        pages_before >= 5 && pages as i64 <= 30 + ranges + 4,
        "{pages} pages for 30 in {ranges} ranges ({pages_before} before the kill)"
    );
    let applier = env.start_applier().await;
    env.wait_count("select count(*) from stripe.customers", 3000)
        .await;
    applier.stop().await;
}

#[tokio::test]
async fn a_rate_limited_flaky_api_is_loaded_exactly_within_its_budget() {
    let fake = fake(&[]).await;
    let now = stripe::now();
    for i in 0..600 {
        fake.put(
            PLATFORM,
            &with(
                "customer",
                &format!("cus_{i:04}"),
                now - 100_000 + i * 50,
                json!({}),
            ),
        );
        fake.put(
            PLATFORM,
            &with(
                "product",
                &format!("prod_{i:04}"),
                now - 100_000 + i * 50,
                json!({}),
            ),
        );
    }
    fake.set_behaviour(Behaviour {
        global_rate: Some(30),
        endpoint_rate: Some(10),
        server_error_every: Some(7),
        malformed_every: Some(11),
        reset_every: Some(13),
        rate_limit_storm: 6,
        ..Behaviour::default()
    });
    let env = test_env(
        &fake,
        &[
            ("STRIPE_SYNC__STRIPE__TEST_REQUESTS_PER_SECOND", "25"),
            ("STRIPE_SYNC__STRIPE__ENDPOINT_REQUESTS_PER_SECOND", "7"),
        ],
    )
    .await;
    let applier = env.start_applier().await;
    let options = Options {
        objects: vec!["customers".into(), "products".into()],
        ..Options::default()
    };
    let summary = stripe_sync_applier::commands::backfill(&env.settings(), &options)
        .await
        .unwrap();
    assert!(summary.ok(), "{summary}");
    assert_eq!(
        fake.rate_limited(),
        6,
        "only the storm: the client kept within the budget"
    );
    env.wait_count("select count(*) from stripe.customers", 600)
        .await;
    env.wait_count("select count(*) from stripe.products", 600)
        .await;
    applier.stop().await;
}

#[tokio::test]
async fn a_wrong_key_fails_at_once_with_a_clear_message() {
    let fake = fake(&[]).await;
    let env = test_env(&fake, &[("STRIPE_API_KEY", "sk_test_wrong")]).await;
    let started = std::time::Instant::now();
    let (ok, output) = env.applier_cli(&["backfill"]).await;
    assert!(!ok);
    assert!(
        output.contains("STRIPE_API_KEY") && output.contains("401"),
        "{output}"
    );
    assert!(
        !output.contains("sk_test_wrong"),
        "the key is never printed: {output}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn recover_closes_a_gap_of_missed_webhooks_and_refuses_one_older_than_30_days() {
    let fake = fake(&["acct_r"]).await;
    let now = stripe::now();
    fake.put(PLATFORM, &with("account", "acct_r", now - 9000, json!({})));
    let events: Vec<Value> = (0..5)
        .map(|i| {
            customer_event(
                &format!("evt_gap_{i}"),
                "customer.created",
                now - 3600 + i,
                &format!("cus_gap_{i}"),
                "g@example.com",
            )
        })
        .collect();
    for (i, event) in events.iter().enumerate() {
        fake.put_event(PLATFORM, event, i % 2 == 0);
    }
    // A connected account's events are read with its `Stripe-Account`; the API leaves `account` out of them.
    for i in 0..2 {
        let mut event = customer_event(
            &format!("evt_gap_connected_{i}"),
            "customer.created",
            now - 3000 + i,
            &format!("cus_gap_connected_{i}"),
            "c@example.com",
        );
        event.as_object_mut().unwrap().remove("account");
        fake.put_event("acct_r", &event, false);
    }
    let env = test_env(&fake, &[]).await;
    let applier = env.start_applier().await;
    // The webhook of one of them did arrive.
    env.publish(&events[0]).await;
    let since = time::OffsetDateTime::from_unix_timestamp(now - 7200)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (ok, output) = env.applier_cli(&["recover", "--since", &since]).await;
    assert!(ok && output.contains("5 events read"), "{output}");
    env.wait_count(
        "select count(*) from stripe.customers where id like 'cus_gap_%'",
        5,
    )
    .await;
    // Again, with the connected accounts: what is already there changes nothing, the rest lands in its account.
    let (ok, output) = env
        .applier_cli(&["recover", "--since", &since, "--connected-accounts"])
        .await;
    assert!(
        ok && output.contains("7 events read") && output.contains("2 not in the stream yet"),
        "{output}"
    );
    env.wait_count(
        "select count(*) from stripe.customers where id like 'cus_gap_connected_%' and _account_id = 'acct_r'",
        2,
    )
    .await;
    env.wait_drained().await;
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.events where id like 'evt_gap_%'")
            .await,
        7
    );
    let too_old = time::OffsetDateTime::from_unix_timestamp(now - 40 * 24 * 3600)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (ok, output) = env.applier_cli(&["recover", "--since", &too_old]).await;
    assert!(
        !ok && output.contains("30 days") && output.contains("backfill"),
        "{output}"
    );
    applier.stop().await;
}

#[tokio::test]
async fn sync_reads_given_objects_again_now() {
    let fake = fake(&[]).await;
    let now = stripe::now();
    fake.put(
        PLATFORM,
        &with(
            "customer",
            "cus_s",
            now - 100,
            json!({ "email": "fresh@example.com" }),
        ),
    );
    // An invoice with 25 lines: Stripe embeds 10 and says `has_more`.
    fake.put(PLATFORM, &invoice_with_lines("in_s", 25, now - 90));
    let env = test_env(&fake, &[]).await;
    let applier = env.start_applier().await;
    env.publish(&customer_event(
        "evt_s",
        "customer.updated",
        now - 200,
        "cus_s",
        "stale@example.com",
    ))
    .await;
    env.wait_drained().await;
    let (ok, output) = env
        .applier_cli(&["sync", "customers", "cus_s", "cus_missing"])
        .await;
    assert!(ok, "{output}");
    assert!(output.contains("cus_missing\tNotFound"), "{output}");
    env.wait_drained().await;
    assert_eq!(
        env.scalar::<String>("select email from stripe.customers where id = 'cus_s'")
            .await,
        "fresh@example.com"
    );
    let (ok, output) = env.applier_cli(&["sync", "invoices", "in_s"]).await;
    assert!(ok, "{output}");
    env.wait_drained().await;
    assert_eq!(
        env.scalar::<i64>("select count(*) from stripe.invoice_line_items where _parent_id = 'in_s' and not deleted").await,
        25,
        "a synced invoice's lines are fetched to the end"
    );
    applier.stop().await;
}

/// The admin job's state once it is no longer running.
async fn finished_job(http: &reqwest::Client, base: &str, job: u64, what: &str) -> Value {
    eventually(PATIENCE, what, || async {
        let state: Value = http
            .get(format!("{base}/jobs/{job}"))
            .bearer_auth("admin-secret")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (state["state"] != "running").then_some(state)
    })
    .await
}

#[tokio::test]
async fn the_admin_listener_serves_backfill_sync_and_jobs_to_bearers_of_its_token_only() {
    let fake = fake(&[]).await;
    let now = stripe::now();
    for i in 0..150 {
        fake.put(
            PLATFORM,
            &with(
                "customer",
                &format!("cus_{i:03}"),
                now - 1000 + i,
                json!({}),
            ),
        );
    }
    let env = test_env(
        &fake,
        &[
            ("STRIPE_SYNC_ADMIN_TOKEN", "admin-secret"),
            ("STRIPE_SYNC__ADMIN__HOST", "127.0.0.1"),
            ("STRIPE_SYNC__ADMIN__PORT", "0"),
        ],
    )
    .await;
    let app = stripe_sync_applier::startup::Application::build(env.settings())
        .await
        .unwrap();
    let base = format!(
        "http://127.0.0.1:{}",
        app.admin_port().expect("admin listener on")
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    for token in [None, Some("wrong")] {
        let mut request = http.post(format!("{base}/backfill"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(request.send().await.unwrap().status(), 401, "{token:?}");
    }
    let started: Value = http
        .post(format!("{base}/backfill"))
        .bearer_auth("admin-secret")
        .json(&json!({ "objects": ["customers"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = started["job"].as_u64().unwrap();
    let done = finished_job(&http, &base, job, "the backfill job is done").await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["progress"]["objects"], 150, "{done}");
    // The customer changes without a webhook; a sync over HTTP reads it again.
    fake.put(
        PLATFORM,
        &with(
            "customer",
            "cus_001",
            now - 1000 + 1,
            json!({ "email": "changed@example.com" }),
        ),
    );
    let synced = http
        .post(format!("{base}/sync/customers"))
        .bearer_auth("admin-secret")
        .json(&json!({ "ids": ["cus_001"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(synced.status(), 202);
    let job: Value = synced.json().await.unwrap();
    let job = job["job"].as_u64().unwrap();
    let done = finished_job(&http, &base, job, "the sync job is done").await;
    assert_eq!(done["state"], "done", "{done}");
    eventually(PATIENCE, "the synced change is in the table", || async {
        let email: Option<String> =
            sqlx::query_scalar("select email from stripe.customers where id = 'cus_001'")
                .fetch_one(&env.pool)
                .await
                .ok()?;
        (email.as_deref() == Some("changed@example.com")).then_some(())
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn connected_accounts_are_loaded_into_their_own_rows() {
    let fake = fake(&["acct_a"]).await;
    let now = stripe::now();
    fake.put(PLATFORM, &with("account", "acct_a", now - 900, json!({})));
    fake.put(
        PLATFORM,
        &with("customer", "cus_platform", now - 800, json!({})),
    );
    fake.put(
        "acct_a",
        &with("customer", "cus_connected", now - 700, json!({})),
    );
    let mut capability = stripe::object("capability", "card_payments");
    capability["account"] = json!("acct_a");
    capability["livemode"] = json!(false);
    fake.put("", &capability);
    let env = test_env(&fake, &[]).await;
    let applier = env.start_applier().await;
    let options = Options {
        objects: vec!["accounts".into(), "customers".into(), "capabilities".into()],
        connected_accounts: true,
        ..Options::default()
    };
    let summary = stripe_sync_applier::commands::backfill(&env.settings(), &options)
        .await
        .unwrap();
    assert!(summary.ok(), "{summary}");
    env.wait_drained().await;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select _account_id, id from stripe.customers union all select _account_id, id from stripe.accounts \
         union all select _account_id, id from stripe.capabilities order by 1, 2",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            ("acct_a".into(), "acct_a".into()),
            ("acct_a".into(), "card_payments".into()),
            ("acct_a".into(), "cus_connected".into()),
            ("platform".into(), "cus_platform".into()),
        ]
    );
    applier.stop().await;
}
