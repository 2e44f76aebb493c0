//! Sharing partitions between appliers. Each applier announces itself in a JetStream key-value bucket whose entries
//! expire (`max_age`), so the live members are the keys present; partitions are dealt round-robin over the sorted
//! members. This only decides which partitions an applier *pulls*: exclusive delivery is JetStream's pinned-client
//! priority group, so two appliers that briefly disagree about the members can't both work a partition.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, stream::StorageType};
use futures::TryStreamExt;

/// This applier's entry in the members bucket.
#[derive(Debug)]
pub struct Membership {
    store: kv::Store,
    me: String,
}

/// Name of the members bucket of a stream.
#[must_use]
pub fn bucket_name(stream: &str) -> String {
    format!("{stream}_appliers")
}

impl Membership {
    /// Joins the members of `stream`'s appliers; entries not renewed within `ttl` expire. The bucket has the
    /// stream's `replicas`, so it survives what the stream survives.
    pub async fn join(
        js: &jetstream::Context,
        stream: &str,
        replicas: usize,
        ttl: Duration,
    ) -> anyhow::Result<Self> {
        let store = js
            .create_or_update_key_value(kv::Config {
                bucket: bucket_name(stream),
                description: "live stripe-sync appliers (entries expire when not renewed)".into(),
                history: 1,
                max_age: ttl,
                storage: StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .context("creating the appliers bucket")?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "applier".into());
        let host: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let me = format!("{host}-{}-{}", std::process::id(), nuid_suffix());
        let membership = Self { store, me };
        membership.heartbeat().await?;
        Ok(membership)
    }

    /// This applier's member id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.me
    }

    /// Renews this applier's entry.
    pub async fn heartbeat(&self) -> anyhow::Result<()> {
        let value = format!("pid={}", std::process::id());
        self.store
            .put(&self.me, value.into())
            .await
            .context("renewing membership")?;
        Ok(())
    }

    /// The live members, sorted.
    pub async fn members(&self) -> anyhow::Result<Vec<String>> {
        let keys = self.store.keys().await.context("listing members")?;
        let mut members: Vec<String> = keys.try_collect().await.context("listing members")?;
        members.sort();
        Ok(members)
    }

    /// Leaves at once (at shutdown), so the others take the partitions over without waiting for expiry.
    pub async fn leave(&self) {
        if let Err(err) = self.store.purge(&self.me).await {
            tracing::warn!(error = %err, "could not leave the appliers bucket; the entry will expire");
        }
    }
}

fn nuid_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:08x}")
}

/// The partitions `me` works: partition `p` goes to the `p mod n`-th of the `n` sorted members. Every applier
/// computes the same deal from the same members, each gets `partitions / n` or one more. An applier not (yet) in the
/// list works nothing.
#[must_use]
pub fn owned(partitions: u32, members: &[String], me: &str) -> Vec<u32> {
    match members.iter().position(|m| m == me) {
        Some(rank) => (0..partitions)
            .filter(|p| (*p as usize) % members.len() == rank)
            .collect(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m{i}")).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_owner_and_the_deal_is_even() {
        for n in 1..=8 {
            let members = members(n);
            let mut seen = vec![0; 16];
            for m in &members {
                let mine = owned(16, &members, m);
                assert!(
                    mine.len() == 16 / n || mine.len() == 16 / n + 1,
                    "{n} members: {m} has {}",
                    mine.len()
                );
                for p in mine {
                    seen[p as usize] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{n} members: {seen:?}");
        }
    }

    #[test]
    fn an_applier_missing_from_the_members_works_nothing() {
        assert!(owned(16, &members(3), "stranger").is_empty());
    }
}
