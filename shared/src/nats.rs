//! Connecting to NATS and making sure the events stream and the dead-letter stream exist, as both binaries need.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, ErrorCode, context::GetStreamErrorKind, stream};
use async_nats::{Client, ConnectOptions, ServerAddr};
use secrecy::ExposeSecret;

use crate::settings::{NatsSettings, StreamSettings};
use crate::subjects::{METADATA_PARTITIONS, Topology};

/// Oldest NATS server we run against: pinned-client priority groups arrived in 2.11 (and stream metadata in 2.10).
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 11);

/// Connects to NATS. With `wait_for_server` false the call returns at once and the client connects (and later
/// reconnects) in the background, so a process can start, and stay up, while NATS is away.
pub async fn connect(
    settings: &NatsSettings,
    name: &str,
    wait_for_server: bool,
) -> anyhow::Result<Client> {
    let mut options = match &settings.credentials_file {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .with_context(|| format!("reading NATS credentials file {}", path.display()))?,
        None => ConnectOptions::new(),
    };
    options = options
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(settings.request_timeout))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempt| {
            Duration::from_millis((100u64 << attempt.min(5)).min(2_000))
        })
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("disconnected from NATS, reconnecting")
                }
                other => tracing::info!(event = %other, "NATS client event"),
            }
        });
    if !wait_for_server {
        options = options.retry_on_initial_connect();
    }
    let url = settings.url.expose_secret();
    let servers = servers(url)?;
    if let Some((user, password)) = servers.iter().find_map(credentials_of) {
        options = match password {
            Some(password) => options.user_and_password(user, password),
            None => options.token(user),
        };
    }
    // The client logs server addresses: they go on without the credentials.
    let servers = servers
        .into_iter()
        .map(without_credentials)
        .collect::<anyhow::Result<Vec<_>>>()?;
    options = with_tls(options, settings)?;
    options
        .connect(servers)
        .await
        .with_context(|| format!("connecting to NATS at {}", redact_url(url)))
}

