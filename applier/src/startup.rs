//! Building and running the applier, in two steps like ingest's: [`Application::build`] waits for Postgres (and
//! migrates) and for NATS (and the streams and consumers); once it returns the applier is ready to consume, so
//! tests know when to publish. [`Application::run_until_stopped`] works the partitions until the shutdown future
//! resolves. Both stop cleanly when dropped or signalled: `main` runs `build` against the shutdown signal too.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context as _;
use async_nats::jetstream::{self, stream::Stream};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use stripe_sync_shared::nats::{self, SetupError};
use stripe_sync_shared::subjects::Topology;
use stripe_sync_shared::wait::{self, Attempt};
use tokio::sync::watch;

use crate::apply::Applier;
use crate::consumer;
use crate::dead_letter::DeadLetter;
use crate::hydrate::{self, Hydrator};
use crate::membership::Membership;
use crate::reconcile::Reconcile;
use crate::registry::Registry;
use crate::settings::Settings;
use crate::store;
use crate::supervisor::{self, Shared};

/// A pool that connects on first use, so the applier starts (and waits) while Postgres is away.
pub fn database_pool(settings: &Settings) -> anyhow::Result<PgPool> {
    stripe_sync_shared::nats::install_tls_provider();
    let options = PgConnectOptions::from_str(settings.database.url.expose_secret())
        .context("DATABASE_URL is not a valid Postgres URL")?
        .application_name("stripe-sync-applier")
        // The applier runs a few statement shapes with many typed-column expressions: plan them once per
        // connection, not at every execution (custom plans cost more than the batch itself at low rates).
        .options([("plan_cache_mode", "force_generic_plan")]);
    Ok(PgPoolOptions::new()
        .max_connections(settings.database.max_connections.get())
        .acquire_timeout(settings.database.acquire_timeout)
        .connect_lazy_with(options))
}

/// Waits until the database is reachable and its schema current: migrating it when `run_migrations` is on,
/// otherwise waiting for an operator to run `stripe-sync-applier migrate`.
pub async fn database_ready(settings: &Settings, pool: &PgPool) -> anyhow::Result<()> {
    if settings.database.run_migrations {
        wait::until_ready("Postgres, to run the migrations", || async {
            crate::migrate::run(pool).await.map_err(|err| match err {
                crate::migrate::MigrateError::Unreachable(e) => Attempt::not_yet(e),
                other => Attempt::Fatal(other.into()),
            })
        })
        .await?;
        tracing::info!("migrations up to date");
    } else {
        wait::until_ready(
            "the schema to be migrated (run `stripe-sync-applier migrate`)",
            || async { crate::migrate::check(pool).await.map_err(Attempt::not_yet) },
        )
        .await?;
    }
    crate::migrate::pin_account(pool, &settings.applier.account_id).await
}

/// Connects to NATS and waits until the events stream exists (the applier creates it if ingest has not yet).
pub async fn connect_streams(
    settings: &Settings,
    client_name: &str,
) -> anyhow::Result<(async_nats::Client, Stream, Topology)> {
    let client = nats::connect(&settings.nats, client_name, false).await?;
    let js = jetstream::new(client.clone());
    let (stream, topology) = wait::until_ready("NATS and the events stream", || async {
        if client.connection_state() != async_nats::connection::State::Connected {
            return Err(Attempt::NotYet(anyhow::anyhow!("not connected to NATS")));
        }
        let topology = nats::ensure_events_stream(&js, &settings.stream, false)
            .await
            .map_err(|err| match err {
                SetupError::Incompatible(reason) => Attempt::Fatal(anyhow::anyhow!(reason)),
                SetupError::Nats(err) => Attempt::NotYet(err),
            })?;
        nats::ensure_dlq_stream(&js, &settings.stream)
            .await
            .map_err(Attempt::NotYet)?;
        let stream = js
            .get_stream(&settings.stream.name)
            .await
            .map_err(Attempt::not_yet)?;
        Ok((stream, topology))
    })
    .await?;
    Ok((client, stream, topology))
}

/// The epoch of the stream as it is now (see `stripe.stream_epochs`), recorded on first sight.
pub async fn epoch_of(pool: &PgPool, stream: &Stream) -> anyhow::Result<i32> {
    let info = stream.cached_info();
    let epoch = store::stream_epoch(pool, &info.config.name, info.created)
        .await
        .context("recording the events stream's epoch")?;
    if epoch > 0 {
        tracing::info!(stream = %info.config.name, epoch, "the events stream was created again since this database first saw it: its events are ordered after every earlier one");
    }
    Ok(epoch)
}

/// A built applier: connected, migrated, streams and consumers set up, a member of the appliers.
#[derive(Debug)]
pub struct Application {
    shared: Shared,
    membership: Membership,
    /// The admin listener, bound when `STRIPE_SYNC_ADMIN_TOKEN` is set.
    admin: Option<tokio::net::TcpListener>,
    /// The hydration reader, when `STRIPE_API_KEY` is set and `applier.hydrate` is not `never`.
    hydrator: Option<Hydrator>,
    /// The scheduled reconcile, when `STRIPE_API_KEY` and `reconcile.interval` are set.
    reconcile: Option<(Reconcile, std::time::Duration)>,
    /// History's retention, when `history.retention` is set.
    retention: Option<crate::history::Retention>,
    /// The metrics and probes listener, serving since the start of `build`.
    probes: crate::probes::Probes,
}

