//! The worker with stand-ins for JetStream, Postgres and the dead letter, under tokio's paused time: acks,
//! deadlines, retries, parking, dead letters and stopping, in milliseconds of real time.

use std::collections::HashSet;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::AckKind;
use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use super::{DeadLetters, Delivery, Worker};
use crate::apply::{Report, Writer};
use crate::dead_letter::Letter;
use crate::decision::Policy;
use crate::error::ApplyError;
use crate::event::Incoming;

/// What the worker told JetStream about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ack {
    Done,
    Nak,
    Progress,
    Other,
}

impl From<AckKind> for Ack {
    fn from(kind: AckKind) -> Self {
        match kind {
            AckKind::Ack => Self::Done,
            AckKind::Nak(_) => Self::Nak,
            AckKind::Progress => Self::Progress,
            _ => Self::Other,
        }
    }
}

/// Every ack the worker sent: (stream sequence, kind, when).
type AckLog = Arc<Mutex<Vec<(u64, Ack, Instant)>>>;

struct Message {
    seq: u64,
    payload: Bytes,
    log: AckLog,
}

impl Delivery for Message {
    fn stream_seq(&self) -> u64 {
        self.seq
    }
    fn payload(&self) -> Bytes {
        self.payload.clone()
    }
    fn headers(&self) -> Option<&HeaderMap> {
        None
    }
    async fn ack(&self, kind: AckKind) {
        self.log
            .lock()
            .unwrap()
            .push((self.seq, kind.into(), Instant::now()));
    }
}

/// A database that is away until `outage_until`, rejects `poison` ids, fails `recurring` ids with a statement
/// timeout, and takes `delay` per transaction.
#[derive(Default)]
struct Database {
    outage_until: Option<Instant>,
    poison: HashSet<String>,
    recurring: HashSet<String>,
    delay: Duration,
    batches: Mutex<Vec<usize>>,
}

/// What a statement timeout looks like to the classification: an error that usually passes.
fn statement_timeout() -> sqlx::Error {
    sqlx::Error::Protocol("canceling statement due to statement timeout".into())
}

impl Writer for Database {
    async fn write(&self, events: &[Incoming]) -> Result<Report, ApplyError> {
        tokio::time::sleep(self.delay).await;
        self.batches.lock().unwrap().push(events.len());
        if self.outage_until.is_some_and(|t| Instant::now() < t) {
            return Err(ApplyError::Database(sqlx::Error::PoolTimedOut));
        }
        if events.iter().any(|e| self.recurring.contains(&e.id)) {
            return Err(ApplyError::SchemaChanged(statement_timeout()));
        }
        if events.iter().any(|e| self.poison.contains(&e.id)) {
            return Err(ApplyError::Unreadable("rejected by a trigger".into()));
        }
        Ok(Report {
            events: events.len(),
            new: events.len(),
            ..Report::default()
        })
    }
}

/// A dead letter that refuses the first `refuse` letters.
#[derive(Default)]
struct Letters {
    refuse: Mutex<u32>,
    stored: Mutex<Vec<(u64, u32, String)>>,
}

impl DeadLetters for Letters {
    async fn publish(&self, letter: Letter<'_>) -> anyhow::Result<()> {
        let mut refuse = self.refuse.lock().unwrap();
        if *refuse > 0 {
            *refuse -= 1;
            anyhow::bail!("NATS away");
        }
        self.stored.lock().unwrap().push((
            letter.stream_seq,
            letter.attempts,
            letter.error.to_owned(),
        ));
        Ok(())
    }
}

struct Harness {
    tx: Option<mpsc::Sender<Message>>,
    log: AckLog,
    database: Arc<Database>,
    letters: Arc<Letters>,
    slots: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
    next_seq: u64,
}

fn policy() -> Policy {
    Policy {
        retry_initial: Duration::from_millis(500),
        retry_max: Duration::from_secs(60),
        dead_letter_after: NonZeroU32::new(3).unwrap(),
        give_up_after: Duration::from_secs(600),
        ack_wait: Duration::from_secs(10),
    }
}

fn start(database: Database, letters: Letters) -> Harness {
    let (tx, rx) = mpsc::channel(16);
    let database = Arc::new(database);
    let letters = Arc::new(letters);
    let slots = Arc::new(Semaphore::new(1));
    let worker = Worker {
        partition: 0,
        writer: database.clone(),
        dead_letter: letters.clone(),
        slots: slots.clone(),
        policy: policy(),
        batch_size: NonZeroUsize::new(50).unwrap(),
        batch_wait: Duration::from_millis(10),
        epoch: 0,
    };
    Harness {
        tx: Some(tx),
        log: AckLog::default(),
        database,
        letters,
        slots,
        task: tokio::spawn(worker.run(rx)),
        next_seq: 1,
    }
}

