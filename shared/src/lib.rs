//! Code both stripe-sync binaries need: typed settings, the event head (the few fields of a Stripe event both
//! binaries read), subject and header names, NATS/JetStream setup, telemetry and the shutdown signal.

pub mod event_head;
pub mod metrics;
pub use config::ConfigError;
pub mod nats;
pub mod payload;
pub mod settings;
pub mod shutdown;
pub mod subjects;
pub mod telemetry;
pub mod wait;
