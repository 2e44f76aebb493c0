//! Objects read from Stripe's API reach the tables the way webhooks do: published to the events stream as
//! *snapshot events*, in the object's partition, and applied by the appliers under the same ordering rule and
//! dedupe. A snapshot read at second `T` has version `(T, rank with kind Snapshot)`: an event of a later second
//! wins, the snapshot wins over anything older, and within `T` it wins over a `*.created` event (the object existed
//! when the read began) but yields to any other event of that second (the read may have begun before it; every
//! change has its own event, so the final state is still the newest). See docs/design.md.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture};
use serde_json::{Value, json};
use stripe_sync_shared::subjects::{self, Topology};
use xxhash_rust::xxh3::xxh3_64;

/// The `type` and `object` of a snapshot event (a deleted object's: with `.deleted` appended).
pub const SNAPSHOT_TYPE: &str = "stripe_sync.snapshot";

/// One object read from the API.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// The connected account it belongs to (`None`: the platform's).
    pub account: Option<&'a str>,
    /// Unix second the read began.
    pub read_at: i64,
    /// The object as the API returned it.
    pub object: &'a Value,
}

impl Snapshot<'_> {
    /// The event's id: the same object read in the same second with the same content gives the same id
    /// (JetStream and the database dedupe it); a later read, or a read of changed content within the second (a
    /// `sync` right after a backfill), is a new version.
    #[must_use]
    pub fn event_id(&self) -> String {
        let key = format!(
            "{}/{}/{}/{}",
            self.account.unwrap_or(""),
            self.object["livemode"],
            self.object["id"].as_str().unwrap_or_default(),
            self.object
        );
        format!("snap_{}_{:016x}", self.read_at, xxh3_64(key.as_bytes()))
    }

    /// The snapshot event: an event-shaped body the applier reads like Stripe's. Its mode is the object's, or
    /// for objects that have none (accounts, files) the mode of the key that read it (`live`).
    #[must_use]
    pub fn event(&self, api_version: &str, live: bool) -> Value {
        let deleted = self.object["deleted"] == json!(true);
        let kind = if deleted {
            format!("{SNAPSHOT_TYPE}.deleted")
        } else {
            SNAPSHOT_TYPE.to_owned()
        };
        let mut event = json!({
            "id": self.event_id(),
            "object": SNAPSHOT_TYPE,
            "type": kind,
            "created": self.read_at,
            "livemode": self.object["livemode"].as_bool().unwrap_or(live),
            "api_version": api_version,
            "data": { "object": self.object },
        });
        if let Some(account) = self.account {
            event["account"] = json!(account);
        }
        event
    }
}

/// Publishes snapshots to the events stream.
#[derive(Debug, Clone)]
pub struct Publisher {
    js: jetstream::Context,
    topology: Topology,
    api_version: String,
    live: bool,
}

impl Publisher {
    /// A publisher to the stream of `topology`, of objects read with a key of mode `live`.
    pub fn new(
        js: jetstream::Context,
        topology: Topology,
        api_version: impl Into<String>,
        live: bool,
    ) -> Self {
        Self {
            js,
            topology,
            api_version: api_version.into(),
            live,
        }
    }

    /// Publishes every snapshot, then waits until the stream has stored each (so a checkpoint written after this
    /// never gets ahead of what is stored).
    pub async fn publish_all(&self, snapshots: &[Snapshot<'_>]) -> anyhow::Result<()> {
        let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(snapshots.len());
        for snapshot in snapshots {
            acks.push(self.publish(snapshot).await?);
        }
        for ack in acks {
            ack.await?;
        }
        Ok(())
    }

    async fn publish(&self, snapshot: &Snapshot<'_>) -> anyhow::Result<PublishAckFuture> {
        let event = snapshot.event(&self.api_version, self.live);
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        let object_id = snapshot.object["id"].as_str();
        let routing = subjects::routing_key(snapshot.account, object_id, &id);
        let kind = event["type"].as_str().unwrap_or(SNAPSHOT_TYPE);
        let subject = self
            .topology
            .event_subject(self.topology.partition_of(&routing), kind);
        let mut headers = HeaderMap::new();
        headers.insert(subjects::HEADER_MSG_ID, id.as_str());
        headers.insert(subjects::HEADER_EVENT_TYPE, kind);
        if let Some(object_id) = object_id {
            headers.insert(
                subjects::HEADER_OBJECT_ID,
                subjects::header_safe(object_id, 512).as_str(),
            );
        }
        if let Some(object) = snapshot.object["object"].as_str() {
            headers.insert(
                subjects::HEADER_OBJECT_TYPE,
                subjects::header_safe(object, 256).as_str(),
            );
        }
        if let Some(account) = snapshot.account {
            headers.insert(
                subjects::HEADER_ACCOUNT,
                subjects::header_safe(account, 256).as_str(),
            );
        }
        headers.insert(subjects::HEADER_ENDPOINT, "api");
        Ok(self
            .js
            .publish_with_headers(subject, headers, serde_json::to_vec(&event)?.into())
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Incoming;
    use crate::version::Kind;

    #[test]
    fn a_snapshot_is_an_event_the_applier_reads_as_a_snapshot_of_its_read_second() {
        let object =
            json!({ "id": "cus_1", "object": "customer", "livemode": true, "email": "a@b.c" });
        let snapshot = Snapshot {
            account: Some("acct_1"),
            read_at: 1_700_000_000,
            object: &object,
        };
        let body = serde_json::to_vec(&snapshot.event("2026-07-29.dahlia", false)).unwrap();
        let event = Incoming::parse(1, &body).unwrap();
        assert_eq!(event.kind(), Kind::Snapshot);
        assert_eq!(event.created, 1_700_000_000);
        assert_eq!(event.account.as_deref(), Some("acct_1"));
        assert_eq!(event.object_id.as_deref(), Some("cus_1"));
        assert!(event.livemode());
        assert!(!event.is_delete());
        assert_eq!(snapshot.event_id(), Snapshot { ..snapshot }.event_id());
        let later = Snapshot {
            read_at: 1_700_000_001,
            ..snapshot
        };
        assert_ne!(
            snapshot.event_id(),
            later.event_id(),
            "a later read is a new version"
        );
        let changed =
            json!({ "id": "cus_1", "object": "customer", "livemode": true, "email": "new@b.c" });
        assert_ne!(
            snapshot.event_id(),
            Snapshot {
                object: &changed,
                ..snapshot
            }
            .event_id(),
            "a change read within the same second is a new version, not a duplicate"
        );
    }
}
