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

/// Generous bound for anything asynchronous in a test on a loaded two-core machine.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct TestEnv {
    pub nats: TestNats,
    pub db: TestDb,
    pub pool: PgPool,
    pub env: HashMap<String, String>,
    pub stream_name: String,
    pub topology: Topology,
}

pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn stop(mut self) {
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
    pub async fn new() -> Self {
        Self::with_env(&[]).await
    }

    pub async fn with_env(extra: &[(&str, &str)]) -> Self {
        init_telemetry();
        let nats = TestNats::start();
        let db = TestDb::create().await;
        let pool = db.pool().await;
        let stream_name = unique_name("EVENTS");
        let mut env: HashMap<String, String> = HashMap::from([
            ("NATS_URL".into(), nats.url()),
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
        let partitions = env
            .get("STRIPE_SYNC__STREAM__PARTITIONS")
            .map_or(1, |p| p.parse().unwrap());
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
        }
    }

    pub fn settings(&self) -> Settings {
        Settings::load_from(&self.env).expect("applier settings")
    }

    /// Starts the applier in-process; returns once its migrations ran and it consumes.
    pub async fn start_applier(&self) -> Running {
        self.start_applier_with(self.settings()).await
    }

    pub async fn start_applier_with(&self, settings: Settings) -> Running {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(stripe_sync_applier::startup::run_until(
            settings,
            async move {
                let _ = rx.await;
            },
        ));
        let running = Running {
            stop: Some(tx),
            task,
        };
        let js = self.jetstream().await;
        eventually(PATIENCE, "applier consumers exist", || async {
            let stream = js.get_stream(&self.stream_name).await.ok()?;
            let name = format!("stripe-sync-applier-p{}", self.topology.partitions - 1);
            stream.consumer_info(&name).await.ok().map(|_| ())
        })
        .await;
        running
    }

    /// Starts ingest in-process; returns its base URL and a handle that stops it when dropped.
    pub async fn start_ingest(&self) -> (String, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let settings =
            stripe_sync_ingest::settings::Settings::load_from(&self.env).expect("ingest settings");
        let app = stripe_sync_ingest::startup::Application::build(settings)
            .await
            .expect("ingest");
        let base = format!("http://127.0.0.1:{}", app.port());
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
        (base, task)
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(
            async_nats::connect(self.nats.url())
                .await
                .expect("test connects to NATS"),
        )
    }

    /// Makes sure the events stream exists (as ingest would create it).
    pub async fn ensure_stream(&self) -> Stream {
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
    pub async fn publish(&self, event: &Value) -> u64 {
        self.publish_raw(serde_json::to_vec(event).unwrap(), event)
            .await
    }

    pub async fn publish_raw(&self, body: Vec<u8>, event: &Value) -> u64 {
        self.ensure_stream().await;
        let object_id = event["data"]["object"]["id"]
            .as_str()
            .unwrap_or(event["id"].as_str().unwrap_or("x"));
        let event_type = event["type"].as_str().unwrap_or("unknown");
        let subject = self
            .topology
            .event_subject(self.topology.partition_of(object_id), event_type);
        let mut headers = HeaderMap::new();
        headers.insert(subjects::HEADER_EVENT_TYPE, event_type);
        headers.insert(subjects::HEADER_OBJECT_ID, object_id);
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
    pub async fn wait_drained(&self) {
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

    /// Waits until `sql` (returning one bigint) returns `want`.
    pub async fn wait_count(&self, sql: &str, want: i64) {
        eventually(PATIENCE, &format!("{sql} = {want}"), || async {
            let got: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_one(&self.pool)
                .await
                .ok()?;
            (got == want).then_some(())
        })
        .await;
    }

    pub async fn scalar<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Number of messages in the dead-letter stream.
    pub async fn dead_letters(&self) -> u64 {
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

/// A customer event with a given email and `created`.
pub fn customer_event(
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

pub fn init_telemetry() {
    static INIT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INIT.get_or_init(|| {
        let settings = stripe_sync_shared::settings::TelemetrySettings {
            filter: "warn".into(),
            ..Default::default()
        };
        std::mem::forget(
            stripe_sync_shared::telemetry::init(&settings, "applier-tests").expect("telemetry"),
        );
    });
}
