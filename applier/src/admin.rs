//! The admin listener: the original design's "initialize" and per-table "sync" endpoints, on their own port, only
//! when `STRIPE_SYNC_ADMIN_TOKEN` is set, every request carrying it as a bearer token (compared in constant time).
//!
//! - `POST /backfill` `{"objects": [...], "since": <unix>, "connected_accounts": bool, "restart": bool}` (all
//!   optional) starts a backfill; `POST /sync/<table>` `{"ids": [...], "account": "acct_..."}` re-reads a table or
//!   given objects. Both answer 202 with the job's id.
//! - `GET /jobs/<id>`: the job's state, progress (objects, objects/s, per type, ETA) and summary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::backfill::{Options, Progress};
use crate::settings::Settings;

/// A job started over HTTP.
#[derive(Debug)]
struct Job {
    kind: String,
    progress: Progress,
    outcome: Option<Result<String, String>>,
}

/// What the handlers share.
#[derive(Debug, Clone)]
struct Admin {
    settings: Arc<Settings>,
    token: SecretString,
    jobs: Arc<Mutex<BTreeMap<u64, Job>>>,
    next: Arc<AtomicU64>,
    /// The API client, stream and pool every job shares (one rate budget), made by the first job.
    context: Arc<tokio::sync::OnceCell<crate::backfill::Backfill>>,
}

/// The admin router, authenticating every request with `token`; jobs use `context` (the hydrator's: one rate
/// budget per process), or one made by the first job.
pub fn router(
    settings: Settings,
    token: SecretString,
    context: Option<crate::backfill::Backfill>,
) -> Router {
    let admin = Admin {
        settings: Arc::new(settings),
        token,
        jobs: Arc::default(),
        next: Arc::new(AtomicU64::new(1)),
        context: Arc::new(tokio::sync::OnceCell::new_with(context)),
    };
    Router::new()
        .route("/backfill", post(backfill))
        .route("/sync/{table}", post(sync))
        .route("/jobs/{id}", get(job))
        .layer(middleware::from_fn_with_state(admin.clone(), authenticate))
        .with_state(admin)
}

async fn authenticate(State(admin): State<Admin>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let expected = admin.token.expose_secret();
    // Digests of equal length compared in constant time: neither the token nor its length shows in the timing.
    let same = Sha256::digest(given.as_bytes()).ct_eq(&Sha256::digest(expected.as_bytes()));
    if bool::from(same) && !expected.is_empty() {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "unauthorized", "message": "a valid bearer token is required" })),
        )
            .into_response()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct BackfillRequest {
    objects: Vec<String>,
    since: i64,
    connected_accounts: bool,
    restart: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SyncRequest {
    ids: Vec<String>,
    account: Option<String>,
}

impl Admin {
    /// Starts `work` as a job; answers 202 with its id.
    fn start<F, Fut>(&self, kind: String, work: F) -> Response
    where
        F: FnOnce(crate::backfill::Backfill) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<String>> + Send,
    {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let progress = Progress::default();
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.insert(
                id,
                Job {
                    kind,
                    progress: progress.clone(),
                    outcome: None,
                },
            );
        }
        let (settings, jobs, context) = (
            self.settings.clone(),
            self.jobs.clone(),
            self.context.clone(),
        );
        tokio::spawn(async move {
            let outcome = async {
                let mut backfill = context
                    .get_or_try_init(|| crate::commands::backfill_context(&settings))
                    .await?
                    .clone();
                backfill.progress = progress;
                work(backfill).await
            }
            .await
            .map_err(|e| format!("{e:#}"));
            if let Err(error) = &outcome {
                tracing::warn!(job = id, %error, "admin job failed");
            }
            if let Ok(mut jobs) = jobs.lock()
                && let Some(job) = jobs.get_mut(&id)
            {
                job.outcome = Some(outcome);
            }
        });
        (
            StatusCode::ACCEPTED,
            Json(json!({ "job": id, "status_url": format!("/jobs/{id}") })),
        )
            .into_response()
    }
}

async fn backfill(State(admin): State<Admin>, body: Option<Json<BackfillRequest>>) -> Response {
    let request = body.map(|Json(b)| b).unwrap_or_default();
    let options = Options {
        objects: request.objects,
        since: request.since,
        connected_accounts: request.connected_accounts,
        restart: request.restart,
    };
    admin.start("backfill".into(), move |backfill| async move {
        let summary = backfill.run(&options).await?;
        anyhow::ensure!(summary.ok(), "{summary}");
        Ok(summary.to_string())
    })
}

async fn sync(
    State(admin): State<Admin>,
    Path(table): Path<String>,
    body: Option<Json<SyncRequest>>,
) -> Response {
    let request = body.map(|Json(b)| b).unwrap_or_default();
    admin.start(format!("sync {table}"), move |backfill| async move {
        backfill
            .sync(&table, request.account.as_deref(), &request.ids)
            .await
    })
}

async fn job(State(admin): State<Admin>, Path(id): Path<u64>) -> Response {
    let Ok(jobs) = admin.jobs.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let Some(job) = jobs.get(&id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "unknown_job", "message": format!("no job {id}") })),
        )
            .into_response();
    };
    let (state, summary, error): (&str, Value, Value) = match &job.outcome {
        None => ("running", Value::Null, Value::Null),
        Some(Ok(summary)) => ("done", json!(summary), Value::Null),
        Some(Err(error)) => ("failed", Value::Null, json!(error)),
    };
    Json(json!({
        "id": id,
        "kind": job.kind,
        "state": state,
        "progress": job.progress.json(),
        "summary": summary,
        "error": error,
    }))
    .into_response()
}
