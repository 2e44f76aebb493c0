//! stripe-sync applier: consumes Stripe events from JetStream and applies them to tables in schema `stripe`,
//! once each, newest state winning, acking only after commit.
//!
//! Flow: [`consumer`] pulls a partition → [`worker`] gathers a batch → [`apply`] runs it in one transaction:
//! [`event`] parsing, [`plan`] (which row wins), [`store`] (all SQL), guided by the [`registry`].

pub mod apply;
pub mod commands;
pub mod consumer;
pub mod dead_letter;
pub mod error;
pub mod event;
pub mod membership;
pub mod plan;
pub mod registry;
pub mod replay;
pub mod settings;
pub mod startup;
pub mod store;
pub mod worker;
