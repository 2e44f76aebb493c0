//! NATS locked down: the users and permissions shipped in deploy/nats.conf, and TLS with a private CA. Each test
//! runs a webhook through ingest and the applier over the secured server, and shows what is refused.

use std::path::Path;

use secrecy::SecretString;
use stripe_sync_shared::settings::NatsSettings;
use stripe_sync_testkit::nats::TestNats;
use stripe_sync_testkit::stripe::now;
use stripe_sync_testkit::tls::TestCa;

use crate::helpers::{TestEnv, customer_event, post_signed};

/// Passwords with characters a URL must escape, as generated passwords have.
const INGEST_PASSWORD: &str = "in/gest p@ss:1";
const APPLIER_PASSWORD: &str = "appl#er%pass";

/// `deploy/nats.conf`'s `authorization { ... }` block, with the passwords it takes from the environment filled in.
fn shipped_authorization() -> String {
    let conf =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats.conf"))
            .unwrap();
    let start = conf
        .find("authorization {")
        .expect("deploy/nats.conf has an authorization block");
    let mut depth = 0;
    let mut end = start;
    for (i, c) in conf[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    end = start + i + 1;
                    break;
                }
            }
            _ => {}
        }
    }
    let block = &conf[start..end];
    assert!(block.contains("$NATS_INGEST_PASSWORD") && block.contains("$NATS_APPLIER_PASSWORD"));
    block
        .replace("$NATS_INGEST_PASSWORD", &format!("{INGEST_PASSWORD:?}"))
        .replace("$NATS_APPLIER_PASSWORD", &format!("{APPLIER_PASSWORD:?}"))
}

/// `nats://user:password@127.0.0.1:port`, the password escaped for a URL.
fn url_as(nats: &TestNats, user: &str, password: &str) -> String {
    let escaped: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("nats://{user}:{escaped}@127.0.0.1:{}", nats.port())
}

fn nats_settings(url: String) -> NatsSettings {
    NatsSettings {
        url: SecretString::from(url),
        ..NatsSettings::default()
    }
}

/// Connects once (no retry in the background) and says why it failed.
async fn connect_error(settings: &NatsSettings) -> String {
    match stripe_sync_shared::nats::connect(settings, "probe", true).await {
        Ok(_) => "connected".into(),
        Err(err) => format!("{err:#}").to_lowercase(),
    }
}

/// A webhook posted to `ingest` ends as its customer's row.
async fn a_webhook_lands(env: &TestEnv, ingest: &str, id: &str) {
    let customer = format!("cus_{id}");
    let event = customer_event(
        &format!("evt_{id}"),
        "customer.created",
        now(),
        &customer,
        "ada@example.com",
    );
    let body = serde_json::to_vec(&event).unwrap();
    assert_eq!(
        post_signed(&reqwest::Client::new(), ingest, &body).await,
        200
    );
    env.wait_count(
        &format!("select count(*) from stripe.customers where id = '{customer}'"),
        1,
    )
    .await;
}

#[tokio::test]
async fn the_shipped_nats_config_refuses_anonymous_clients_and_each_binary_works_as_its_own_user() {
    let nats = TestNats::start_with(&shipped_authorization());

    let anonymous = connect_error(&nats_settings(nats.url())).await;
    assert!(anonymous.contains("authorization"), "{anonymous}");
    let wrong = connect_error(&nats_settings(url_as(&nats, "ingest", "guess"))).await;
    assert!(wrong.contains("authorization"), "{wrong}");

    let env = TestEnv::with_env(&[("NATS_URL", &url_as(&nats, "applier", APPLIER_PASSWORD))]).await;
    let ingest_url = url_as(&nats, "ingest", INGEST_PASSWORD);
    let (ingest, _, _ingest_task) = env
        .start_ingest_overriding(&[("NATS_URL", &ingest_url)])
        .await;
    let applier = env.start_applier().await;
    a_webhook_lands(&env, &ingest, "secured").await;

    // Ingest's user may publish events, not read them: it can't make a consumer of the stream.
    let as_ingest = stripe_sync_shared::nats::connect(&nats_settings(ingest_url), "probe", true)
        .await
        .expect("ingest's user connects");
    let js = async_nats::jetstream::new(as_ingest);
    let made = js
        .create_consumer_on_stream(
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("snoop".into()),
                ..Default::default()
            },
            env.stream_name.as_str(),
        )
        .await;
    assert!(made.is_err(), "ingest's user made a consumer");
    applier.stop().await;
}

#[tokio::test]
async fn nats_over_tls_with_a_private_ca_and_client_certificates() {
    let ca = TestCa::new();
    let nats = TestNats::start_with(&ca.nats_tls_block(true));
    let url = format!("tls://127.0.0.1:{}", nats.port());
    let (cert, key) = ca.pair("client");

    // Without the private CA the server's certificate is not trusted; without a client certificate the server
    // refuses the client.
    let untrusted = connect_error(&nats_settings(url.clone())).await;
    assert_ne!(untrusted, "connected");
    let anonymous = connect_error(&NatsSettings {
        tls_ca_file: Some(ca.ca()),
        ..nats_settings(url.clone())
    })
    .await;
    assert_ne!(anonymous, "connected");
    // Half a client certificate is a settings mistake, said before connecting.
    let half = connect_error(&NatsSettings {
        tls_ca_file: Some(ca.ca()),
        tls_cert_file: Some(cert.clone()),
        ..nats_settings(url.clone())
    })
    .await;
    assert!(half.contains("tls_key_file"), "{half}");

    let (ca_file, cert, key) = (
        ca.ca().display().to_string(),
        cert.display().to_string(),
        key.display().to_string(),
    );
    // A plain nats:// URL: the server asks for TLS, and the client's CA and certificate serve it.
    let plain_url = format!("nats://127.0.0.1:{}", nats.port());
    let env = TestEnv::with_env(&[
        ("NATS_URL", &plain_url),
        ("STRIPE_SYNC__NATS__TLS_CA_FILE", &ca_file),
        ("STRIPE_SYNC__NATS__TLS_CERT_FILE", &cert),
        ("STRIPE_SYNC__NATS__TLS_KEY_FILE", &key),
    ])
    .await;
    let (ingest, _ingest_task) = env.start_ingest().await;
    let applier = env.start_applier().await;
    a_webhook_lands(&env, &ingest, "tls").await;
    applier.stop().await;
}

#[tokio::test]
async fn a_client_that_requires_tls_refuses_a_server_without_it() {
    let nats = TestNats::start();
    let plain = connect_error(&NatsSettings {
        tls_required: true,
        ..nats_settings(nats.url())
    })
    .await;
    assert_ne!(plain, "connected");
    assert_eq!(connect_error(&nats_settings(nats.url())).await, "connected");
}
