//! Settings shared by both binaries and the one loader they use: defaults → optional file → environment.
//!
//! Environment variables: `STRIPE_SYNC__<SECTION>__<FIELD>` (e.g. `STRIPE_SYNC__STREAM__MAX_AGE=7d`) for every
//! field, plus the plain names operators already use (`DATABASE_URL`, `NATS_URL`, ...), mapped by each binary.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use config::{Config, Environment, File};
use secrecy::SecretString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// Prefix of the structured environment variables: `STRIPE_SYNC__STREAM__NAME`.
pub const ENV_PREFIX: &str = "STRIPE_SYNC";
/// Separator between prefix, section and field in structured environment variables.
pub const ENV_SEPARATOR: &str = "__";
/// Environment variable naming an optional settings file (TOML).
pub const CONFIG_FILE_ENV: &str = "STRIPE_SYNC_CONFIG";

/// A plain environment variable name operators already use, and the settings key it fills.
#[derive(Debug, Clone, Copy)]
pub struct PlainEnv {
    /// The variable, e.g. `DATABASE_URL`.
    pub var: &'static str,
    /// The dotted settings key it sets, e.g. `database.url`.
    pub key: &'static str,
}

/// Plain names both binaries honour.
pub const SHARED_PLAIN_ENV: &[PlainEnv] = &[
    PlainEnv {
        var: "NATS_URL",
        key: "nats.url",
    },
    PlainEnv {
        var: "RUST_LOG",
        key: "telemetry.filter",
    },
    PlainEnv {
        var: "METRICS_PORT",
        key: "metrics.port",
    },
    PlainEnv {
        var: "OTEL_EXPORTER_OTLP_ENDPOINT",
        key: "telemetry.otlp_endpoint",
    },
    PlainEnv {
        var: "OTEL_SERVICE_NAME",
        key: "telemetry.service_name",
    },
];

/// Builds a settings struct from an environment map (the process's, or a test's) and an optional file.
///
/// Layers, lowest first: the struct's serde defaults, the file, the plain names, the `STRIPE_SYNC__` variables.
/// Unknown `STRIPE_SYNC__` fields are an error (settings structs deny unknown fields), so a typo does not pass
/// silently.
pub fn load<T: DeserializeOwned>(
    env: &HashMap<String, String>,
    plain: &[PlainEnv],
) -> Result<T, config::ConfigError> {
    let mut builder = Config::builder();
    if let Some(path) = env.get(CONFIG_FILE_ENV).filter(|p| !p.is_empty()) {
        builder = builder.add_source(File::from(PathBuf::from(path)).required(true));
    }
    let plain_values: config::Map<String, String> = SHARED_PLAIN_ENV
        .iter()
        .chain(plain)
        .filter_map(|p| {
            let value = env.get(p.var).filter(|v| !v.is_empty())?;
            Some((p.key.replace('.', ENV_SEPARATOR), value.clone()))
        })
        .collect();
    builder = builder.add_source(
        Environment::default()
            .separator(ENV_SEPARATOR)
            .source(Some(plain_values)),
    );
    let prefixed: config::Map<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    builder = builder.add_source(
        Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
            .source(Some(prefixed)),
    );
    builder.build()?.try_deserialize()
}

/// Loads settings from the process environment.
pub fn load_from_process_env<T: DeserializeOwned>(
    plain: &[PlainEnv],
) -> Result<T, config::ConfigError> {
    load(&std::env::vars().collect(), plain)
}

/// Connection to NATS.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated (`NATS_URL`). May carry credentials, so it is kept secret.
    pub url: SecretString,
    /// Optional NATS credentials file (JWT + nkey), for secured deployments. A user and password (or a token) may
    /// instead be given in the URL: `nats://user:password@host:4222`.
    pub credentials_file: Option<PathBuf>,
    /// Insist on TLS even when the server does not ask for it (a `tls://` URL does the same).
    pub tls_required: bool,
    /// PEM file of the CA(s) that signed the servers' certificates, when not a public CA (e.g. a private CA).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM certificate for mutual TLS, when the servers verify clients (with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// How long one request to JetStream (stream and consumer management, acks that wait) may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("nats://127.0.0.1:4222"),
            credentials_file: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// The JetStream stream that carries Stripe events, and its dead-letter companion.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSettings {
    /// Stream name.
    pub name: String,
    /// First subject token: events go to `<prefix>.events.<partition>.<event type>`, dead letters to
    /// `<prefix>.dlq.<event type>`.
    pub subject_prefix: String,
    /// Number of partitions, fixed when the stream is created (kept in the stream's metadata; the stream's value
    /// wins over this setting afterwards). Events of one object always go to the same partition.
    pub partitions: NonZeroU32,
    /// How long events stay in the stream, and so how far back `replay` can go.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Upper bound of the stream's size in bytes; -1 = no bound. When the stream is full, new events are refused
    /// (ingest answers 503 and Stripe retries) rather than unapplied ones dropped.
    pub max_bytes: i64,
    /// JetStream's own duplicate window on `Nats-Msg-Id` (the event id). The database dedupes forever.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Stream replicas (1 for a single server, 3 for a cluster).
    pub replicas: usize,
    /// Name of the dead-letter stream.
    pub dlq_name: String,
    /// How long dead letters are kept.
    #[serde(with = "humantime_serde")]
    pub dlq_max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            name: "STRIPE_EVENTS".into(),
            subject_prefix: "stripe".into(),
            partitions: NonZeroU32::new(16).unwrap_or(NonZeroU32::MIN),
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_bytes: -1,
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            dlq_name: "STRIPE_EVENTS_DLQ".into(),
            dlq_max_age: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// The metrics listener: `GET /metrics` (Prometheus), and on the applier `/healthz` and `/readyz` too.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address to bind.
    pub host: String,
    /// Port (`METRICS_PORT`); 0 picks a free one.
    pub port: u16,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 9464,
        }
    }
}

