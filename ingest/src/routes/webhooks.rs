//! `POST /webhooks`: verify the signature over the raw bytes, read the event head, publish, answer after the ack.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use serde_json::{Value, json};
use stripe_sync_shared::event_head::RoutingHead;
use stripe_sync_shared::metrics::names;
use stripe_sync_shared::payload;
use tower_http::timeout::TimeoutError;

use super::{AppState, DEFAULT_ENDPOINT};
use crate::error::ApiError;

const SIGNATURE_HEADER: &str = "stripe-signature";

/// `POST /webhooks`.
pub(super) async fn receive_default(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    receive(&state, DEFAULT_ENDPOINT, &headers, body).await
}

/// `POST /webhooks/<endpoint>`, for endpoints with their own secrets (e.g. Connect).
pub(super) async fn receive_named(
    State(state): State<AppState>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    receive(&state, &endpoint, &headers, body).await
}

/// Past `http.max_in_flight` webhook requests at once, a 503 at once: Stripe retries it later, and the requests in
/// flight finish instead of slowing down together.
pub(super) async fn at_most_in_flight(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    match state.in_flight.clone().try_acquire_owned() {
        Ok(_permit) => next.run(request).await,
        Err(_) => {
            metrics::counter!(names::WEBHOOKS, "endpoint" => "any", "outcome" => "busy")
                .increment(1);
            ApiError::Busy.into_response()
        }
    }
}

/// Counts every answer by endpoint (a name no endpoint has counts as `unknown`: the path is the caller's) and
/// outcome, and times it.
async fn receive(
    state: &AppState,
    endpoint: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let started = std::time::Instant::now();
    let answer = handle(state, endpoint, headers, body).await;
    let outcome = match &answer {
        Ok((_, true)) => "duplicate",
        Ok((_, false)) => "stored",
        Err(err) => err.status_and_code().1,
    };
    let endpoint = if state.endpoints.contains_key(endpoint) {
        endpoint.to_owned()
    } else {
        "unknown".to_owned()
    };
    metrics::counter!(names::WEBHOOKS, "endpoint" => endpoint, "outcome" => outcome).increment(1);
    metrics::histogram!(names::WEBHOOK_DURATION).record(started.elapsed().as_secs_f64());
    answer.map(|(json, _)| json)
}

#[tracing::instrument(
    name = "webhook",
    skip_all,
    fields(endpoint, event_id, event_type, stream_seq)
)]
async fn handle(
    state: &AppState,
    endpoint: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Json<Value>, bool), ApiError> {
    let span = tracing::Span::current();
    span.record("endpoint", endpoint);
    let verifier = state
        .endpoints
        .get(endpoint)
        .ok_or_else(|| ApiError::UnknownEndpoint(endpoint.to_owned()))?;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge {
            limit: state.body_limit,
        },
        _ if timed_out(&rejection) => ApiError::BodyTimeout {
            timeout: state.body_read_timeout,
        },
        _ => ApiError::BadBody,
    })?;

    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    let now = unix_now();
    verifier.verify(signature, &body, now)?;

    let head = RoutingHead::parse(&body)?;
    payload::check_created(head.created, now)?;
    payload::check_structure(&body)?;
    span.record("event_id", head.id.as_ref());
    span.record("event_type", head.event_type.as_ref());

    let ack = state
        .publisher
        .publish(&head, body.clone(), endpoint)
        .await?;
    span.record("stream_seq", ack.sequence);
    tracing::debug!(duplicate = ack.duplicate, "event stored");
    Ok((
        Json(json!({ "received": true, "id": head.id, "duplicate": ack.duplicate })),
        ack.duplicate,
    ))
}

/// The body failed because `http.body_read_timeout` passed (the deadline's error is somewhere in the chain).
fn timed_out(rejection: &BytesRejection) -> bool {
    let mut error: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(err) = error {
        if err.is::<TimeoutError>() {
            return true;
        }
        error = err.source();
    }
    false
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
