//! `spawn_app()`: ingest on port 0 against a private NATS server, plus ways to send signed webhooks and read back
//! what reached the stream.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, stream::Stream};
use stripe_sync_ingest::settings::Settings;
use stripe_sync_ingest::startup::Application;
use stripe_sync_testkit::nats::TestNats;
use stripe_sync_testkit::{eventually, stripe, unique_name};
use tokio::io::{AsyncRead, AsyncReadExt as _};

pub(crate) struct TestApp {
    pub address: String,
    pub nats: TestNats,
    pub http: reqwest::Client,
    pub stream_name: String,
    pub shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Ingest with the test secret, waiting until it is ready.
pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Ingest with extra environment variables (they win over the defaults set here).
pub(crate) async fn spawn_app_with(extra_env: &[(&str, &str)]) -> TestApp {
    init_telemetry();
    let nats = TestNats::start();
    let stream_name = unique_name("EVENTS");
    let mut env: HashMap<String, String> = HashMap::from([
        ("NATS_URL".into(), nats.url()),
        ("METRICS_PORT".into(), "0".into()),
        ("PORT".into(), "0".into()),
        ("STRIPE_WEBHOOK_SECRET".into(), stripe::SECRET.into()),
        ("STRIPE_SYNC__HTTP__HOST".into(), "127.0.0.1".into()),
        ("STRIPE_SYNC__STREAM__NAME".into(), stream_name.clone()),
        ("STRIPE_SYNC__WEBHOOK__PUBLISH_TIMEOUT".into(), "2s".into()),
    ]);
    for (k, v) in extra_env {
        env.insert((*k).into(), (*v).into());
    }
    let settings = Settings::load_from(&env).expect("test settings");
    let app = Application::build(settings).await.expect("building ingest");
    let address = format!("http://127.0.0.1:{}", app.port());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    let test_app = TestApp {
        address,
        nats,
        http: reqwest::Client::new(),
        stream_name,
        shutdown: Some(tx),
        server,
    };
    test_app.wait_ready().await;
    test_app
}

/// Telemetry as in production (spans carry trace context), logging only warnings, once per test process.
pub(crate) fn init_telemetry() {
    static INIT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INIT.get_or_init(|| {
        let settings = stripe_sync_shared::settings::TelemetrySettings {
            filter: "warn".into(),
            ..Default::default()
        };
        // Keep the guard for the whole process: dropping it would shut the tracer down.
        Box::leak(Box::new(
            stripe_sync_shared::telemetry::init(&settings, "ingest-tests").expect("telemetry"),
        ));
    });
}

impl TestApp {
    pub(crate) async fn wait_ready(&self) {
        eventually(Duration::from_secs(20), "ingest ready", || async {
            let r = self
                .http
                .get(format!("{}/readyz", self.address))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
    }

    /// POSTs `body` with the given `Stripe-Signature` (none when `None`).
    pub(crate) async fn post_raw(
        &self,
        path: &str,
        body: &[u8],
        signature: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}{}", self.address, path))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header("stripe-signature", signature);
        }
        request.send().await.expect("request reaches ingest")
    }

    /// POSTs `body` to `/webhooks`, signed with the test secret, now.
    pub(crate) async fn post_signed(&self, body: &[u8]) -> reqwest::Response {
        self.post_raw(
            "/webhooks",
            body,
            Some(&stripe::sign(stripe::SECRET, stripe::now(), body)),
        )
        .await
    }

    pub(crate) async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(
            async_nats::connect(self.nats.url())
                .await
                .expect("test connects to NATS"),
        )
    }

    pub(crate) async fn stream(&self) -> Stream {
        self.jetstream()
            .await
            .get_stream(&self.stream_name)
            .await
            .expect("events stream exists")
    }

    /// Number of messages in the events stream.
    pub(crate) async fn stored(&self) -> u64 {
        self.stream()
            .await
            .info()
            .await
            .expect("stream info")
            .state
            .messages
    }

    /// Stops ingest (as on SIGTERM) and returns what `run_until` returned.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.server).await.expect("server task")
    }
}

impl TestApp {
    /// `host:port` of the webhook listener, for raw sockets.
    pub(crate) fn socket_address(&self) -> String {
        self.address.trim_start_matches("http://").to_owned()
    }
}

/// The head of a signed `POST /webhooks` carrying `body` (kept alive unless `close`), written by hand for raw sockets.
pub(crate) fn signed_request_head(body: &[u8], close: bool) -> String {
    format!(
        "POST /webhooks HTTP/1.1\r\nHost: ingest\r\nContent-Type: application/json\r\nStripe-Signature: {}\r\n\
         Content-Length: {}\r\n{}\r\n",
        stripe::sign(stripe::SECRET, stripe::now(), body),
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// A `customer.created` event with this id, as Stripe sends it.
pub(crate) fn event(id: &str) -> Vec<u8> {
    serde_json::to_vec(&stripe::event(
        id,
        "customer.created",
        stripe::now(),
        stripe::fixture("customer"),
    ))
    .expect("event serializes")
}

/// Reads until ingest closes the connection (end of stream or reset) and returns what it sent; panics if that takes
/// more than 10 s.
pub(crate) async fn read_until_closed(reader: &mut (impl AsyncRead + Unpin)) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0; 4096];
        while let Ok(n @ 1..) = reader.read(&mut buf).await {
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("ingest closes the connection within 10 s");
    String::from_utf8_lossy(&answer).into_owned()
}

/// A JSON error body's `error` code.
pub(crate) async fn error_code(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    body["error"].as_str().unwrap_or_default().to_owned()
}
