//! Applier settings: database, consuming (batching, acks, pinning), retries and dead letters, plus the shared
//! sections.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use stripe_sync_shared::ConfigError;
use stripe_sync_shared::settings::{
    self, MetricsSettings, NatsSettings, PlainEnv, StreamSettings, TelemetrySettings,
    positive_duration,
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
    PlainEnv {
        var: "STRIPE_API_KEY",
        key: "stripe.api_key",
    },
    PlainEnv {
        var: "STRIPE_API_BASE",
        key: "stripe.api_base",
    },
    PlainEnv {
        var: "STRIPE_SYNC_ADMIN_TOKEN",
        key: "admin.token",
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
    /// Stripe's API (backfill, sync, recover).
    pub stripe: StripeSettings,
    /// The admin listener (`POST /backfill`...).
    pub admin: AdminSettings,
    /// Comparing the tables with Stripe's API, on a schedule (`reconcile`).
    pub reconcile: ReconcileSettings,
    /// History's retention (docs/history.md).
    pub history: HistorySettings,
    /// The metrics listener (`METRICS_PORT`).
    pub metrics: MetricsSettings,
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
        settings::load_from_process_env::<Self>(PLAIN_ENV)?.checked()
    }

    /// Loads settings from a given environment map (tests, the compose-file check).
    pub fn load_from(env: &std::collections::HashMap<String, String>) -> Result<Self, ConfigError> {
        settings::load::<Self>(env, PLAIN_ENV)?.checked()
    }

    /// Refuses combinations that can't work, naming the settings. An empty `STRIPE_API_KEY` (compose passes the
    /// variable through whether it is set or not) is no key.
    fn checked(mut self) -> Result<Self, ConfigError> {
        if self
            .stripe
            .api_key
            .as_ref()
            .is_some_and(|k| secrecy::ExposeSecret::expose_secret(k).is_empty())
        {
            self.stripe.api_key = None;
        }
        if let Some(retention) = self.history.retention
            && retention < MIN_RETENTION
        {
            return Err(ConfigError::Message(format!(
                "history.retention ({} days) must be at least 30 days: Stripe redelivers for 3 days and recover \
                 reads the last 30 days of events, which must still find their versions to be recognised",
                retention.as_secs() / 86_400
            )));
        }
        let a = &self.applier;
        if a.retry_initial > a.retry_max {
            return Err(ConfigError::Message(format!(
                "applier.retry_initial ({:?}) must not exceed applier.retry_max ({:?})",
                a.retry_initial, a.retry_max
            )));
        }
        Ok(self)
    }
}

/// Postgres.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Connection URL (`DATABASE_URL`).
    pub url: SecretString,
    /// Pool size, and how many batches one applier applies at once. Each partition worker holds at most one
    /// connection at a time.
    pub max_connections: NonZeroU32,
    /// How long to wait for a pooled connection before counting it as a (transient) failure.
    #[serde(with = "positive_duration")]
    pub acquire_timeout: Duration,
    /// Run the migrations at start (otherwise run `stripe-sync-applier migrate` yourself).
    pub run_migrations: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("postgres://postgres@127.0.0.1:5432/postgres"),
            max_connections: NonZeroU32::new(4).unwrap_or(NonZeroU32::MIN),
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
    pub batch_size: NonZeroUsize,
    /// Longest wait for a batch to fill once its first event is in.
    #[serde(with = "humantime_serde")]
    pub batch_wait: Duration,
    /// How long JetStream waits for an ack before redelivering; the applier extends it for every message it holds
    /// (applying, retrying, parked) three times per `ack_wait`.
    #[serde(with = "positive_duration")]
    pub ack_wait: Duration,
    /// How long a partition stays pinned to an applier that stopped pulling, before another one takes it over.
    #[serde(with = "positive_duration")]
    pub pin_timeout: Duration,
    /// An applier that has not renewed its membership for this long counts as gone, and its partitions are dealt
    /// to the others. With `pin_timeout` and `ack_wait`, this bounds the failover time.
    #[serde(with = "positive_duration")]
    pub member_ttl: Duration,
    /// A permanently failing event (a constraint or trigger rejects it, an unreadable payload) goes to the dead
    /// letter after this many attempts.
    pub dead_letter_after: NonZeroU32,
    /// An event failing with an error that usually passes (a statement or lock timeout, a serialization failure, a
    /// deadlock, a column changing under the applier) is retried at least this long (and `dead_letter_after` times)
    /// before it goes to the dead letter, so a partition never stalls forever on it.
    #[serde(with = "positive_duration")]
    pub give_up_after: Duration,
    /// First wait before retrying; doubles (with jitter) up to `retry_max`.
    #[serde(with = "positive_duration")]
    pub retry_initial: Duration,
    /// Longest wait between retries. Database outages retry without limit.
    #[serde(with = "positive_duration")]
    pub retry_max: Duration,
    /// With `STRIPE_API_KEY`: which objects are read again from the API after their events (`ambiguous`: rows a
    /// bare same-second tie decided, events at another API version than `stripe.api_version`, lists Stripe cut
    /// short; `always`: every object an event touched; `never`).
    pub hydrate: crate::hydrate::Mode,
    /// How long after the newest event asking for it an object is read (a burst of events costs one read).
    #[serde(with = "positive_duration")]
    pub hydrate_settle: Duration,
}

