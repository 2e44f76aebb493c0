//! The applier against a real Postgres and a real NATS JetStream (and ingest, for end-to-end tests).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod api_side;
mod cluster;
mod compose;
mod coverage;
mod dead_letters;
mod deploy;
mod e2e;
mod faults;
mod handover;
mod helpers;
mod history;
mod hydration;
mod k8s;
mod lifecycle;
mod lists;
mod metrics;
mod migrations;
mod modes;
mod ordering;
mod outages;
mod postgres_tls;
mod reconcile;
mod replay;
mod robustness;
mod scale;
mod schema_doc;
mod secured;
mod thin;
