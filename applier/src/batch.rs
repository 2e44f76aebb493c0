//! Applying a batch under the retry policy, the one loop every caller shares (the worker, `replay`, `dlq
//! redrive`): retry in place while the policy says so, split a batch that one event spoils, and report what
//! became of each event. Parking and dead letters are the caller's: only the worker has them.

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::apply::{Report, Writer};
use crate::decision::{Failure, Policy, Step, Tries};
use crate::event::Incoming;

/// What became of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Committed (or already applied before).
    Applied,
    /// Failed on its own account: the caller parks, dead-letters or reports it.
    Failed {
        /// What retrying can do.
        failure: Failure,
        /// The database's message.
        error: String,
    },
    /// Not tried to the end: stopping.
    Stopped,
}

/// Applies `events` under `policy` until each is applied or failed on its own account, or `stop` turns true (an
/// attempt in progress is finished first). Returns one [`Settled`] per event, in order, and the reports of the
/// transactions that committed.
pub async fn apply<W: Writer + ?Sized>(
    writer: &W,
    policy: &Policy,
    events: &[Incoming],
    stop: &mut watch::Receiver<bool>,
) -> (Vec<Settled>, Report) {
    let mut report = Report::default();
    let mut settled = vec![Settled::Stopped; events.len()];
    match apply_unit(writer, policy, events, stop, &mut report).await {
        Unit::Done(outcome) => settled.fill(outcome),
        Unit::Split => {
            tracing::warn!(
                events = events.len(),
                "batch rejected; applying its events one by one"
            );
            for (i, event) in events.iter().enumerate() {
                let span = tracing::info_span!("event", event_id = %event.id, event_type = %event.event_type);
                match apply_unit(
                    writer,
                    policy,
                    std::slice::from_ref(event),
                    stop,
                    &mut report,
                )
                .instrument(span)
                .await
                {
                    Unit::Done(Settled::Stopped) => break,
                    Unit::Done(outcome) => settled[i] = outcome,
                    Unit::Split => unreachable!("one event is never split"),
                }
            }
        }
    }
    (settled, report)
}

enum Unit {
    Done(Settled),
    Split,
}

/// Tries `events` as one transaction until it commits, fails on its own account, must be split, or stopping.
async fn apply_unit<W: Writer + ?Sized>(
    writer: &W,
    policy: &Policy,
    events: &[Incoming],
    stop: &mut watch::Receiver<bool>,
    report: &mut Report,
) -> Unit {
    let mut tries = Tries::default();
    loop {
        let err = match writer.write(events).await {
            Ok(done) => {
                add(report, &done);
                return Unit::Done(Settled::Applied);
            }
            Err(err) => err,
        };
        let failure = err.failure();
        match policy.after_try(
            events.len(),
            failure,
            &mut tries,
            Instant::now(),
            fastrand::f64(),
        ) {
            Step::RetryAt(at) => {
                tracing::warn!(error = %err.detail(), ?failure, events = events.len(), retry_in = ?at - Instant::now(), "apply failed; retrying");
                let stopped = tokio::select! {
                    () = tokio::time::sleep_until(at) => false,
                    _ = stop.wait_for(|s| *s) => true,
                };
                if stopped || *stop.borrow() {
                    return Unit::Done(Settled::Stopped);
                }
            }
            Step::Split => return Unit::Split,
            Step::GiveBack => {
                return Unit::Done(Settled::Failed {
                    failure,
                    error: err.detail(),
                });
            }
        }
    }
}

fn add(total: &mut Report, one: &Report) {
    total.events += one.events;
    total.new += one.new;
    total.rows_written += one.rows_written;
    total.rows_stale += one.rows_stale;
    total.ambiguous += one.ambiguous;
    total.unrouted += one.unrouted;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::error::ApplyError;

    /// A writer that fails batches containing a poison event, and everything during an outage.
    struct Scripted {
        poison: &'static str,
        outage_until: Instant,
        calls: Mutex<Vec<usize>>,
    }

    impl Writer for Scripted {
        async fn write(&self, events: &[Incoming]) -> Result<Report, ApplyError> {
            self.calls.lock().unwrap().push(events.len());
            if Instant::now() < self.outage_until {
                return Err(ApplyError::Database(sqlx::Error::PoolTimedOut));
            }
            if events.iter().any(|e| e.id == self.poison) {
                return Err(ApplyError::Unreadable("poison".into()));
            }
            Ok(Report {
                events: events.len(),
                new: events.len(),
                ..Report::default()
            })
        }
    }

    fn events(ids: &[&str]) -> Vec<Incoming> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                let body = format!(r#"{{"id":"{id}","type":"customer.updated","created":1,"data":{{"object":{{"id":"cus_{i}"}}}}}}"#);
                Incoming::parse(i as u64 + 1, body.as_bytes()).unwrap()
            })
            .collect()
    }

    fn policy() -> Policy {
        Policy {
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            dead_letter_after: std::num::NonZeroU32::new(3).unwrap(),
            give_up_after: Duration::from_secs(60),
            ack_wait: Duration::from_secs(3),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_poison_event_fails_alone_and_the_others_apply() {
        let writer = Scripted {
            poison: "evt_b",
            outage_until: Instant::now(),
            calls: Mutex::default(),
        };
        let (_tx, mut stop) = watch::channel(false);
        let (settled, report) = apply(
            &writer,
            &policy(),
            &events(&["evt_a", "evt_b", "evt_c"]),
            &mut stop,
        )
        .await;
        assert_eq!(settled[0], Settled::Applied);
        assert!(matches!(
            &settled[1],
            Settled::Failed {
                failure: Failure::Rejected,
                ..
            }
        ));
        assert_eq!(settled[2], Settled::Applied);
        assert_eq!(report.new, 2);
        assert_eq!(*writer.calls.lock().unwrap(), vec![3, 1, 1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_waited_out_then_the_batch_commits_whole() {
        let started = Instant::now();
        let writer = Scripted {
            poison: "none",
            outage_until: started + Duration::from_secs(30),
            calls: Mutex::default(),
        };
        let (_tx, mut stop) = watch::channel(false);
        let (settled, _) = apply(&writer, &policy(), &events(&["evt_a", "evt_b"]), &mut stop).await;
        assert_eq!(settled, vec![Settled::Applied, Settled::Applied]);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(32),
            "{waited:?}"
        );
        assert!(
            writer.calls.lock().unwrap().iter().all(|n| *n == 2),
            "an outage never splits a batch"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_during_an_outage_gives_every_event_back_untried() {
        let writer = Scripted {
            poison: "none",
            outage_until: Instant::now() + Duration::from_secs(3600),
            calls: Mutex::default(),
        };
        let (tx, mut stop) = watch::channel(false);
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            tx.send(true).unwrap();
        });
        let (settled, _) = apply(&writer, &policy(), &events(&["evt_a", "evt_b"]), &mut stop).await;
        stopper.await.unwrap();
        assert_eq!(settled, vec![Settled::Stopped, Settled::Stopped]);
    }
}