impl Harness {
    /// Sends events with these ids; returns their stream sequences.
    async fn send(&mut self, ids: &[&str]) -> Vec<u64> {
        let mut seqs = Vec::new();
        for id in ids {
            let body = format!(
                r#"{{"id":"{id}","type":"customer.updated","created":1,"data":{{"object":{{"id":"cus_{id}","object":"customer"}}}}}}"#
            );
            self.send_raw(Bytes::from(body)).await;
            seqs.push(self.next_seq - 1);
        }
        seqs
    }

    async fn send_raw(&mut self, payload: Bytes) {
        let message = Message {
            seq: self.next_seq,
            payload,
            log: self.log.clone(),
        };
        self.next_seq += 1;
        self.tx.as_ref().unwrap().send(message).await.unwrap();
    }

    fn acks(&self, seq: u64) -> Vec<(Ack, Instant)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _, _)| *s == seq)
            .map(|(_, k, t)| (*k, *t))
            .collect()
    }

    fn last(&self, seq: u64) -> Option<Ack> {
        self.acks(seq)
            .into_iter()
            .map(|(k, _)| k)
            .rfind(|k| *k != Ack::Progress)
    }

    /// Waits (in paused time) until every one of `seqs` got a final ack, nak or dead letter.
    async fn settled(&self, seqs: &[u64]) {
        for _ in 0..100_000 {
            if seqs.iter().all(|s| self.last(*s).is_some()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("not settled: {:?}", self.log.lock().unwrap());
    }

    async fn close(mut self) -> Self {
        self.tx = None;
        (&mut self.task).await.unwrap();
        self
    }
}

/// The longest time any of `seqs` went without an ack of some kind while it was held (from `from` to its final ack).
fn longest_silence(h: &Harness, seqs: &[u64], from: Instant) -> Duration {
    seqs.iter()
        .map(|seq| {
            let mut last = from;
            let mut longest = Duration::ZERO;
            for (kind, at) in h.acks(*seq) {
                longest = longest.max(at - last);
                last = at;
                if kind != Ack::Progress {
                    break;
                }
            }
            longest
        })
        .max()
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_acked_after_it_commits() {
    let mut h = start(Database::default(), Letters::default());
    let seqs = h.send(&["evt_1", "evt_2", "evt_3"]).await;
    h.settled(&seqs).await;
    assert!(seqs.iter().all(|s| h.last(*s) == Some(Ack::Done)));
    assert_eq!(*h.database.batches.lock().unwrap(), vec![3]);
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn every_held_message_keeps_its_deadline_through_an_outage_longer_than_ack_wait() {
    let started = Instant::now();
    let database = Database {
        outage_until: Some(started + Duration::from_secs(180)),
        ..Database::default()
    };
    let mut h = start(database, Letters::default());
    let first = h.send(&["evt_a", "evt_b"]).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    // Received while the first batch waits out the outage: queued, not in a batch yet.
    let queued = h.send(&["evt_c"]).await;
    let all: Vec<u64> = first.iter().chain(&queued).copied().collect();
    h.settled(&all).await;
    assert!(all.iter().all(|s| h.last(*s) == Some(Ack::Done)));
    let silence = longest_silence(&h, &all, started + Duration::from_secs(20));
    assert!(
        silence < Duration::from_secs(10),
        "a held message went {silence:?} without an ack or extension (ack_wait 10 s, retry_max 60 s)"
    );
    assert!(started.elapsed() >= Duration::from_secs(180));
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_message_waiting_for_a_database_slot_keeps_its_deadline() {
    let mut h = start(Database::default(), Letters::default());
    let busy = h.slots.clone().acquire_owned().await.unwrap();
    let seqs = h.send(&["evt_1"]).await;
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert_eq!(h.last(seqs[0]), None, "no slot, no apply");
    assert!(
        longest_silence(&h, &seqs, Instant::now() - Duration::from_secs(40))
            < Duration::from_secs(10)
    );
    drop(busy);
    h.settled(&seqs).await;
    assert_eq!(h.last(seqs[0]), Some(Ack::Done));
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_rejected_event_is_parked_and_dead_lettered_while_the_partition_keeps_flowing() {
    let database = Database {
        poison: HashSet::from(["evt_bad".to_owned()]),
        ..Database::default()
    };
    let mut h = start(database, Letters::default());
    let batch = h.send(&["evt_1", "evt_bad", "evt_2"]).await;
    h.settled(&[batch[0], batch[2]]).await;
    let later = h.send(&["evt_3"]).await;
    h.settled(&later).await;
    assert_eq!(h.last(later[0]), Some(Ack::Done));
    assert_eq!(
        h.last(batch[1]),
        None,
        "the rejected event is still held, parked, while later events apply"
    );
    h.settled(&batch).await;
    assert_eq!(
        h.last(batch[1]),
        Some(Ack::Done),
        "acked once dead-lettered"
    );
    let stored = h.letters.stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 1);
    assert_eq!((stored[0].0, stored[0].1), (batch[1], 3));
    assert!(stored[0].2.contains("rejected by a trigger"), "{stored:?}");
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn an_error_that_always_recurs_is_dead_lettered_after_give_up_after_not_retried_forever() {
    let started = Instant::now();
    let database = Database {
        recurring: HashSet::from(["evt_slow".to_owned()]),
        ..Database::default()
    };
    let mut h = start(database, Letters::default());
    let seqs = h.send(&["evt_slow"]).await;
    h.settled(&seqs).await;
    assert_eq!(h.last(seqs[0]), Some(Ack::Done));
    assert_eq!(h.letters.stored.lock().unwrap().len(), 1);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(600) && waited < Duration::from_secs(700),
        "{waited:?}"
    );
    assert!(longest_silence(&h, &seqs, started) < Duration::from_secs(10));
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_event_goes_to_the_dead_letter_without_touching_the_database() {
    let mut h = start(Database::default(), Letters::default());
    h.send_raw(Bytes::from_static(b"not json")).await;
    h.settled(&[1]).await;
    assert_eq!(h.last(1), Some(Ack::Done));
    assert_eq!(h.letters.stored.lock().unwrap()[0].0, 1);
    assert!(h.database.batches.lock().unwrap().is_empty());
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_that_cannot_be_stored_yet_stays_held_and_is_tried_again() {
    let database = Database {
        poison: HashSet::from(["evt_bad".to_owned()]),
        ..Database::default()
    };
    let letters = Letters {
        refuse: Mutex::new(3),
        ..Letters::default()
    };
    let mut h = start(database, letters);
    let seqs = h.send(&["evt_bad"]).await;
    let started = Instant::now();
    h.settled(&seqs).await;
    assert_eq!(h.last(seqs[0]), Some(Ack::Done));
    assert_eq!(h.letters.stored.lock().unwrap().len(), 1);
    assert!(longest_silence(&h, &seqs, started) < Duration::from_secs(10));
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn stopping_during_an_outage_hands_everything_back_and_acks_nothing() {
    let database = Database {
        outage_until: Some(Instant::now() + Duration::from_secs(3600)),
        ..Database::default()
    };
    let mut h = start(database, Letters::default());
    let seqs = h.send(&["evt_1", "evt_2"]).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let h = h.close().await;
    for seq in seqs {
        assert_eq!(h.last(seq), Some(Ack::Nak));
        assert!(!h.acks(seq).iter().any(|(k, _)| *k == Ack::Done));
    }
}

#[tokio::test(start_paused = true)]
async fn stopping_finishes_the_batch_in_hand_and_hands_back_the_rest() {
    let database = Database {
        delay: Duration::from_secs(5),
        ..Database::default()
    };
    let mut h = start(database, Letters::default());
    let first = h.send(&["evt_1", "evt_2"]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waiting = h.send(&["evt_3"]).await;
    let h = h.close().await;
    assert!(first.iter().all(|s| h.last(*s) == Some(Ack::Done)));
    assert_eq!(h.last(waiting[0]), Some(Ack::Nak));
}

#[tokio::test(start_paused = true)]
async fn a_batch_takes_what_arrived_while_it_waited_for_a_slot() {
    let mut h = start(Database::default(), Letters::default());
    let busy = h.slots.clone().acquire_owned().await.unwrap();
    let seqs = h.send(&["evt_1"]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let more: Vec<String> = (2..=70).map(|i| format!("evt_{i}")).collect();
    let more: Vec<&str> = more.iter().map(String::as_str).collect();
    let more = h.send(&more).await;
    drop(busy);
    let all: Vec<u64> = seqs.into_iter().chain(more).collect();
    h.settled(&all).await;
    assert_eq!(
        *h.database.batches.lock().unwrap(),
        vec![50, 20],
        "the first batch is formed once the slot is free, full"
    );
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_message_applied_well_within_ack_wait_costs_no_extension() {
    let database = Database {
        delay: Duration::from_secs(2),
        ..Database::default()
    };
    let mut h = start(database, Letters::default());
    // Arrives just before the worker's periodic check, and is applied 2 s later.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let seqs = h.send(&["evt_1", "evt_2"]).await;
    h.settled(&seqs).await;
    for seq in &seqs {
        assert!(
            !h.acks(*seq).iter().any(|(k, _)| *k == Ack::Progress),
            "{:?}",
            h.acks(*seq)
        );
    }
    h.close().await;
}