/// Stripe's API, for the API side.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StripeSettings {
    /// `STRIPE_API_KEY`: a secret key (`sk_...`) or a restricted key with read access (`rk_...`). Never logged.
    pub api_key: Option<SecretString>,
    /// `STRIPE_API_BASE`: where the API is.
    pub api_base: String,
    /// The API version every request is pinned to (`Stripe-Version`): the one the tables' columns follow.
    pub api_version: String,
    /// Requests per second with a live key (Stripe allows 100 per account; calls for connected accounts share it).
    pub live_requests_per_second: NonZeroU32,
    /// Requests per second with a test key (Stripe allows 25).
    pub test_requests_per_second: NonZeroU32,
    /// Requests per second to one endpoint (Stripe allows 25).
    pub endpoint_requests_per_second: NonZeroU32,
    /// Attempts per request before giving up (429s, 5xx, connection errors, garbage).
    pub max_attempts: NonZeroU32,
    /// Longest pause between two attempts of one request: the pauses double from 0.5 s up to this.
    #[serde(with = "positive_duration")]
    pub retry_max_wait: Duration,
    /// Longest a request may take.
    #[serde(with = "positive_duration")]
    pub request_timeout: Duration,
    /// Object types a backfill lists at once.
    pub types_in_parallel: NonZeroUsize,
    /// `created` ranges of one type a backfill lists at once.
    pub ranges_per_type: NonZeroUsize,
}

impl Default for StripeSettings {
    fn default() -> Self {
        Self {
            api_key: None,
            api_base: "https://api.stripe.com".into(),
            api_version: "2026-07-29.dahlia".into(),
            live_requests_per_second: NonZeroU32::new(80).unwrap_or(NonZeroU32::MIN),
            test_requests_per_second: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            endpoint_requests_per_second: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            max_attempts: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
            retry_max_wait: Duration::from_secs(20),
            request_timeout: Duration::from_secs(30),
            types_in_parallel: NonZeroUsize::new(8).unwrap_or(NonZeroUsize::MIN),
            ranges_per_type: NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

/// The shortest `history.retention`.
const MIN_RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// History (docs/history.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistorySettings {
    /// Versions older than this (at least 30 days) are pruned from `stripe.events` (each row keeps its last version
    /// before it), every hour, by one applier at a time; unset (the default): history is kept forever.
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
}

/// Reconciling: walking Stripe's lists, comparing them with the tables, fixing what differs (needs `STRIPE_API_KEY`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileSettings {
    /// How often every applier-side reconcile runs (one applier at a time); unset (the default): only when an
    /// operator runs `stripe-sync-applier reconcile`.
    #[serde(with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// The share of the API budget (`stripe.*_requests_per_second`) a reconcile uses, so webhooks' hydration and
    /// operators' backfills keep the rest.
    pub share: f64,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        Self {
            interval: None,
            share: 0.1,
        }
    }
}

/// The admin listener: backfills and syncs over HTTP. Off unless a token is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// `STRIPE_SYNC_ADMIN_TOKEN`: the bearer token every request must carry; unset, the listener is off.
    pub token: Option<SecretString>,
    /// Address to bind.
    pub host: String,
    /// Port (never the webhook port: ingest serves webhooks, the applier this).
    pub port: u16,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            token: None,
            host: "0.0.0.0".into(),
            port: 9470,
        }
    }
}

impl Default for ApplierSettings {
    fn default() -> Self {
        Self {
            account_id: "platform".into(),
            consumer_prefix: "stripe-sync-applier".into(),
            batch_size: NonZeroUsize::new(500).unwrap_or(NonZeroUsize::MIN),
            batch_wait: Duration::from_millis(10),
            ack_wait: Duration::from_secs(10),
            pin_timeout: Duration::from_secs(6),
            member_ttl: Duration::from_secs(6),
            dead_letter_after: NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN),
            give_up_after: Duration::from_secs(600),
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            hydrate: crate::hydrate::Mode::Ambiguous,
            hydrate_settle: Duration::from_secs(2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(
            &pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn an_empty_api_key_is_no_key_and_the_metrics_port_is_read() {
        let settings = load(&[("STRIPE_API_KEY", ""), ("METRICS_PORT", "9999")]).unwrap();
        assert!(
            settings.stripe.api_key.is_none(),
            "compose passes an unset key as empty"
        );
        assert_eq!(settings.metrics.port, 9999);
        let keyed = load(&[("STRIPE_API_KEY", "rk_test_1")]).unwrap();
        assert!(keyed.stripe.api_key.is_some());
        assert_eq!(keyed.metrics.port, 9464, "the default");
    }

    #[test]
    fn settings_that_cannot_work_are_refused_at_start_naming_the_setting() {
        for (var, value) in [
            ("STRIPE_SYNC__APPLIER__ACK_WAIT", "0s"),
            ("STRIPE_SYNC__APPLIER__PIN_TIMEOUT", "0ms"),
            ("STRIPE_SYNC__APPLIER__BATCH_SIZE", "0"),
            ("STRIPE_SYNC__APPLIER__DEAD_LETTER_AFTER", "0"),
            ("STRIPE_SYNC__DATABASE__MAX_CONNECTIONS", "0"),
        ] {
            let err = load(&[(var, value)]).unwrap_err().to_string();
            let field = var.rsplit("__").next().unwrap().to_lowercase();
            assert!(err.contains(&field), "{var}={value}: {err}");
        }
        let err = load(&[
            ("STRIPE_SYNC__APPLIER__RETRY_INITIAL", "1m"),
            ("STRIPE_SYNC__APPLIER__RETRY_MAX", "1s"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("retry_initial"), "{err}");
        assert!(load(&[("STRIPE_SYNC__APPLIER__ACK_WAIT", "1s")]).is_ok());
        let err = load(&[("STRIPE_SYNC__HISTORY__RETENTION", "7d")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("history.retention (7 days)"), "{err}");
        let kept = load(&[("STRIPE_SYNC__HISTORY__RETENTION", "400d")]).unwrap();
        assert_eq!(
            kept.history.retention,
            Some(Duration::from_secs(400 * 86_400))
        );
    }
}
