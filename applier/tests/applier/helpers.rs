//! A private NATS and a fresh database per test; the applier (and ingest, for end-to-end tests) run in-process
//! against them, started and stopped by the test.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::Stream};
use serde_json::Value;
use sqlx::PgPool;
use stripe_sync_applier::settings::Settings;
use stripe_sync_shared::subjects::{self, Topology};
use stripe_sync_testkit::db::TestDb;
use stripe_sync_testkit::nats::TestNats;
use stripe_sync_testkit::{eventually, stripe, unique_name};

/// POSTs `body` to ingest's `/webhooks` at `base`, signed now with the test secret; returns the status code.
pub(crate) async fn post_signed(http: &reqwest::Client, base: &str, body: &[u8]) -> u16 {
    http.post(format!("{base}/webhooks"))
        .header(
            "stripe-signature",
            stripe::sign(stripe::SECRET, stripe::now(), body),
        )
        .body(body.to_vec())
        .send()
        .await
        .expect("request reaches ingest")
        .status()
        .as_u16()
}

/// Generous bound for anything asynchronous in a test on a loaded two-core machine.
pub(crate) const PATIENCE: Duration = Duration::from_secs(60);

pub(crate) struct TestEnv {
    pub nats: TestNats,
    pub db: TestDb,
    pub pool: PgPool,
    pub env: HashMap<String, String>,
    pub stream_name: String,
    pub topology: Topology,
    js: tokio::sync::OnceCell<jetstream::Context>,
    stream_ready: tokio::sync::OnceCell<()>,
}

/// A child process, killed (SIGKILL) when dropped.
pub(crate) struct ChildGuard {
    pub child: Option<std::process::Child>,
    pub log: std::path::PathBuf,
}

impl ChildGuard {
    /// SIGKILL: the process dies mid-work, as on a crash.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit code.
    pub(crate) async fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        tokio::task::spawn_blocking(move || child.wait().ok()?.code())
            .await
            .ok()?
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The metrics and probes listener's port.
    pub metrics_port: u16,
}

impl Running {
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .expect("applier task")
            .expect("applier stops cleanly");
    }
}

impl TestEnv {
    pub(crate) async fn new() -> Self {
        Self::with_env(&[]).await
    }

    pub(crate) async fn with_env(extra: &[(&str, &str)]) -> Self {
        let db = TestDb::create().await;
        let pool = db.pool().await;
        Self::build(db, pool, extra)
    }

    /// An environment whose database is `url` (a private server) instead of a fresh one on the shared server.
    pub(crate) async fn with_database_url(url: &str, extra: &[(&str, &str)]) -> Self {
        let db = TestDb::create().await; // unused, keeps the struct uniform
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(url)
            .await
            .expect("private Postgres");
        let mut extra: Vec<(&str, &str)> = extra.to_vec();
        extra.push(("DATABASE_URL", url));
        Self::build(db, pool, &extra)
    }

    fn build(db: TestDb, pool: PgPool, extra: &[(&str, &str)]) -> Self {
        init_telemetry();
        let nats = TestNats::start();
        let stream_name = unique_name("EVENTS");
        let mut env: HashMap<String, String> = HashMap::from([
            ("NATS_URL".into(), nats.url()),
            ("METRICS_PORT".into(), "0".into()),
            ("DATABASE_URL".into(), db.url().to_owned()),
            ("STRIPE_WEBHOOK_SECRET".into(), stripe::SECRET.into()),
            ("PORT".into(), "0".into()),
            ("STRIPE_SYNC__HTTP__HOST".into(), "127.0.0.1".into()),
            ("STRIPE_SYNC__STREAM__NAME".into(), stream_name.clone()),
            (
                "STRIPE_SYNC__STREAM__DLQ_NAME".into(),
                format!("{stream_name}_DLQ"),
            ),
            ("STRIPE_SYNC__APPLIER__RETRY_INITIAL".into(), "100ms".into()),
            ("STRIPE_SYNC__APPLIER__RETRY_MAX".into(), "1s".into()),
            ("STRIPE_SYNC__APPLIER__ACK_WAIT".into(), "10s".into()),
        ]);
        for (k, v) in extra {
            env.insert((*k).into(), (*v).into());
        }
        let partitions = Settings::load_from(&env)
            .expect("settings")
            .stream
            .partitions
            .get();
        let topology = Topology {
            prefix: "stripe".into(),
            partitions,
        };
        Self {
            nats,
            db,
            pool,
            env,
            stream_name,
            topology,
            js: tokio::sync::OnceCell::new(),
            stream_ready: tokio::sync::OnceCell::new(),
        }
    }

