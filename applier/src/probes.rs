//! The applier's small HTTP listener (`metrics.port`, `METRICS_PORT`, 9464 by default): `GET /metrics` for
//! Prometheus, `GET /healthz` (the process is up) and `GET /readyz` (NATS connected and Postgres answering) for
//! probes. Never the admin port: this one carries no secrets and needs no token.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;
use sqlx::PgPool;

#[derive(Debug, Clone)]
struct Probes {
    client: async_nats::Client,
    pool: PgPool,
}

/// The listener's routes.
pub fn router(client: async_nats::Client, pool: &PgPool) -> Router {
    // A connection of its own: the workers may hold every connection of theirs, and a busy applier is still ready.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with((*pool.connect_options()).clone());
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Probes { client, pool })
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

async fn readyz(State(probes): State<Probes>) -> (StatusCode, &'static str) {
    if probes.client.connection_state() != async_nats::connection::State::Connected {
        return (StatusCode::SERVICE_UNAVAILABLE, "NATS not connected");
    }
    let database = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("select 1").execute(&probes.pool),
    )
    .await;
    match database {
        Ok(Ok(_)) => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "Postgres not answering"),
    }
}
