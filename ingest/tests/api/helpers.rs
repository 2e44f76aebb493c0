//! `spawn_app()`: ingest on port 0 against a private NATS server, plus ways to send signed webhooks and read back
//! what reached the stream.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, stream::Stream};
use stripe_sync_ingest::settings::Settings;
use stripe_sync_ingest::startup::Application;
use stripe_sync_testkit::nats::TestNats;
use stripe_sync_testkit::{eventually, stripe, unique_name};

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

/// A JSON error body's `error` code.
pub(crate) async fn error_code(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    body["error"].as_str().unwrap_or_default().to_owned()
}
