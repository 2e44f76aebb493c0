//! The HTTP surface: `POST /webhooks[/<endpoint>]`, `GET /healthz`, `GET /readyz`; on the metrics port `GET
//! /metrics`.

mod health;
mod webhooks;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tower_http::timeout::RequestBodyDeadlineLayer;
use tower_http::trace::TraceLayer;

use crate::publish::Publisher;
use crate::signature::Verifier;

/// Name of the endpoint served at `POST /webhooks`.
pub const DEFAULT_ENDPOINT: &str = "default";

/// What handlers share.

#[derive(Debug, Clone)]
pub struct AppState {
    /// Verifier per endpoint name.
    pub endpoints: Arc<HashMap<String, Verifier>>,
    /// Publishes to JetStream.
    pub publisher: Publisher,
    /// Largest accepted body.
    pub body_limit: usize,
    /// How long a body may take to arrive once the headers are in (`http.body_read_timeout`).
    pub body_read_timeout: std::time::Duration,
    /// One permit per webhook request in flight (`http.max_in_flight`).
    pub in_flight: Arc<tokio::sync::Semaphore>,
}

/// The metrics listener's router: `GET /metrics` (its own port, never the webhook port).
pub fn metrics_router() -> Router {
    Router::new().route("/metrics", get(health::metrics))
}

/// The application's router.
pub fn router(state: AppState) -> Router {
    let body_limit = state.body_limit;
    let body_read_timeout = state.body_read_timeout;
    let webhooks = Router::new()
        .route("/webhooks", post(webhooks::receive_default))
        .route("/webhooks/{endpoint}", post(webhooks::receive_named))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            webhooks::at_most_in_flight,
        ));
    Router::new()
        .merge(webhooks)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .layer(DefaultBodyLimit::max(body_limit))
        // One deadline for the whole body, not per chunk: a client trickling a byte at a time still runs out.
        .layer(RequestBodyDeadlineLayer::new(body_read_timeout))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
