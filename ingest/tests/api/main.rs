//! Ingest against a real NATS JetStream: signatures, bad input, publishing, outages, lifecycle.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod helpers;
mod lifecycle;
mod limits;
mod outage;
mod publishing;
mod rejections;
mod slow;
