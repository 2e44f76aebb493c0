//! Building and running the ingest service: settings in, a bound listener and a shutdown future passed to `run`,
//! so tests control both.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use stripe_sync_shared::nats;
use tokio::net::TcpListener;

use crate::publish::Publisher;
use crate::routes::{self, AppState, DEFAULT_ENDPOINT};
use crate::server;
use crate::settings::Settings;
use crate::signature::Verifier;

/// Room left in a NATS message for our headers.
const HEADER_ALLOWANCE: usize = 16 * 1024;

/// A built, not yet running, ingest service.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    metrics: TcpListener,
    state: AppState,
    settings: Settings,
}

impl Application {
    /// Binds the listener and starts connecting to NATS (in the background: NATS may be down at start).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        stripe_sync_shared::metrics::handle();
        // Zero would not mean "no limit" but close every connection, or refuse every body, at once.
        anyhow::ensure!(
            !settings.http.header_read_timeout.is_zero()
                && !settings.http.body_read_timeout.is_zero(),
            "http.header_read_timeout and http.body_read_timeout must be above 0"
        );
        let state = app_state(&settings).await?;
        let address = format!("{}:{}", settings.http.host, settings.http.port);
        let listener = TcpListener::bind(&address)
            .await
            .with_context(|| format!("binding {address}"))?;
        let address = format!("{}:{}", settings.metrics.host, settings.metrics.port);
        let metrics = TcpListener::bind(&address)
            .await
            .with_context(|| format!("binding the metrics listener on {address}"))?;
        Ok(Self {
            listener,
            metrics,
            state,
            settings,
        })
    }

    /// The bound port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The metrics listener's port.
    pub fn metrics_port(&self) -> u16 {
        self.metrics.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish their publishes
    /// (bounded by `http.shutdown_timeout`) and flushes the NATS connection. Errors only when the stream can never
    /// be set up (NATS too old, or a stream of another shape).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            metrics,
            state,
            settings,
        } = self;
        let publisher = state.publisher.clone();
        let body_limit = settings.http.body_limit;
        let setup = {
            let publisher = publisher.clone();
            let stream = settings.stream.clone();
            async move {
                publisher.set_up_stream(&stream).await?;
                let max_payload = publisher.server_max_payload();
                if body_limit + HEADER_ALLOWANCE > max_payload {
                    tracing::error!(
                        body_limit,
                        max_payload,
                        "http.body_limit does not fit in the NATS server's max_payload: events near the limit will \
                         be answered 503 (and retried by Stripe) until max_payload is raised"
                    );
                }
                anyhow::Ok(())
            }
        };

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let deadline = settings.http.shutdown_timeout;
        let server = {
            let mut stop_rx = stop_rx.clone();
            server::serve(
                listener,
                routes::router(state),
                settings.http.header_read_timeout,
                async move {
                    let _ = stop_rx.wait_for(|stop| *stop).await;
                },
            )
        };
        let server = tokio::spawn(server);
        let metrics = {
            let mut stop_rx = stop_rx.clone();
            axum::serve(metrics, routes::metrics_router()).with_graceful_shutdown(async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            })
        };
        tokio::spawn(async move {
            if let Err(err) = metrics.await {
                tracing::warn!(error = %err, "the metrics listener stopped");
            }
        });
        let upkeep = tokio::spawn(stripe_sync_shared::metrics::maintain());
        tracing::info!(port = settings.http.port, "ingest listening");

        let outcome = tokio::select! {
            () = shutdown => Ok(()),
            result = setup_until_done(setup) => result,
        };
        let _ = stop_tx.send(true);
        let stopping = tokio::time::Instant::now();
        match tokio::time::timeout(deadline, server).await {
            Ok(joined) => joined.context("server task")?,
            Err(_) => {
                tracing::warn!("in-flight requests did not finish within the shutdown timeout")
            }
        }
        publisher
            .flush(deadline.saturating_sub(stopping.elapsed()))
            .await;
        upkeep.abort();
        tracing::info!("ingest stopped");
        outcome
    }
}

/// What the router serves with: the endpoints' verifiers and a publisher whose NATS connection is made in the
/// background (tests give the router a state whose NATS never answers, to exercise every refusal without a broker).
pub async fn app_state(settings: &Settings) -> anyhow::Result<AppState> {
    let endpoints = verifiers(settings)?;
    let client = nats::connect(&settings.nats, "stripe-sync-ingest", false).await?;
    let publisher = Publisher::new(
        client,
        &settings.stream.name,
        settings.webhook.publish_timeout,
    );
    Ok(AppState {
        endpoints: Arc::new(endpoints),
        publisher,
        body_limit: settings.http.body_limit,
        body_read_timeout: settings.http.body_read_timeout,
        in_flight: Arc::new(tokio::sync::Semaphore::new(
            settings.http.max_in_flight.get(),
        )),
    })
}

/// Runs stream setup; when it succeeds, waits forever (the shutdown signal ends the service).
async fn setup_until_done(setup: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    setup.await?;
    std::future::pending().await
}

fn verifiers(settings: &Settings) -> anyhow::Result<HashMap<String, Verifier>> {
    let tolerance = settings.webhook.tolerance;
    let mut endpoints = HashMap::new();
    if !settings.webhook.secrets.is_empty() {
        endpoints.insert(
            DEFAULT_ENDPOINT.to_owned(),
            Verifier::new(&settings.webhook.secrets, tolerance).map_err(anyhow::Error::msg)?,
        );
    }
    for (name, endpoint) in &settings.webhook.endpoints {
        let verifier = Verifier::new(&endpoint.secrets, tolerance)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("webhook endpoint {name:?}"))?;
        endpoints.insert(name.clone(), verifier);
    }
    anyhow::ensure!(
        !endpoints.is_empty(),
        "no webhook secret configured: set STRIPE_WEBHOOK_SECRET (the endpoint's signing secret, whsec_...)"
    );
    Ok(endpoints)
}
