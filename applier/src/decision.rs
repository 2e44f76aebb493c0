//! What happens to a message now: every retry, split, park and dead-letter decision of the applier in one pure
//! place, without NATS or a database, so the riskiest logic is unit-tested with paused time. The worker, `replay`
//! and `dlq redrive` all decide through it.
//!
//! A failure is classified once ([`crate::error::ApplyError::failure`]):
//! - an **outage** (Postgres away) is retried in place without limit: nothing can be applied meanwhile, and the
//!   event is not at fault;
//! - a **recurring** error usually passes (a statement or lock timeout, a serialization failure, a deadlock, a
//!   column changing under the applier) but may not: a batch retries a few times and then splits; a single event
//!   is parked, and dead-lettered once it kept failing for `give_up_after`, so a partition never stalls forever;
//! - a **rejection** (a constraint or trigger, an unreadable payload) splits a batch at once; a single event is
//!   parked and dead-lettered after `dead_letter_after` attempts.

use std::num::NonZeroU32;
use std::time::Duration;

use tokio::time::Instant;

use crate::settings::ApplierSettings;

/// Why applying failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The database is unreachable or shutting down: retry without limit.
    Outage,
    /// An error that usually passes, but might come back every time.
    Recurring,
    /// The database refused the event (or it can't be read): retrying won't help, or only after an operator acts.
    Rejected,
}

/// What to do after one try of a batch (or of one event) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Try the same events again at this time.
    RetryAt(Instant),
    /// Apply each event of the batch on its own.
    Split,
    /// Give the failure back to the caller: one event that failed on its own account.
    GiveBack,
}

/// What to do with one event that failed on its own account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hold it and try again at this time, while the partition keeps flowing.
    Park(Instant),
    /// Publish it to the dead letter, then ack it.
    DeadLetter,
}

/// A batch's or an event's failures so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tries {
    /// Consecutive outages.
    pub outages: u32,
    /// Recurring failures of a batch.
    pub recurring: u32,
    /// Failed attempts of one event on its own account.
    pub attempts: u32,
    /// When the event first failed on its own account.
    pub first_failure: Option<Instant>,
}

/// The retry policy, from the settings.
#[derive(Debug, Clone)]
pub struct Policy {
    /// First wait before a retry.
    pub retry_initial: Duration,
    /// Longest wait between retries.
    pub retry_max: Duration,
    /// Attempts before an event goes to the dead letter.
    pub dead_letter_after: NonZeroU32,
    /// How long an event failing with a recurring error keeps being retried before the dead letter.
    pub give_up_after: Duration,
    /// How long JetStream waits for an ack before redelivering.
    pub ack_wait: Duration,
}

impl Policy {
    /// Recurring failures of a batch before it is split: a batch too big for `statement_timeout` gets through as
    /// single events.
    pub const SPLIT_AFTER: u32 = 3;

    /// The policy of these settings.
    #[must_use]
    pub fn new(settings: &ApplierSettings) -> Self {
        Self {
            retry_initial: settings.retry_initial,
            retry_max: settings.retry_max,
            dead_letter_after: settings.dead_letter_after,
            give_up_after: settings.give_up_after,
            ack_wait: settings.ack_wait,
        }
    }

    /// After a try of `events` events failed with `failure` at `now`. `jitter` in `[0, 1)` spreads retries.
    pub fn after_try(
        &self,
        events: usize,
        failure: Failure,
        tries: &mut Tries,
        now: Instant,
        jitter: f64,
    ) -> Step {
        match failure {
            Failure::Outage => {
                tries.outages += 1;
                Step::RetryAt(now + self.backoff(tries.outages, jitter))
            }
            _ if events <= 1 => Step::GiveBack,
            Failure::Recurring => {
                tries.recurring += 1;
                if tries.recurring < Self::SPLIT_AFTER {
                    Step::RetryAt(now + self.backoff(tries.recurring, jitter))
                } else {
                    Step::Split
                }
            }
            Failure::Rejected => Step::Split,
        }
    }

    /// After one event failed on its own account (a recurring failure or a rejection) at `now`.
    pub fn after_failure(
        &self,
        failure: Failure,
        tries: &mut Tries,
        now: Instant,
        jitter: f64,
    ) -> Verdict {
        tries.attempts += 1;
        let first = *tries.first_failure.get_or_insert(now);
        let enough_attempts = tries.attempts >= self.dead_letter_after.get();
        let long_enough =
            failure != Failure::Recurring || now.duration_since(first) >= self.give_up_after;
        if enough_attempts && long_enough {
            Verdict::DeadLetter
        } else {
            Verdict::Park(now + self.backoff(tries.attempts, jitter))
        }
    }

