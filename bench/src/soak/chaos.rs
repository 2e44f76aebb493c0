//! The kills: every `kill_every`, alternately an ingest and an applier (each role's processes in turn), with
//! SIGKILL or SIGTERM, started again `restart_after` after the signal. No kill is scheduled so late that its process
//! would not be back before the load ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fleet::{Fleet, Role, wait_ready};
use super::{Config, Signals};

/// One kill and the restart after it; times in seconds from the start of the load.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Kill {
    pub at_s: f64,
    pub role: Role,
    pub index: usize,
    pub signal: &'static str,
    pub pid: u32,
    /// When the process was gone (SIGTERM: after its graceful stop).
    pub exited_s: f64,
    pub restarted_s: f64,
    /// When the new process answered its readiness probe.
    pub ready_s: f64,
}

impl Kill {
    /// `ingest-1`.
    pub(crate) fn slot(&self) -> String {
        format!("{}-{}", self.role.name(), self.index)
    }
}

/// Kills and restarts on schedule until the load's end; returns what it did.
pub(crate) async fn run(
    fleet: Arc<tokio::sync::Mutex<Fleet>>,
    config: Config,
    started: Instant,
) -> anyhow::Result<Vec<Kill>> {
    let mut kills: Vec<Kill> = Vec::new();
    let (mut ingest_kills, mut applier_kills) = (0usize, 0usize);
    for k in 1u32.. {
        let at = config.kill_every * k;
        if at + config.restart_after + Duration::from_secs(10) > config.duration() {
            break;
        }
        let (role, nth) = if k % 2 == 1 {
            ingest_kills += 1;
            (Role::Ingest, ingest_kills - 1)
        } else {
            applier_kills += 1;
            (Role::Applier, applier_kills - 1)
        };
        let index = nth
            % match role {
                Role::Ingest => config.ingests,
                Role::Applier => config.appliers,
            };
        let signal = match config.signals {
            Signals::Alternate if nth % 2 == 1 => "TERM",
            Signals::Alternate | Signals::Kill => "KILL",
        };
        tokio::time::sleep_until((started + at).into()).await;
        let proc = {
            let mut fleet = fleet.lock().await;
            // Its counters, just before it goes.
            fleet.scrape(Some((role, index))).await;
            let pid = fleet.pid(role, index);
            fleet.take(role, index).zip(pid)
        };
        let Some((proc, pid)) = proc else {
            continue;
        };
        let at_s = started.elapsed().as_secs_f64();
        if signal == "KILL" {
            // Dropping a `Proc` is SIGKILL and a wait.
            tokio::task::spawn_blocking(move || drop(proc)).await?;
        } else {
            proc.stop().await;
        }
        let exited_s = started.elapsed().as_secs_f64();
        tokio::time::sleep_until((started + at + config.restart_after).into()).await;
        let ready = fleet.lock().await.spawn(role, index)?;
        let restarted_s = started.elapsed().as_secs_f64();
        wait_ready(ready).await;
        let kill = Kill {
            at_s,
            role,
            index,
            signal,
            pid,
            exited_s,
            restarted_s,
            ready_s: started.elapsed().as_secs_f64(),
        };
        eprintln!(
            "  SIG{} {} (pid {pid}) at {at_s:.1} s, gone at {exited_s:.1} s, started again at {restarted_s:.1} s, ready at {:.1} s",
            kill.signal,
            kill.slot(),
            kill.ready_s
        );
        kills.push(kill);
    }
    Ok(kills)
}
