//! stripe-sync applier: consumes Stripe events from JetStream and applies them to tables in schema `stripe`,
//! once each, newest state winning, acking only after commit.
//!
//! Flow: [`consumer`] pulls a partition → [`worker`] holds its messages and runs batches through [`batch`] under the
//! [`decision`] policy → [`apply`] writes each batch in one transaction: [`event`] parsing, [`plan`] (rounds of
//! writes, by [`version`]), [`store`] (all SQL, with the ordering guard), guided by the [`registry`]. The
//! [`supervisor`] deals partitions among appliers ([`membership`]); [`startup`] builds and runs it all. The API
//! side: [`api`] (the Stripe client), [`backfill`], [`recover`], [`hydrate`], [`admin`], all publishing through
//! [`snapshot`].

pub mod admin;
pub mod api;
pub mod apply;
pub mod backfill;
pub mod batch;
pub mod commands;
pub mod consumer;
pub mod dead_letter;
pub mod decision;
pub mod error;
pub mod event;
pub mod history;
pub mod hydrate;
pub mod membership;
pub mod migrate;
pub mod plan;
pub mod probes;
pub mod reconcile;
pub mod recover;
pub mod registry;
pub mod replay;
pub mod settings;
pub mod snapshot;
pub mod startup;
pub mod store;
pub mod supervisor;
pub mod version;
pub mod worker;
