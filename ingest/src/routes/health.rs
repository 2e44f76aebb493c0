//! Liveness and readiness probes, and the metrics.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// Prometheus's scrape.
pub(super) async fn metrics() -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            stripe_sync_shared::metrics::CONTENT_TYPE,
        )],
        stripe_sync_shared::metrics::render(),
    )
}

/// The process is up.
pub(super) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// NATS is connected and the events stream exists: webhooks will be accepted.
pub(super) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.publisher.is_ready().await {
        (StatusCode::OK, Json(json!({ "status": "ready" })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({ "status": "not ready", "reason": "NATS not connected or events stream missing" }),
            ),
        )
    }
}
