//! Progress of a backfill: objects published per type, reported every few seconds as a progress bar on a terminal,
//! or as JSON lines (objects, objects/s, per type) otherwise, for logs and for `GET /jobs/<id>`.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Counts shared by every task of a backfill.
#[derive(Debug, Clone)]
pub struct Progress {
    inner: Arc<Mutex<Counts>>,
}

#[derive(Debug)]
struct Counts {
    started: Instant,
    by_type: BTreeMap<String, u64>,
    /// Per type: seconds of `created` paged so far, and in all.
    spans: BTreeMap<String, (i64, i64)>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Counts {
                started: Instant::now(),
                by_type: BTreeMap::new(),
                spans: BTreeMap::new(),
            })),
        }
    }
}

impl Counts {
    /// The share done, 0 to 1. Stripe's lists have no total: it is the share of each type's `created` span paged
    /// so far (spans found empty left out), averaged over types.
    fn done_share(&self) -> f64 {
        let shares: Vec<f64> = self
            .spans
            .values()
            .filter(|(_, total)| *total > 0)
            .map(|(done, total)| (*done as f64 / *total as f64).min(1.0))
            .collect();
        if shares.is_empty() {
            0.0
        } else {
            shares.iter().sum::<f64>() / shares.len() as f64
        }
    }
}

impl Progress {
    /// `n` objects of `kind` published.
    pub fn add(&self, kind: &str, n: u64) {
        metrics::counter!(stripe_sync_shared::metrics::names::BACKFILL_OBJECTS).increment(n);
        if let Ok(mut counts) = self.inner.lock() {
            *counts.by_type.entry(kind.to_owned()).or_default() += n;
        }
    }

    /// `seconds` more of `kind`'s `created` span to page.
    pub fn to_page(&self, kind: &str, seconds: i64) {
        if let Ok(mut counts) = self.inner.lock() {
            counts.spans.entry(kind.to_owned()).or_default().1 += seconds.max(0);
        }
    }

    /// `seconds` of `kind`'s span paged; `empty`: they held no object, so they leave the estimate altogether (a
    /// type's objects are rarely spread over its whole span: years before the first customer are empty, and
    /// counting them as done would promise an early end).
    pub fn paged(&self, kind: &str, seconds: i64, empty: bool) {
        if let Ok(mut counts) = self.inner.lock() {
            let span = counts.spans.entry(kind.to_owned()).or_default();
            if empty {
                span.1 = (span.1 - seconds.max(0)).max(span.0);
            } else {
                span.0 += seconds.max(0);
            }
        }
    }

    /// Objects published so far.
    #[must_use]
    pub fn published(&self) -> u64 {
        self.inner
            .lock()
            .map(|c| c.by_type.values().sum())
            .unwrap_or(0)
    }

    /// The state as JSON: objects, objects/s since the start, per type.
    #[must_use]
    pub fn json(&self) -> Value {
        let Ok(counts) = self.inner.lock() else {
            return Value::Null;
        };
        let objects: u64 = counts.by_type.values().sum();
        let elapsed = counts.started.elapsed().as_secs_f64();
        let done = counts.done_share();
        let eta = (done > 0.0).then(|| (elapsed * (1.0 - done) / done).round());
        json!({
            "objects": objects,
            "objects_per_second": (objects as f64 / elapsed.max(1e-3)).round(),
            "elapsed_seconds": elapsed.round(),
            "eta_seconds": eta,
            "types": counts.by_type,
        })
    }

    /// Reports every `every` until the future is dropped: a bar on a terminal, else one JSON line each time.
    pub async fn report(self, every: Duration) {
        let terminal = std::io::stderr().is_terminal();
        let bar = terminal.then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar
        });
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let state = self.json();
            match &bar {
                Some(bar) => {
                    let types: Vec<String> = state["types"]
                        .as_object()
                        .map(|t| t.iter().map(|(k, v)| format!("{k} {v}")).collect())
                        .unwrap_or_default();
                    let eta = state["eta_seconds"]
                        .as_f64()
                        .map_or_else(|| "?".to_owned(), |s| format!("{s:.0}s"));
                    bar.set_message(format!(
                        "{} objects, {}/s, ETA {eta} | {}",
                        state["objects"],
                        state["objects_per_second"],
                        types.join(", ")
                    ));
                    bar.tick();
                }
                None => eprintln!("{}", json!({ "backfill_progress": state })),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(p: &Progress) -> f64 {
        p.inner.lock().unwrap().done_share()
    }

    #[test]
    fn empty_years_do_not_make_the_estimate_promise_an_early_end() {
        let p = Progress::default();
        // Ten years of span, the objects all in the last one.
        p.to_page("customer", 10_000);
        p.paged("customer", 500, false);
        assert!((share(&p) - 0.05).abs() < 1e-9);
        // A split's older half, years before the first customer, is found empty: it leaves the estimate.
        p.paged("customer", 9_000, true);
        assert!((share(&p) - 0.5).abs() < 1e-9, "{}", share(&p));
        p.paged("customer", 500, false);
        assert!((share(&p) - 1.0).abs() < 1e-9);
        // Two types: the average.
        p.to_page("invoice", 100);
        p.paged("invoice", 25, false);
        assert!((share(&p) - 0.625).abs() < 1e-9);
    }
}
