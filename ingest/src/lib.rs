//! stripe-sync ingest: receives Stripe webhooks, verifies their signature, and publishes each event unchanged to a
//! JetStream stream, answering 2xx only once JetStream has stored it.

pub mod error;
pub mod publish;
pub mod routes;
pub mod server;
pub mod settings;
pub mod signature;
pub mod startup;
