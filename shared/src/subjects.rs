//! The wire format between ingest and applier: subject names, the partition function and header names.
//! Changing anything here changes what is already stored in streams, so it is versioned by care, not by code.

use xxhash_rust::xxh3::xxh3_64;

/// `Nats-Msg-Id`: JetStream's own dedupe key; we set it to the Stripe event id.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// The Stripe event type, e.g. `customer.updated`.
pub const HEADER_EVENT_TYPE: &str = "Stripe-Event-Type";
/// `data.object.id`, when the object has one.
pub const HEADER_OBJECT_ID: &str = "Stripe-Object-Id";
/// `data.object.object`, the object's type.
pub const HEADER_OBJECT_TYPE: &str = "Stripe-Object-Type";
/// The connected account, for Connect events.
pub const HEADER_ACCOUNT: &str = "Stripe-Account";
/// Name of the webhook endpoint (path) the event came through.
pub const HEADER_ENDPOINT: &str = "Stripe-Sync-Endpoint";

/// Dead letter: the error that stopped the event.
pub const HEADER_DLQ_ERROR: &str = "Stripe-Sync-Error";
/// Dead letter: how many times the applier tried.
pub const HEADER_DLQ_ATTEMPTS: &str = "Stripe-Sync-Attempts";
/// Dead letter: the event's sequence in the events stream (its place in the order).
pub const HEADER_DLQ_STREAM_SEQ: &str = "Stripe-Sync-Stream-Seq";
/// Dead letter: RFC 3339 time it was dead-lettered.
pub const HEADER_DLQ_FAILED_AT: &str = "Stripe-Sync-Failed-At";

/// Stream metadata key holding the partition count fixed at stream creation.
pub const METADATA_PARTITIONS: &str = "stripe_sync_partitions";

/// Subject layout of one deployment (prefix and partition count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// First subject token, e.g. `stripe`.
    pub prefix: String,
    /// Number of partitions (≥ 1).
    pub partitions: u32,
}

impl Topology {
    /// Subject an event is published to: `<prefix>.events.<partition>.<event type>`.
    #[must_use]
    pub fn event_subject(&self, partition: u32, event_type: &str) -> String {
        format!(
            "{}.events.{}.{}",
            self.prefix,
            partition,
            subject_safe(event_type)
        )
    }

    /// Wildcard covering every event subject, for the stream.
    #[must_use]
    pub fn events_wildcard(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// Filter of one partition, for its consumer.
    #[must_use]
    pub fn partition_filter(&self, partition: u32) -> String {
        format!("{}.events.{}.>", self.prefix, partition)
    }

    /// Dead-letter subject of an event type.
    #[must_use]
    pub fn dlq_subject(&self, event_type: &str) -> String {
        format!("{}.dlq.{}", self.prefix, subject_safe(event_type))
    }

    /// Wildcard covering every dead-letter subject.
    #[must_use]
    pub fn dlq_wildcard(&self) -> String {
        format!("{}.dlq.>", self.prefix)
    }

    /// Partition of an event: a stable hash of its [`routing_key`], so every event of one object lands in one
    /// partition and keeps its order.
    #[must_use]
    pub fn partition_of(&self, routing_key: &str) -> u32 {
        (xxh3_64(routing_key.as_bytes()) % u64::from(self.partitions.max(1))) as u32
    }
}

/// What an event is partitioned by: its object, within its connected account (`acct_1/card_payments`: ids like
/// a capability's repeat across accounts and would all land in one partition), or the event id for an object
/// without an id. Ingest and every publisher of snapshots use this, so one object's writes share a partition.
#[must_use]
pub fn routing_key(account: Option<&str>, object_id: Option<&str>, event_id: &str) -> String {
    match (account, object_id.filter(|id| !id.is_empty())) {
        (Some(account), Some(object)) => format!("{account}/{object}"),
        (None, Some(object)) => object.to_owned(),
        (_, None) => event_id.to_owned(),
    }
}

/// Makes an event type usable as subject tokens: characters outside `[A-Za-z0-9_.-]` become `_`, empty tokens
/// become `_`. Stripe's types pass unchanged; the header keeps the exact type in any case.
#[must_use]
pub fn subject_safe(event_type: &str) -> String {
    let cleaned: String = event_type
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    cleaned
        .split('.')
        .map(|t| if t.is_empty() { "_" } else { t })
        .collect::<Vec<_>>()
        .join(".")
}

/// Makes a value safe for a NATS header (no CR/LF), truncating very long ones.
#[must_use]
pub fn header_safe(value: &str, max_len: usize) -> String {
    let mut out: String = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > max_len {
        let mut cut = max_len;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_types_pass_unchanged_and_odd_ones_are_made_safe() {
        assert_eq!(
            subject_safe("customer.subscription.updated"),
            "customer.subscription.updated"
        );
        assert_eq!(subject_safe("a b.*.>"), "a_b._._");
        assert_eq!(subject_safe("..x."), "_._.x._");
    }

    #[test]
    fn one_object_always_lands_in_one_partition_and_partitions_spread() {
        let t = Topology {
            prefix: "stripe".into(),
            partitions: 16,
        };
        assert_eq!(t.partition_of("cus_123"), t.partition_of("cus_123"));
        let used: std::collections::HashSet<u32> = (0..1000)
            .map(|i| t.partition_of(&format!("cus_{i}")))
            .collect();
        assert_eq!(used.len(), 16);
        // The function is part of the wire format: pin a value (computed with Python's `xxhash.xxh3_64`) so a
        // change can't slip through.
        assert_eq!(t.partition_of("cus_123"), 7);
        let one = Topology {
            prefix: "stripe".into(),
            partitions: 1,
        };
        assert_eq!(
            one.event_subject(one.partition_of("x"), "price.created"),
            "stripe.events.0.price.created"
        );
    }

    #[test]
    fn connected_accounts_spread_objects_whose_ids_repeat_across_accounts() {
        let t = Topology {
            prefix: "stripe".into(),
            partitions: 16,
        };
        assert_eq!(routing_key(None, Some("cus_1"), "evt_1"), "cus_1");
        assert_eq!(routing_key(None, None, "evt_1"), "evt_1");
        let used: std::collections::HashSet<u32> = (0..200)
            .map(|i| {
                let account = format!("acct_{i}");
                t.partition_of(&routing_key(Some(&account), Some("card_payments"), "evt_x"))
            })
            .collect();
        assert_eq!(
            used.len(),
            16,
            "every account's `card_payments` capability in one partition"
        );
    }

    #[test]
    fn header_values_lose_line_breaks_and_are_bounded() {
        assert_eq!(header_safe("a\r\nb", 100), "a  b");
        assert_eq!(header_safe("ééé", 3), "é");
    }
}
