//! Ingest settings: HTTP listener, webhook endpoints and their secrets, publishing, plus the shared sections.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use stripe_sync_shared::settings::{
    self, MetricsSettings, NatsSettings, PlainEnv, StreamSettings, TelemetrySettings,
    comma_separated,
};

/// Plain environment names ingest honours, besides the shared ones.
pub const PLAIN_ENV: &[PlainEnv] = &[
    PlainEnv {
        var: "PORT",
        key: "http.port",
    },
    PlainEnv {
        var: "STRIPE_WEBHOOK_SECRET",
        key: "webhook.secrets",
    },
    PlainEnv {
        var: "STRIPE_CONNECT_WEBHOOK_SECRET",
        key: "webhook.endpoints.connect.secrets",
    },
    PlainEnv {
        var: "STRIPE_THIN_WEBHOOK_SECRET",
        key: "webhook.endpoints.thin.secrets",
    },
];

/// Everything `stripe-sync-ingest` reads at start.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// HTTP listener.
    pub http: HttpSettings,
    /// Webhook verification.
    pub webhook: WebhookSettings,
    /// The metrics listener (`METRICS_PORT`).
    pub metrics: MetricsSettings,
    /// NATS connection.
    pub nats: NatsSettings,
    /// Events stream.
    pub stream: StreamSettings,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
    /// The applier's sections, accepted and ignored so both binaries can share one environment or file.
    pub database: serde::de::IgnoredAny,
    /// See `database`.
    pub applier: serde::de::IgnoredAny,
    /// See `database`.
    pub stripe: serde::de::IgnoredAny,
    /// See `database`.
    pub admin: serde::de::IgnoredAny,
    /// See `database`.
    pub reconcile: serde::de::IgnoredAny,
    /// See `database`.
    pub history: serde::de::IgnoredAny,
}

impl Settings {
    /// Loads settings from the process environment (and the file it names, if any).
    pub fn load() -> Result<Self, stripe_sync_shared::ConfigError> {
        settings::load_from_process_env(PLAIN_ENV)
    }

    /// Loads settings from a given environment map (tests, the compose-file check).
    pub fn load_from(
        env: &std::collections::HashMap<String, String>,
    ) -> Result<Self, stripe_sync_shared::ConfigError> {
        settings::load(env, PLAIN_ENV)
    }
}

/// The HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address to bind.
    pub host: String,
    /// Port to bind (`PORT`); 0 picks a free one.
    pub port: u16,
    /// Largest accepted webhook body in bytes; larger gets 413. Must fit in NATS's `max_payload` (ingest lowers it
    /// to fit, with a warning).
    pub body_limit: usize,
    /// On shutdown, how long in-flight requests may take before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Most webhook requests handled at once; past it a request gets 503 at once (Stripe retries it) rather than
    /// queueing behind the others while memory grows.
    pub max_in_flight: std::num::NonZeroUsize,
    /// How long a client has to send a request's headers, counted from when ingest starts waiting for them: the
    /// accept, or on a kept-alive connection the previous answer (so it is also how long an idle connection stays
    /// open). Past it the connection is closed, so a client trickling its headers can't hold one forever. Behind a
    /// load balancer that keeps connections to ingest open, set it above the balancer's idle timeout.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a client has to send a request's body once its headers are in; past it the request gets 408 and
    /// nothing is published (Stripe retries). Bounds how long a slow client holds one of `max_in_flight`'s slots.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 8080,
            // Stripe's largest events (an invoice or subscription with every embedded list at its page size and
            // full metadata) stay well under 256 KiB; 1 MiB leaves room while bounding memory per request.
            body_limit: 1024 * 1024,
            shutdown_timeout: Duration::from_secs(30),
            max_in_flight: std::num::NonZeroUsize::new(1024).unwrap_or(std::num::NonZeroUsize::MIN),
            // Stripe sends a webhook's headers in one go; 10 s is ample for a slow network yet frees a stalled
            // connection quickly.
            header_read_timeout: Duration::from_secs(10),
            // The largest body (`body_limit`, 1 MiB) still arrives at 35 KiB/s; Stripe's bodies are far smaller.
            body_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Webhook verification and publishing.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// Signing secrets of the endpoint served at `POST /webhooks` (`STRIPE_WEBHOOK_SECRET`, comma-separated while a
    /// secret is rolled).
    #[serde(deserialize_with = "comma_separated")]
    pub secrets: Vec<SecretString>,
    /// More endpoints, each served at `POST /webhooks/<name>` with its own secrets, e.g. `connect` for Stripe
    /// Connect events (`STRIPE_CONNECT_WEBHOOK_SECRET`) and `thin` for an event destination sending thin events
    /// (`STRIPE_THIN_WEBHOOK_SECRET`; any endpoint accepts both payload styles, each verified with its own secrets).
    pub endpoints: BTreeMap<String, EndpointSettings>,
    /// Largest accepted difference between the signature's timestamp and our clock.
    #[serde(with = "humantime_serde")]
    pub tolerance: Duration,
    /// How long a request waits for JetStream to acknowledge the event before answering 503.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            secrets: Vec::new(),
            endpoints: BTreeMap::new(),
            tolerance: Duration::from_secs(300),
            publish_timeout: Duration::from_secs(5),
        }
    }
}

/// One extra webhook endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointSettings {
    /// Its signing secrets, comma-separated.
    #[serde(deserialize_with = "comma_separated")]
    pub secrets: Vec<SecretString>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_accepts_the_applier_sections_so_both_can_share_one_environment() {
        let env: std::collections::HashMap<String, String> = [
            "DATABASE__MAX_CONNECTIONS",
            "APPLIER__BATCH_SIZE",
            "STRIPE__API_VERSION",
            "ADMIN__PORT",
            "RECONCILE__SHARE",
            "HISTORY__RETENTION",
        ]
        .into_iter()
        .map(|key| (format!("STRIPE_SYNC__{key}"), "1".to_owned()))
        .collect();
        assert!(Settings::load_from(&env).is_ok());
    }
}
