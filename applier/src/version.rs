//! Where a write stands in its object's history: the second of its event (or of the API read, for a snapshot), and
//! its rank within that second. The ordering rule compares versions first; equal versions go to the tie-break in SQL
//! (`stripe.tie_break`: the events' `previous_attributes`, then stream order). See docs/design.md, "The ordering
//! rule".

/// Fields that only move forward in any object that has them: a timestamp, once set, stays set; a flag, once true,
/// stays true. Within one second, the state with more of them set is the later one (an invoice `paid` after it was
/// `finalized`). An object-valued field (`status_transitions`) counts each of its members.
pub const FORWARD_ONLY: &[&str] = &[
    "status_transitions",
    "canceled_at",
    "ended_at",
    "completed_at",
    "released_at",
    "voided_at",
    "paid",
    "captured",
    "refunded",
];

/// What kind of write produced a state, for ordering within one second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A `*.created` event: the first state of an object, so it never beats a later state of the same second.
    Created = 0,
    /// A snapshot read from Stripe's API at the start of its second: newer than a creation it found, older than a
    /// change of that second (every change that follows has its own event).
    Snapshot = 1,
    /// Any other event.
    Change = 2,
}

/// Rank of a state within its second: a tombstone above everything, then progress (forward-only fields set), then
/// kind. Stored in `_last_event_rank` as `tombstone * 100000 + progress * 10 + kind`, so SQL compares it as one
/// integer in the same order as this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank(i32);

impl Rank {
    /// Most forward-only fields counted; more can't happen with today's objects.
    pub const MAX_PROGRESS: u32 = 9_999;

    /// The rank of a state.
    #[must_use]
    pub fn new(tombstone: bool, progress: u32, kind: Kind) -> Self {
        let progress = progress.min(Self::MAX_PROGRESS) as i32;
        Self(i32::from(tombstone) * 100_000 + progress * 10 + kind as i32)
    }

    /// As stored in `_last_event_rank`.
    #[must_use]
    pub fn get(self) -> i32 {
        self.0
    }
}

/// A write's place in the order: newer `created` wins, then higher rank. Derived ordering: field order matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Unix second of the event (or of the start of the API read).
    pub created: i64,
    /// Rank within that second.
    pub rank: Rank,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(created: i64, tombstone: bool, progress: u32, kind: Kind) -> Version {
        Version {
            created,
            rank: Rank::new(tombstone, progress, kind),
        }
    }

    #[test]
    fn a_later_second_wins_whatever_the_rank() {
        assert!(v(11, false, 0, Kind::Created) > v(10, true, 9, Kind::Change));
    }

    #[test]
    fn within_a_second_tombstone_then_progress_then_kind() {
        let created = v(10, false, 0, Kind::Created);
        let snapshot = v(10, false, 0, Kind::Snapshot);
        let change = v(10, false, 0, Kind::Change);
        let paid = v(10, false, 2, Kind::Change);
        let paid_snapshot = v(10, false, 2, Kind::Snapshot);
        let deleted = v(10, true, 0, Kind::Change);
        let mut shuffled = [deleted, paid, created, change, paid_snapshot, snapshot];
        shuffled.sort();
        assert_eq!(
            shuffled,
            [created, snapshot, change, paid_snapshot, paid, deleted]
        );
    }

    #[test]
    fn the_stored_integer_orders_like_tombstone_then_progress_then_kind() {
        let mut parts = Vec::new();
        for tombstone in [false, true] {
            for progress in [0, 1, 9, 10, Rank::MAX_PROGRESS, Rank::MAX_PROGRESS + 5] {
                for kind in [Kind::Created, Kind::Snapshot, Kind::Change] {
                    parts.push((tombstone, progress.min(Rank::MAX_PROGRESS), kind));
                }
            }
        }
        for a in &parts {
            for b in &parts {
                let (ra, rb) = (Rank::new(a.0, a.1, a.2), Rank::new(b.0, b.1, b.2));
                assert_eq!(ra.get().cmp(&rb.get()), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
    }
}
