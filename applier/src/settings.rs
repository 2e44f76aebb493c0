//! Applier settings: database, consuming (batching, acks, pinning), retries and dead letters, plus the shared
//! sections.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use stripe_sync_shared::ConfigError;
use stripe_sync_shared::settings::{
    self, NatsSettings, PlainEnv, StreamSettings, TelemetrySettings,
};

/// Plain environment names the applier honours, besides the shared ones.
pub const PLAIN_ENV: &[PlainEnv] = &[
    PlainEnv {
        var: "DATABASE_URL",
        key: "database.url",
    },
    PlainEnv {
        var: "STRIPE_ACCOUNT_ID",
        key: "applier.account_id",
    },
];

/// Everything `stripe-sync-applier` reads at start.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Postgres.
    pub database: DatabaseSettings,
    /// Consuming and applying.
    pub applier: ApplierSettings,
    /// NATS connection.
    pub nats: NatsSettings,
    /// Events stream and dead-letter stream.
    pub stream: StreamSettings,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
    /// Ingest's sections, accepted and ignored so both binaries can share one environment or file.
    pub http: serde::de::IgnoredAny,
    /// See `http`.
    pub webhook: serde::de::IgnoredAny,
}

impl Settings {
    /// Loads settings from the process environment (and the file it names, if any).
    pub fn load() -> Result<Self, ConfigError> {
        settings::load_from_process_env(PLAIN_ENV)
    }

    /// Loads settings from a given environment map (tests, the compose-file check).
    pub fn load_from(env: &std::collections::HashMap<String, String>) -> Result<Self, ConfigError> {
        settings::load(env, PLAIN_ENV)
    }
}

/// Postgres.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Connection URL (`DATABASE_URL`).
    pub url: SecretString,
    /// Pool size. Each partition worker holds at most one connection at a time.
    pub max_connections: u32,
    /// How long to wait for a pooled connection before counting it as a (transient) failure.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Run the migrations at start (otherwise run `stripe-sync-applier migrate` yourself).
    pub run_migrations: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("postgres://postgres@127.0.0.1:5432/postgres"),
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            run_migrations: true,
        }
    }
}

/// Consuming and applying.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApplierSettings {
    /// `_account_id` of events without `account` (your platform account's own events): set it to your `acct_...` id
    /// (`STRIPE_ACCOUNT_ID`). Changing it later splits your rows between two ids.
    pub account_id: String,
    /// Durable consumer names are `<consumer_prefix>-p<partition>`.
    pub consumer_prefix: String,
    /// Most events applied in one transaction.
    pub batch_size: usize,
    /// Longest wait for a batch to fill once its first event is in.
    #[serde(with = "humantime_serde")]
    pub batch_wait: Duration,
    /// How long JetStream waits for an ack before redelivering; the applier extends it while it retries.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How long a partition stays pinned to an applier that stopped pulling, before another one takes it over.
    #[serde(with = "humantime_serde")]
    pub pin_timeout: Duration,
    /// An applier that has not renewed its membership for this long counts as gone, and its partitions are dealt
    /// to the others. With `pin_timeout` and `ack_wait`, this bounds the failover time.
    #[serde(with = "humantime_serde")]
    pub member_ttl: Duration,
    /// A permanently failing event (a constraint or trigger rejects it, an unreadable payload) goes to the dead
    /// letter after this many attempts.
    pub dead_letter_after: u32,
    /// First wait before retrying; doubles (with jitter) up to `retry_max`.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest wait between retries of a transient failure (database down...), which retry without limit.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
}

impl Default for ApplierSettings {
    fn default() -> Self {
        Self {
            account_id: "platform".into(),
            consumer_prefix: "stripe-sync-applier".into(),
            batch_size: 500,
            batch_wait: Duration::from_millis(10),
            ack_wait: Duration::from_secs(10),
            pin_timeout: Duration::from_secs(6),
            member_ttl: Duration::from_secs(6),
            dead_letter_after: 5,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        }
    }
}
