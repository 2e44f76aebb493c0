//! The one error type of the HTTP API and its mapping to status codes and short JSON bodies.
//! Messages say what was wrong with the request; internals are logged, never echoed.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use stripe_sync_shared::event_head::HeadError;
use stripe_sync_shared::payload::Unstorable;

use crate::publish::PublishError;
use crate::signature::SignatureError;

/// Everything a webhook request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Signature missing, malformed, stale or wrong: 400.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// Correctly signed, but not a Stripe event: 400.
    #[error(transparent)]
    NotAnEvent(#[from] HeadError),
    /// A Stripe event, but not one that can be stored as it is (a key twice, a lone surrogate, a `created` out of
    /// range...): 400.
    #[error(transparent)]
    Unstorable(#[from] Unstorable),
    /// Body above the limit: 413.
    #[error("body is larger than the {limit}-byte limit")]
    PayloadTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The body did not arrive within `http.body_read_timeout`: 408.
    #[error("the request body did not arrive within {timeout:?}")]
    BodyTimeout {
        /// The configured timeout.
        timeout: std::time::Duration,
    },
    /// The body could not be read: 400.
    #[error("could not read the request body")]
    BadBody,
    /// No webhook endpoint with that name: 404.
    #[error("no webhook endpoint named {0:?}")]
    UnknownEndpoint(String),
    /// JetStream did not acknowledge the event: 503, so Stripe retries.
    #[error(transparent)]
    Unavailable(#[from] PublishError),
    /// More requests in flight than `http.max_in_flight`: 503, so Stripe retries.
    #[error("too many webhook requests at once")]
    Busy,
}

impl ApiError {
    /// The HTTP status and the short code the body (and the `outcome` of the webhooks metric) names.
    pub(crate) fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Signature(SignatureError::Missing) => {
                (StatusCode::BAD_REQUEST, "signature_missing")
            }
            Self::Signature(SignatureError::Malformed(_)) => {
                (StatusCode::BAD_REQUEST, "signature_malformed")
            }
            Self::Signature(SignatureError::Stale { .. }) => {
                (StatusCode::BAD_REQUEST, "signature_stale")
            }
            Self::Signature(SignatureError::Future { .. }) => {
                (StatusCode::BAD_REQUEST, "signature_future")
            }
            Self::Signature(SignatureError::Mismatch) => {
                (StatusCode::BAD_REQUEST, "signature_mismatch")
            }
            Self::NotAnEvent(HeadError::NotJson(_)) => (StatusCode::BAD_REQUEST, "body_not_json"),
            Self::NotAnEvent(HeadError::NotAnEvent(_)) => {
                (StatusCode::BAD_REQUEST, "body_not_an_event")
            }
            Self::Unstorable(Unstorable::Created { .. }) => {
                (StatusCode::BAD_REQUEST, "created_out_of_range")
            }
            Self::Unstorable(_) => (StatusCode::BAD_REQUEST, "body_unstorable"),
            Self::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            Self::BadBody => (StatusCode::BAD_REQUEST, "body_unreadable"),
            Self::UnknownEndpoint(_) => (StatusCode::NOT_FOUND, "unknown_endpoint"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable"),
            Self::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        // What went wrong with the request is the caller's to know; what went wrong inside (the broker's own
        // words) is logged only.
        let message = if status.is_server_error() {
            tracing::warn!(error = %self, code, "webhook not accepted; Stripe will retry");
            "the event could not be stored right now; retry later".to_owned()
        } else {
            tracing::info!(error = %self, code, "webhook refused");
            self.to_string()
        };
        let mut response =
            (status, Json(json!({ "error": code, "message": message }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}