    /// The `n`th wait (from 1): `retry_initial` doubled each time up to `retry_max`, then between half and all of
    /// that ("equal jitter"), so appliers retrying together spread out.
    #[must_use]
    pub fn backoff(&self, n: u32, jitter: f64) -> Duration {
        let doubled = self
            .retry_initial
            .saturating_mul(1u32 << n.saturating_sub(1).min(20));
        let ceiling = doubled.min(self.retry_max);
        ceiling.mul_f64(0.5f64.mul_add(jitter.clamp(0.0, 1.0), 0.5))
    }

    /// How often every held message's ack deadline is extended: three times per `ack_wait`, so one late
    /// extension never lets a message be redelivered.
    #[must_use]
    pub fn progress_every(&self) -> Duration {
        self.ack_wait / 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            dead_letter_after: NonZeroU32::new(5).unwrap(),
            give_up_after: Duration::from_secs(600),
            ack_wait: Duration::from_secs(10),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn outages_retry_in_place_forever_with_growing_waits_up_to_the_maximum() {
        let p = policy();
        let mut tries = Tries::default();
        let now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..100 {
            match p.after_try(500, Failure::Outage, &mut tries, now, 0.999) {
                Step::RetryAt(at) => waits.push(at - now),
                other => panic!("an outage gave {other:?}"),
            }
        }
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert!(waits[0] < Duration::from_millis(500));
        assert!(waits[99] <= Duration::from_secs(30) && waits[99] > Duration::from_secs(29));
        assert_eq!(
            p.after_try(1, Failure::Outage, &mut Tries::default(), now, 0.0),
            Step::RetryAt(now + Duration::from_millis(250)),
            "a single event waits out an outage too"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_batch_splits_at_once_and_a_recurring_one_after_a_few_tries() {
        let p = policy();
        let now = Instant::now();
        assert_eq!(
            p.after_try(2, Failure::Rejected, &mut Tries::default(), now, 0.5),
            Step::Split
        );
        let mut tries = Tries::default();
        let steps: Vec<Step> = (0..Policy::SPLIT_AFTER)
            .map(|_| p.after_try(100, Failure::Recurring, &mut tries, now, 0.0))
            .collect();
        assert!(matches!(steps[0], Step::RetryAt(_)));
        assert_eq!(steps.last(), Some(&Step::Split));
        for failure in [Failure::Rejected, Failure::Recurring] {
            assert_eq!(
                p.after_try(1, failure, &mut Tries::default(), now, 0.0),
                Step::GiveBack,
                "{failure:?} of one event goes back to the caller"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_event_is_parked_then_dead_lettered_after_the_configured_attempts() {
        let p = policy();
        let mut tries = Tries::default();
        let mut verdicts = Vec::new();
        for _ in 0..5 {
            let now = Instant::now();
            let verdict = p.after_failure(Failure::Rejected, &mut tries, now, 0.0);
            if let Verdict::Park(at) = verdict {
                tokio::time::sleep_until(at).await;
            }
            verdicts.push(verdict);
        }
        assert!(verdicts[..4].iter().all(|v| matches!(v, Verdict::Park(_))));
        assert_eq!(verdicts[4], Verdict::DeadLetter);
    }

    #[tokio::test(start_paused = true)]
    async fn a_recurring_error_is_dead_lettered_only_after_it_kept_failing_long_enough() {
        let p = policy();
        let mut tries = Tries::default();
        let started = Instant::now();
        let dead_lettered_at = loop {
            let now = Instant::now();
            match p.after_failure(Failure::Recurring, &mut tries, now, 0.0) {
                Verdict::Park(at) => tokio::time::sleep_until(at).await,
                Verdict::DeadLetter => break now,
            }
        };
        let waited = dead_lettered_at - started;
        assert!(
            waited >= Duration::from_secs(600) && waited < Duration::from_secs(630),
            "{waited:?}"
        );
        assert!(tries.attempts > 5);
    }

    #[test]
    fn progress_is_sent_three_times_per_ack_wait() {
        let every = policy().progress_every();
        assert!(
            every * 3 <= Duration::from_secs(10) && every > Duration::from_millis(3300),
            "{every:?}"
        );
    }

    proptest::proptest! {
        #[test]
        fn backoff_stays_between_half_the_first_wait_and_the_maximum(n in 1u32..200, jitter in 0.0f64..1.0) {
            let p = policy();
            let wait = p.backoff(n, jitter);
            proptest::prop_assert!(wait >= Duration::from_millis(250) && wait <= Duration::from_secs(30), "{:?}", wait);
            proptest::prop_assert!(p.backoff(n + 1, 0.999) >= p.backoff(n, 0.0));
        }
    }
}
