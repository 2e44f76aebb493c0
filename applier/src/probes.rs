//! The applier's small HTTP listener (`metrics.port`, `METRICS_PORT`, 9464 by default): `GET /metrics` for
//! Prometheus, `GET /healthz` (the process is up) and `GET /readyz` (NATS connected and Postgres answering) for
//! probes. Never the admin port: this one carries no secrets and needs no token.
//!
//! It listens from the first moment of startup, before Postgres and NATS are reached: a process waiting for its
//! dependencies is alive (`/healthz` 200, so Kubernetes does not restart it in a loop) and not ready (`/readyz`
//! 503 saying what it waits for).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;
use sqlx::PgPool;
use tokio::sync::watch;

use stripe_sync_shared::settings::MetricsSettings;

/// What `/readyz` checks, known once the applier has connected.
#[derive(Debug, Clone)]
struct Dependencies {
    client: async_nats::Client,
    pool: PgPool,
}

/// The listener, serving from [`Probes::start`] until dropped.
#[derive(Debug)]
pub struct Probes {
    port: u16,
    dependencies: Arc<OnceLock<Dependencies>>,
    /// Dropping it stops the listener.
    _stop: watch::Sender<()>,
}

impl Probes {
    /// Binds the listener and serves it in the background; `/readyz` answers 503 until [`Probes::ready`].
    pub async fn start(settings: &MetricsSettings) -> anyhow::Result<Self> {
        let address = format!("{}:{}", settings.host, settings.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("binding the metrics listener on {address}"))?;
        let port = listener.local_addr()?.port();
        let dependencies = Arc::new(OnceLock::new());
        let (stop, mut stopped) = watch::channel(());
        let router = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .with_state(dependencies.clone());
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    // Resolves when the sender is dropped.
                    while stopped.changed().await.is_ok() {}
                })
                .await;
            if let Err(err) = served {
                tracing::warn!(error = %err, "the metrics listener stopped");
            }
        });
        Ok(Self {
            port,
            dependencies,
            _stop: stop,
        })
    }

    /// The port it listens on.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on `/readyz` checks this NATS connection and this database.
    pub fn ready(&self, client: async_nats::Client, pool: &PgPool) {
        // A connection of its own: the workers may hold every connection of theirs, and a busy applier is still
        // ready.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with((*pool.connect_options()).clone());
        let _ = self.dependencies.set(Dependencies { client, pool });
    }
}

async fn metrics() -> ([(header::HeaderName, &'static str); 1], String) {
    (
        [(
            header::CONTENT_TYPE,
            stripe_sync_shared::metrics::CONTENT_TYPE,
        )],
        stripe_sync_shared::metrics::render(),
    )
}

async fn readyz(
    State(dependencies): State<Arc<OnceLock<Dependencies>>>,
) -> (StatusCode, &'static str) {
    let Some(dependencies) = dependencies.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: waiting for Postgres, NATS and the events stream",
        );
    };
    if dependencies.client.connection_state() != async_nats::connection::State::Connected {
        return (StatusCode::SERVICE_UNAVAILABLE, "NATS not connected");
    }
    let database = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("select 1").execute(&dependencies.pool),
    )
    .await;
    match database {
        Ok(Ok(_)) => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "Postgres not answering"),
    }
}
