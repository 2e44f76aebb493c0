//! Waiting for a dependency (Postgres, NATS, the events stream) that may not be there yet: one loop for every place
//! that waits. It retries with a growing pause and a warning each time; to stop waiting (a shutdown signal), drop
//! the future, e.g. in a `tokio::select!` against the signal.

use std::future::Future;
use std::time::Duration;

/// One attempt's failure.
#[derive(Debug)]
pub enum Attempt {
    /// Not there yet: try again.
    NotYet(anyhow::Error),
    /// Can never work (a server too old, a stream of another shape): stop waiting.
    Fatal(anyhow::Error),
}

impl Attempt {
    /// Classifies any error as "not yet".
    pub fn not_yet(err: impl Into<anyhow::Error>) -> Self {
        Self::NotYet(err.into())
    }
}

/// First pause between attempts.
pub const FIRST_PAUSE: Duration = Duration::from_millis(200);
/// Longest pause between attempts.
pub const LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// Calls `attempt` until it succeeds or fails fatally, pausing 200 ms, doubling up to 5 s, between attempts and
/// logging a warning naming `what` each time.
pub async fn until_ready<T, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt>>,
{
    let mut pause = FIRST_PAUSE;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(Attempt::Fatal(err)) => return Err(err),
            Err(Attempt::NotYet(err)) => {
                tracing::warn!(error = %format!("{err:#}"), retry_in = ?pause, "waiting for {what}");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_with_growing_pauses_until_ready() {
        let started = tokio::time::Instant::now();
        let mut calls = 0;
        let value = until_ready("a test dependency", || {
            calls += 1;
            let ready = calls == 6;
            async move {
                if ready {
                    Ok(calls)
                } else {
                    Err(Attempt::not_yet(anyhow::anyhow!("not yet")))
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(value, 6);
        // 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s
        assert_eq!(started.elapsed(), Duration::from_millis(6200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_failure_stops_waiting_at_once() {
        let err = until_ready::<(), _, _>("a test dependency", || async {
            Err(Attempt::Fatal(anyhow::anyhow!("server too old")))
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("too old"));
    }
}
