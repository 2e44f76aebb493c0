//! Where a write stands in its object's history: the second of its event (or of the API read, for a snapshot), and
//! its rank within that second. The ordering rule compares versions first; equal versions go to the tie-break in SQL
//! (`stripe.tie_break`: the events' `previous_attributes`, then stream order). See docs/design.md, "The ordering
//! rule".

/// Fields the event reader counts as set, for the registry's per-type `forward_only` (and `moves_back`) lists:
/// timestamps and flags of an object's lifecycle. Which of them only move forward depends on the type (a
/// subscription's `canceled_at` is cleared when a cancellation at period end is undone; a charge's `refunded` goes
/// back when a refund fails), so the registry says, per type, which ones order states within a second.
pub const FORWARD_CANDIDATES: &[&str] = &[
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

/// How many of each [`FORWARD_CANDIDATES`] field an object has set: a number, a string or `true` counts one; an
/// object (`status_transitions`) counts its set members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetFields(pub [u16; FORWARD_CANDIDATES.len()]);

impl SetFields {
    /// Adds `count` set values of the candidate field `field`; other fields are ignored.
    pub fn add(&mut self, field: &str, count: u16) {
        if let Some(i) = FORWARD_CANDIDATES.iter().position(|c| *c == field) {
            self.0[i] = self.0[i].saturating_add(count);
        }
    }

    /// Whether `field` is a candidate the reader counts.
    #[must_use]
    pub fn counts(field: &str) -> bool {
        FORWARD_CANDIDATES.contains(&field)
    }

    /// The progress of a state of a type whose forward-only fields are `forward_only`: how many of them are set.
    #[must_use]
    pub fn progress<S: AsRef<str>>(&self, forward_only: &[S]) -> u32 {
        FORWARD_CANDIDATES
            .iter()
            .zip(self.0)
            .filter(|(c, _)| forward_only.iter().any(|f| f.as_ref() == **c))
            .map(|(_, n)| u32::from(n))
            .sum()
    }
}

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