    pub(crate) fn settings(&self) -> Settings {
        Settings::load_from(&self.env).expect("applier settings")
    }

    /// Starts the applier in-process; returns once its migrations ran and it consumes.
    pub(crate) async fn start_applier(&self) -> Running {
        self.start_applier_with(self.settings()).await
    }

    /// Builds the applier (it is ready to consume when `build` returns) and runs it in the background.
    pub(crate) async fn start_applier_with(&self, settings: Settings) -> Running {
        let app = stripe_sync_applier::startup::Application::build(settings)
            .await
            .expect("applier builds");
        let metrics_port = app.metrics_port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Running {
            stop: Some(tx),
            task,
            metrics_port,
        }
    }

    /// Starts ingest in-process; returns its base URL and a handle that stops it when dropped.
    pub(crate) async fn start_ingest(
        &self,
    ) -> (String, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let (base, _, task) = self.start_ingest_with_metrics().await;
        (base, task)
    }

    /// [`TestEnv::start_ingest`], with the base URL of its metrics listener too.
    pub(crate) async fn start_ingest_with_metrics(
        &self,
    ) -> (String, String, tokio::task::JoinHandle<anyhow::Result<()>>) {
        self.start_ingest_overriding(&[]).await
    }

    /// [`TestEnv::start_ingest_with_metrics`] with some of the environment's variables replaced (e.g. its NATS
    /// user).
    pub(crate) async fn start_ingest_overriding(
        &self,
        overrides: &[(&str, &str)],
    ) -> (String, String, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let mut env = self.env.clone();
        for (k, v) in overrides {
            env.insert((*k).into(), (*v).into());
        }
        let settings =
            stripe_sync_ingest::settings::Settings::load_from(&env).expect("ingest settings");
        let app = stripe_sync_ingest::startup::Application::build(settings)
            .await
            .expect("ingest");
        let base = format!("http://127.0.0.1:{}", app.port());
        let metrics = format!("http://127.0.0.1:{}", app.metrics_port());
        let task = tokio::spawn(app.run_until(std::future::pending()));
        let http = reqwest::Client::new();
        eventually(PATIENCE, "ingest ready", || async {
            http.get(format!("{base}/readyz"))
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ())
        })
        .await;
        (base, metrics, task)
    }

    /// A JetStream context of the test's own (one connection, reused; it reconnects after a NATS restart).
    pub(crate) async fn jetstream(&self) -> jetstream::Context {
        self.js
            .get_or_init(|| async {
                // The binaries' own way of connecting: the servers, credentials and TLS of the test's settings.
                let client =
                    stripe_sync_shared::nats::connect(&self.settings().nats, "test", false)
                        .await
                        .expect("test connects to NATS");
                eventually(PATIENCE, "test client connected to NATS", || async {
                    (client.connection_state() == async_nats::connection::State::Connected)
                        .then_some(())
                })
                .await;
                jetstream::new(client)
            })
            .await
            .clone()
    }

    /// Makes sure the events stream exists (as ingest would create it).
    pub(crate) async fn ensure_stream(&self) -> Stream {
        let settings = self.settings();
        stripe_sync_shared::nats::ensure_events_stream(
            &self.jetstream().await,
            &settings.stream,
            false,
        )
        .await
        .expect("stream");
        self.jetstream()
            .await
            .get_stream(&self.stream_name)
            .await
            .unwrap()
    }

    /// Publishes an event to the stream the way ingest does (without JetStream's own dedupe, so a test can
    /// deliver the same event twice).
    pub(crate) async fn publish(&self, event: &Value) -> u64 {
        self.publish_raw(serde_json::to_vec(event).unwrap(), event)
            .await
    }

    pub(crate) async fn publish_raw(&self, body: Vec<u8>, event: &Value) -> u64 {
        self.stream_ready
            .get_or_init(|| async {
                self.ensure_stream().await;
            })
            .await;
        let object_id = event["data"]["object"]["id"].as_str();
        let routing = subjects::routing_key(
            event["account"].as_str(),
            object_id,
            event["id"].as_str().unwrap_or("x"),
        );
        let event_type = event["type"].as_str().unwrap_or("unknown");
        let subject = self
            .topology
            .event_subject(self.topology.partition_of(&routing), event_type);
        let mut headers = HeaderMap::new();
        headers.insert(
            subjects::HEADER_EVENT_TYPE,
            subjects::header_safe(event_type, 256).as_str(),
        );
        if let Some(object_id) = object_id {
            headers.insert(subjects::HEADER_OBJECT_ID, object_id);
        }
        let ack = self
            .jetstream()
            .await
            .publish_with_headers(subject, headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
        ack.sequence
    }

    /// Waits until every partition's consumer has acked everything in the stream.
    pub(crate) async fn wait_drained(&self) {
        let js = self.jetstream().await;
        eventually(PATIENCE, "applier drained the stream", || async {
            let stream = js.get_stream(&self.stream_name).await.ok()?;
            for p in 0..self.topology.partitions {
                let info = stream
                    .consumer_info(format!("stripe-sync-applier-p{p}"))
                    .await
                    .ok()?;
                if info.num_pending > 0 || info.num_ack_pending > 0 {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }

    /// Starts the applier binary as its own process (killed when the handle drops), logging to a file.
    pub(crate) fn spawn_applier_process(&self, name: &str) -> ChildGuard {
        self.spawn_applier_with_args(name, &[])
    }

    /// Starts the applier binary with arguments (a subcommand) as its own process, killed when the handle drops.
    pub(crate) fn spawn_applier_with_args(&self, name: &str, args: &[&str]) -> ChildGuard {
        let log = std::env::temp_dir().join(format!("{}-{name}.log", self.stream_name));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_stripe-sync-applier"))
            .args(args)
            .envs(&self.env)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log).expect("log file"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawning the applier");
        ChildGuard {
            child: Some(child),
            log,
        }
    }

    /// Runs the applier binary with arguments; returns (success, stdout).
    pub(crate) async fn applier_cli(&self, args: &[&str]) -> (bool, String) {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_stripe-sync-applier"))
            .args(args)
            .envs(&self.env)
            .env("RUST_LOG", "warn")
            .output()
            .await
            .expect("running the applier binary");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        (output.status.success(), format!("{stdout}{stderr}"))
    }

    /// Messages delivered to appliers and not acked yet, over all partitions.
    pub(crate) async fn ack_pending(&self) -> Option<u64> {
        let stream = self
            .jetstream()
            .await
            .get_stream(&self.stream_name)
            .await
            .ok()?;
        let mut total = 0;
        for p in 0..self.topology.partitions {
            total += stream
                .consumer_info(format!("stripe-sync-applier-p{p}"))
                .await
                .ok()?
                .num_ack_pending as u64;
        }
        Some(total)
    }

    /// Waits until `sql` (returning one bigint) returns `want`.
    pub(crate) async fn wait_count(&self, sql: &str, want: i64) {
        eventually(PATIENCE, &format!("{sql} = {want}"), || async {
            let got: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_one(&self.pool)
                .await
                .ok()?;
            (got == want).then_some(())
        })
        .await;
    }

    /// Waits until `sql` (returning one bigint) returns at least `want`.
    pub(crate) async fn wait_count_at_least(&self, sql: &str, want: i64) {
        eventually(PATIENCE, &format!("{sql} >= {want}"), || async {
            let got: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_one(&self.pool)
                .await
                .ok()?;
            (got >= want).then_some(())
        })
        .await;
    }

    pub(crate) async fn scalar<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Number of messages in the dead-letter stream.
    pub(crate) async fn dead_letters(&self) -> u64 {
        match self
            .jetstream()
            .await
            .get_stream(format!("{}_DLQ", self.stream_name))
            .await
        {
            Ok(mut s) => s.info().await.unwrap().state.messages,
            Err(_) => 0,
        }
    }
}

/// The batch writer on a fresh migrated database, for rules that need only Postgres: no NATS, no worker.
pub(crate) struct Direct {
    /// Kept for the test's duration: the database is dropped with it.
    _db: TestDb,
    pub pool: PgPool,
    pub applier: stripe_sync_applier::apply::Applier,
    seq: std::sync::atomic::AtomicU64,
}

impl Direct {
    pub(crate) async fn new() -> Self {
        let db = TestDb::create().await;
        let pool = db.pool().await;
        stripe_sync_applier::migrate::run(&pool)
            .await
            .expect("migrations");
        let applier = stripe_sync_applier::apply::Applier::new(
            pool.clone(),
            stripe_sync_applier::registry::Registry::shipped(),
            "platform",
        );
        Self {
            _db: db,
            pool,
            applier,
            seq: 1.into(),
        }
    }

    /// The same, queueing objects for hydration by `policy`.
    pub(crate) fn hydrating(mut self, policy: stripe_sync_applier::hydrate::Policy) -> Self {
        self.applier = stripe_sync_applier::apply::Applier::new(
            self.pool.clone(),
            stripe_sync_applier::registry::Registry::shipped(),
            "platform",
        )
        .with_hydration(policy);
        self
    }

    /// Applies `events` as one batch, each at the next place in the stream.
    pub(crate) async fn apply(&self, events: &[Value]) -> stripe_sync_applier::apply::Report {
        let parsed: Vec<_> = events
            .iter()
            .map(|e| {
                let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                stripe_sync_applier::event::Incoming::parse(seq, &serde_json::to_vec(e).unwrap())
                    .unwrap()
            })
            .collect();
        self.applier
            .apply(&parsed, stripe_sync_applier::apply::Mode::Normal)
            .await
            .expect("batch applies")
    }

    /// Applies events at given places in the stream (`(seq, event)`), as one batch.
    pub(crate) async fn apply_at(&self, events: &[(u64, &Value)]) {
        let parsed: Vec<_> = events
            .iter()
            .map(|(seq, e)| {
                stripe_sync_applier::event::Incoming::parse(*seq, &serde_json::to_vec(e).unwrap())
                    .unwrap()
            })
            .collect();
        self.applier
            .apply(&parsed, stripe_sync_applier::apply::Mode::Normal)
            .await
            .expect("batch applies");
    }

    pub(crate) async fn scalar<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// A customer event with a given email and `created`.
pub(crate) fn customer_event(
    event_id: &str,
    event_type: &str,
    created: i64,
    customer_id: &str,
    email: &str,
) -> Value {
    let mut object = stripe::object("customer", customer_id);
    object["email"] = serde_json::json!(email);
    stripe::event(event_id, event_type, created, object)
}

pub(crate) fn init_telemetry() {
    static INIT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INIT.get_or_init(|| {
        let settings = stripe_sync_shared::settings::TelemetrySettings {
            filter: "warn".into(),
            ..Default::default()
        };
        Box::leak(Box::new(
            stripe_sync_shared::telemetry::init(&settings, "applier-tests").expect("telemetry"),
        ));
    });
}