impl Application {
    /// Connects to Postgres and NATS, waiting for each as long as it takes (drop the future to give up).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        stripe_sync_shared::metrics::handle();
        let probes = crate::probes::Probes::start(&settings.metrics).await?;
        let pool = database_pool(&settings)?;
        database_ready(&settings, &pool).await?;
        let (client, stream, topology) = connect_streams(&settings, "stripe-sync-applier").await?;
        let epoch = epoch_of(&pool, &stream).await?;
        for partition in 0..topology.partitions {
            wait::until_ready("the partitions' consumers", || {
                consumer::ensure_consumer(&stream, &settings.applier, &topology, partition)
            })
            .await?;
        }
        let admin = match &settings.admin.token {
            Some(_) => {
                let address = format!("{}:{}", settings.admin.host, settings.admin.port);
                Some(
                    tokio::net::TcpListener::bind(&address)
                        .await
                        .with_context(|| format!("binding the admin listener on {address}"))?,
                )
            }
            None => None,
        };
        let js = jetstream::new(client.clone());
        let mut applier = Applier::new(
            pool.clone(),
            Registry::shipped(),
            settings.applier.account_id.clone(),
        );
        let hydrator = match &settings.stripe.api_key {
            Some(key) if settings.applier.hydrate != hydrate::Mode::Never => {
                let live = crate::api::is_live_key(key.expose_secret());
                applier = applier.with_hydration(hydrate::Policy {
                    mode: settings.applier.hydrate,
                    api_version: settings.stripe.api_version.clone(),
                    live,
                    settle: settings.applier.hydrate_settle,
                });
                let api = Arc::new(crate::api::StripeClient::new(&settings.stripe)?);
                Some(Hydrator {
                    backfill: crate::backfill::Backfill::new(
                        &settings,
                        api,
                        js.clone(),
                        topology.clone(),
                        pool.clone(),
                    ),
                    platform_account: settings.applier.account_id.clone(),
                    live,
                    settle: settings.applier.hydrate_settle,
                    batch: 16,
                    lease: std::time::Duration::from_secs(60),
                })
            }
            _ => None,
        };
        let reconcile = match (&settings.stripe.api_key, settings.reconcile.interval) {
            (Some(_), Some(interval)) => Some((
                Reconcile::new(&settings, js.clone(), topology.clone(), pool.clone())?,
                interval,
            )),
            _ => None,
        };
        let retention = settings
            .history
            .retention
            .map(|keep| crate::history::Retention::new(pool.clone(), keep));
        let membership = Membership::join(
            &js,
            &settings.stream.name,
            settings.stream.replicas,
            settings.applier.member_ttl,
        )
        .await?;
        let shared = Shared {
            applier: Arc::new(applier),
            dead_letter: Arc::new(DeadLetter::new(js, topology.clone())),
            slots: Arc::new(tokio::sync::Semaphore::new(
                settings.database.max_connections.get() as usize,
            )),
            settings,
            client,
            stream,
            topology,
            epoch,
        };
        Ok(Self {
            shared,
            membership,
            admin,
            hydrator,
            reconcile,
            retention,
            probes,
        })
    }

    /// The admin listener's port, when it is on.
    pub fn admin_port(&self) -> Option<u16> {
        self.admin
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
    }

    /// The metrics and probes listener's port.
    pub fn metrics_port(&self) -> u16 {
        self.probes.port()
    }

    /// This applier's id among the appliers.
    #[must_use]
    pub fn member_id(&self) -> &str {
        self.membership.id()
    }

    /// Works the partitions dealt to this applier (taking partitions over and handing them back as appliers come
    /// and go) until `shutdown` resolves; then finishes and acks every attempt in progress, hands back the rest,
    /// releases its pins and leaves.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            shared,
            membership,
            admin,
            hydrator,
            reconcile,
            retention,
            probes,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        if let (Some(listener), Some(token)) = (admin, shared.settings.admin.token.clone()) {
            let router = crate::admin::router(
                shared.settings.clone(),
                token,
                hydrator.as_ref().map(|h| h.backfill.clone()),
            );
            tracing::info!(
                port = listener.local_addr().map(|a| a.port()).unwrap_or(0),
                "admin listener on"
            );
            serve(listener, router, stop_rx.clone(), "admin");
        }
        probes.ready(shared.client.clone(), shared.applier.pool());
        let upkeep = tokio::spawn(stripe_sync_shared::metrics::maintain());
        let hydrating = hydrator.map(|h| tokio::spawn(h.run(stop_rx.clone())));
        if let Some((reconcile, interval)) = reconcile {
            tokio::spawn(reconcile.every(interval, stop_rx.clone()));
        }
        if let Some(retention) = retention {
            tokio::spawn(retention.every(stop_rx.clone()));
        }
        tokio::spawn(crate::history::index_older_events_every_hour(
            shared.applier.pool().clone(),
            Registry::shipped(),
            stop_rx.clone(),
        ));
        let stopper = tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        tracing::info!(
            stream = %shared.stream.cached_info().config.name,
            partitions = shared.topology.partitions,
            member = membership.id(),
            "applier running"
        );
        let (client, pool) = (shared.client.clone(), shared.applier.pool().clone());
        supervisor::run(shared, membership, stop_rx).await;
        stopper.abort();
        if let Some(hydrating) = hydrating
            && tokio::time::timeout(std::time::Duration::from_secs(5), hydrating)
                .await
                .is_err()
        {
            tracing::warn!(
                "hydration did not stop within 5 s; its claimed objects are read again later"
            );
        }
        if let Err(err) =
            tokio::time::timeout(std::time::Duration::from_secs(5), client.flush()).await
        {
            tracing::warn!(error = %err, "flushing acks at shutdown timed out");
        }
        upkeep.abort();
        pool.close().await;
        tracing::info!("applier stopped");
        Ok(())
    }
}

/// Serves `router` on `listener` in the background until `stop` turns true; `what` names it in the log if it fails.
fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
) {
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(err) = served {
            tracing::warn!(error = %err, listener = what, "a listener stopped");
        }
    });
}