/// The servers of a comma-separated `NATS_URL` (`nats://a:4222,nats://b:4222`); the client tries them in turn
/// and reconnects to whichever is up.
fn servers(url: &str) -> anyhow::Result<Vec<ServerAddr>> {
    let servers = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<ServerAddr>()
                .map_err(|e| anyhow::anyhow!("NATS URL {} is not valid: {e}", redact_url(u)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!servers.is_empty(), "NATS_URL names no server");
    Ok(servers)
}

/// The user and password (or the token: a user without a password) a server URL carries. The client does not
/// read them from the URL itself.
fn credentials_of(server: &ServerAddr) -> Option<(String, Option<String>)> {
    let user = server.username().filter(|u| !u.is_empty())?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    Some((decode(user), server.password().map(decode)))
}

fn without_credentials(server: ServerAddr) -> anyhow::Result<ServerAddr> {
    let mut url = server.into_inner();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    ServerAddr::from_url(url).context("a NATS URL without its credentials")
}

/// Picks the TLS backend of every TLS connection the process makes (NATS, Postgres): two are linked in (ring and
/// aws-lc-rs, through different clients), and rustls refuses to guess. Call it before connecting; later calls do
/// nothing.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// TLS for the connection: required when asked (or by a `tls://` URL, or by the server), verified against the
/// private CA when one is given, with a client certificate when the servers verify clients.
fn with_tls(
    mut options: ConnectOptions,
    settings: &NatsSettings,
) -> anyhow::Result<ConnectOptions> {
    // Also when the settings ask for nothing: a server may require TLS on its own.
    install_tls_provider();
    if settings.tls_required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &settings.tls_ca_file {
        anyhow::ensure!(
            ca.is_file(),
            "NATS TLS CA file {} does not exist",
            ca.display()
        );
        options = options.add_root_certificates(ca.clone());
    }
    match (&settings.tls_cert_file, &settings.tls_key_file) {
        (Some(cert), Some(key)) => {
            for file in [cert, key] {
                anyhow::ensure!(
                    file.is_file(),
                    "NATS TLS file {} does not exist",
                    file.display()
                );
            }
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        (None, None) => {}
        _ => anyhow::bail!(
            "NATS mutual TLS needs both nats.tls_cert_file and nats.tls_key_file (STRIPE_SYNC__NATS__TLS_CERT_FILE, \
             STRIPE_SYNC__NATS__TLS_KEY_FILE)"
        ),
    }
    Ok(options)
}

/// Why the stream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Retrying can't help: the server is too old, or the stream exists with another shape.
    #[error("{0}")]
    Incompatible(String),
    /// NATS is unreachable or failed the request; retrying may help.
    #[error(transparent)]
    Nats(#[from] anyhow::Error),
}

/// Refuses servers older than [`MIN_SERVER_VERSION`]: older ones accept but silently ignore settings we rely on.
pub fn check_server_version(client: &Client) -> Result<(), SetupError> {
    let info = client.server_info();
    let version = parse_version(&info.version);
    if version < MIN_SERVER_VERSION {
        return Err(SetupError::Incompatible(format!(
            "NATS server {} is too old: stripe-sync needs {}.{} or newer (pinned-client priority groups arrived in \
             2.11; older servers accept the consumer settings and silently ignore them, so two appliers could work \
             one partition at once). Upgrade the server (e.g. image nats:2.11).",
            info.version, MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1
        )));
    }
    Ok(())
}

fn parse_version(version: &str) -> (u64, u64) {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Stream config the settings ask for (partition count only matters when the stream is created).
fn events_stream_config(settings: &StreamSettings) -> stream::Config {
    let topology = Topology {
        prefix: settings.subject_prefix.clone(),
        partitions: settings.partitions.get(),
    };
    stream::Config {
        name: settings.name.clone(),
        description: Some("Stripe webhook events, as received (stripe-sync)".into()),
        subjects: vec![topology.events_wildcard()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        // With `max_bytes` set, a full stream refuses new events (ingest answers 503, Stripe retries) instead of
        // dropping the oldest ones, which may not be applied yet. `max_age` removes old events either way.
        discard: stream::DiscardPolicy::New,
        max_age: settings.max_age,
        max_bytes: settings.max_bytes,
        duplicate_window: settings.duplicate_window,
        num_replicas: settings.replicas,
        allow_direct: true,
        metadata: HashMap::from([(
            METADATA_PARTITIONS.to_owned(),
            topology.partitions.to_string(),
        )]),
        ..Default::default()
    }
}

/// Makes sure the events stream exists, creating it when missing, and returns the topology it was created with.
///
/// With `apply_retention` the stream's retention (age, size, duplicate window) is brought to the settings' values
/// when they differ; only the writer (ingest) does that, so two processes with different settings can't fight.
pub async fn ensure_events_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
    apply_retention: bool,
) -> Result<Topology, SetupError> {
    check_server_version(&js.client())?;
    let wanted = events_stream_config(settings);
    let info = match js.get_stream(&settings.name).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .context("reading the events stream's info")?
                .config
                .clone();
            let differs = info.max_age != wanted.max_age
                || info.max_bytes != wanted.max_bytes
                || info.duplicate_window != wanted.duplicate_window
                || info.discard != wanted.discard;
            if apply_retention && differs {
                tracing::info!(stream = %settings.name, "updating the events stream's retention to the settings");
                let mut updated = info.clone();
                updated.max_age = wanted.max_age;
                updated.max_bytes = wanted.max_bytes;
                updated.duplicate_window = wanted.duplicate_window;
                updated.discard = wanted.discard;
                js.update_stream(updated)
                    .await
                    .context("updating the events stream's retention")?;
            }
            info
        }
        Err(err) if is_stream_not_found(err.kind()) => {
            tracing::info!(stream = %settings.name, partitions = settings.partitions.get(), "creating the events stream");
            match js.create_stream(wanted.clone()).await {
                Ok(_) => wanted,
                // Another process may have created it between our lookup and our create: take theirs. Otherwise
                // the create's own error (e.g. subjects overlapping another stream's) is the one to report.
                Err(create_err) => match js.get_stream(&settings.name).await {
                    Ok(stream) => stream.cached_info().config.clone(),
                    Err(_) => {
                        return Err(SetupError::Incompatible(format!(
                            "cannot create stream {} on subjects {:?}: {create_err}",
                            settings.name, wanted.subjects
                        )));
                    }
                },
            }
        }
        Err(err) => {
            return Err(anyhow::Error::new(err)
                .context("looking up the events stream")
                .into());
        }
    };
    topology_of(&info, settings)
}

/// Reads the topology (prefix and partition count) a stream was created with.
pub fn topology_of(
    config: &stream::Config,
    settings: &StreamSettings,
) -> Result<Topology, SetupError> {
    let partitions = config
        .metadata
        .get(METADATA_PARTITIONS)
        .and_then(|p| p.parse::<std::num::NonZeroU32>().ok())
        .map(std::num::NonZeroU32::get)
        .ok_or_else(|| {
            SetupError::Incompatible(format!(
                "stream {} has no numeric `{METADATA_PARTITIONS}` metadata: it was not created by stripe-sync, or by \
                 a NATS server older than 2.10 that dropped the metadata",
                config.name
            ))
        })?;
    let topology = Topology {
        prefix: settings.subject_prefix.clone(),
        partitions,
    };
    if !config.subjects.contains(&topology.events_wildcard()) {
        return Err(SetupError::Incompatible(format!(
            "stream {} carries subjects {:?}, not {}: the subject prefix setting does not match the stream",
            config.name,
            config.subjects,
            topology.events_wildcard()
        )));
    }
    if partitions != settings.partitions.get() {
        tracing::warn!(
            stream = %config.name,
            stream_partitions = partitions,
            setting_partitions = settings.partitions.get(),
            "the partition count is fixed when the stream is created; using the stream's"
        );
    }
    Ok(topology)
}

/// Makes sure the dead-letter stream exists.
pub async fn ensure_dlq_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> anyhow::Result<stream::Stream> {
    let topology = Topology {
        prefix: settings.subject_prefix.clone(),
        partitions: 1,
    };
    js.get_or_create_stream(stream::Config {
        name: settings.dlq_name.clone(),
        description: Some(
            "Stripe events the applier could not apply (stripe-sync dead letter)".into(),
        ),
        subjects: vec![topology.dlq_wildcard()],
        storage: stream::StorageType::File,
        max_age: settings.dlq_max_age,
        num_replicas: settings.replicas,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .context("creating the dead-letter stream")
}

/// True when a stream lookup failed because the stream does not exist.
#[must_use]
pub fn is_stream_not_found(kind: GetStreamErrorKind) -> bool {
    matches!(kind, GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// A URL with any `user:password@` removed, for logs (with or without a scheme).
#[must_use]
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |scheme| scheme + 3);
    match url.rfind('@') {
        Some(at) if at >= start => format!("{}[redacted]@{}", &url[..start], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_major_and_minor() {
        assert!(parse_version("2.9.10") < MIN_SERVER_VERSION);
        assert!(parse_version("v2.11.0") >= MIN_SERVER_VERSION);
        assert!(parse_version("2.15.1-beta") >= MIN_SERVER_VERSION);
        assert!(parse_version("garbage") < MIN_SERVER_VERSION);
    }

    #[test]
    fn a_nats_url_names_one_server_or_several_with_their_credentials() {
        let list = servers(" nats://a:4222, nats://b:4222 ,tls://c:4443,").unwrap();
        assert_eq!(list.len(), 3);
        assert!(list[2].tls_required());
        let user = servers("nats://ingest:p%40ss%2Fw@host:4222").unwrap();
        assert_eq!(
            credentials_of(&user[0]),
            Some(("ingest".into(), Some("p@ss/w".into())))
        );
        let token = servers("nats://s3cret@host:4222").unwrap();
        assert_eq!(credentials_of(&token[0]), Some(("s3cret".into(), None)));
        assert_eq!(credentials_of(&list[0]), None);
        let bad = servers("nats://user:pw@host:notaport")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("[redacted]") && !bad.contains("pw"), "{bad}");
        assert!(servers(" , ").is_err());
    }

    #[test]
    fn credentials_are_removed_from_urls_in_logs() {
        assert_eq!(
            redact_url("nats://u:p@host:4222"),
            "nats://[redacted]@host:4222"
        );
        assert_eq!(
            redact_url("postgres://u:p@h/db"),
            "postgres://[redacted]@h/db"
        );
        assert_eq!(redact_url("nats://host:4222"), "nats://host:4222");
        assert_eq!(redact_url("user:pw@host:4222"), "[redacted]@host:4222");
        let stripped =
            without_credentials(servers("nats://u:p@host:4222").unwrap().remove(0)).unwrap();
        assert_eq!(stripped.as_url_str(), "nats://host:4222");
    }
}