/// How a process logs and traces.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `auto` (pretty on a terminal, JSON otherwise), `json` or `pretty`.
    pub format: LogFormat,
    /// Log filter in `tracing` syntax (`RUST_LOG`), e.g. `info,stripe_sync_applier=debug`.
    pub filter: String,
    /// OTLP/HTTP endpoint for traces (`OTEL_EXPORTER_OTLP_ENDPOINT`, e.g. `http://collector:4318`); none = no export.
    pub otlp_endpoint: Option<String>,
    /// Service name in traces (`OTEL_SERVICE_NAME`); each binary has its own default.
    pub service_name: Option<String>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            filter: "info".into(),
            otlp_endpoint: None,
            service_name: None,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Pretty when stdout is a terminal, JSON otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Durations that must be more than zero (a zero `ack_wait` or pin timeout can't work): `#[serde(with =
/// "positive_duration")]`, written like any duration (`500ms`, `30s`, `5m`).
pub mod positive_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de::Error};

    /// Reads a humantime duration and refuses zero.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let value = humantime_serde::Serde::<Duration>::deserialize(d)?.into_inner();
        if value.is_zero() {
            return Err(D::Error::custom("must be more than 0 (e.g. 500ms, 10s)"));
        }
        Ok(value)
    }

    /// Writes a duration the way it is read.
    pub fn serialize<S: serde::Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(value, s)
    }
}

/// Deserializes a list given either as a sequence (file) or as one comma-separated string (environment).
pub fn comma_separated<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: From<String>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(s) => s.split(',').map(str::to_owned).collect(),
        OneOrMany::Many(v) => v,
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .map(T::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[derive(Debug, Deserialize, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Probe {
        nats: NatsSettings,
        stream: StreamSettings,
        telemetry: TelemetrySettings,
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let s: Probe = load(&env(&[]), &[]).unwrap();
        assert_eq!(s.nats.url.expose_secret(), "nats://127.0.0.1:4222");
        assert_eq!(s.stream.name, "STRIPE_EVENTS");
        assert_eq!(s.stream.max_age, Duration::from_secs(30 * 24 * 3600));
    }

    #[test]
    fn plain_names_work_and_prefixed_variables_win() {
        let s: Probe = load(
            &env(&[
                ("NATS_URL", "nats://plain:4222"),
                ("STRIPE_SYNC__STREAM__MAX_AGE", "7d"),
                ("STRIPE_SYNC__STREAM__PARTITIONS", "4"),
                ("RUST_LOG", "debug"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(s.nats.url.expose_secret(), "nats://plain:4222");
        assert_eq!(s.stream.max_age, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(s.stream.partitions.get(), 4);
        assert_eq!(s.telemetry.filter, "debug");

        let s: Probe = load(
            &env(&[
                ("NATS_URL", "nats://plain:4222"),
                ("STRIPE_SYNC__NATS__URL", "nats://prefixed:4222"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(s.nats.url.expose_secret(), "nats://prefixed:4222");
    }

    #[test]
    fn zero_partitions_and_zero_durations_are_refused_with_the_setting_named() {
        let err =
            load::<Probe>(&env(&[("STRIPE_SYNC__STREAM__PARTITIONS", "0")]), &[]).unwrap_err();
        assert!(err.to_string().contains("partitions"), "{err}");

        #[derive(Debug, Deserialize)]
        struct Timeouts {
            #[serde(with = "positive_duration")]
            #[allow(dead_code)]
            wait: Duration,
        }
        let err = serde_json::from_str::<Timeouts>(r#"{"wait": "0s"}"#).unwrap_err();
        assert!(err.to_string().contains("more than 0"), "{err}");
        assert!(serde_json::from_str::<Timeouts>(r#"{"wait": "1ms"}"#).is_ok());
    }

    #[test]
    fn a_misspelt_variable_is_an_error_not_silence() {
        let err = load::<Probe>(&env(&[("STRIPE_SYNC__STREAM__MAXAGE", "7d")]), &[]).unwrap_err();
        assert!(err.to_string().contains("maxage"), "{err}");
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let s: Probe = load(&env(&[("NATS_URL", "nats://user:hunter2@host:4222")]), &[]).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn a_file_layer_sits_between_defaults_and_environment() {
        let dir = std::env::temp_dir().join(format!("stripe-sync-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.toml");
        std::fs::write(
            &path,
            "[stream]\nname = \"FROM_FILE\"\nsubject_prefix = \"file\"\n",
        )
        .unwrap();
        let s: Probe = load(
            &env(&[
                (CONFIG_FILE_ENV, path.to_str().unwrap()),
                ("STRIPE_SYNC__STREAM__NAME", "FROM_ENV"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(s.stream.name, "FROM_ENV");
        assert_eq!(s.stream.subject_prefix, "file");
    }
}
