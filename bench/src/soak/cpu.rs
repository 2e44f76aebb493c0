//! Where the machine's CPU goes, from /proc: the whole machine's busy share, each soak process's, and every
//! `postgres` and `nats-server` process's together (the Postgres server is shared with anything else using it).

use std::collections::HashMap;

/// Clock ticks per second of /proc's CPU times (`USER_HZ`, 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU use over one window, in percent of one core (200 = both cores of a 2-core machine).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Usage {
    /// The whole machine.
    pub machine: f64,
    pub postgres: f64,
    pub nats: f64,
    /// This benchmark's own process (the load generator and the commit clock).
    pub bench: f64,
    /// Each slot's process, in slot order (`None`: down).
    pub slots: Vec<Option<f64>>,
}

/// Reads CPU times between calls.
#[derive(Default)]
pub(crate) struct Meter {
    last_machine: Option<(u64, u64)>,
    last_by_pid: HashMap<u32, u64>,
    last_at: Option<std::time::Instant>,
}

/// utime + stime of a process, in ticks, and its command name.
fn process(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based), so 11 and 12 here.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((name, ticks))
}

/// (busy, total) ticks of the machine.
fn machine() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4)?;
    Some((total - idle, total))
}

impl Meter {
    /// Use since the last call; `slots` are the soak's processes' pids.
    pub(crate) fn take(&mut self, slots: &[Option<u32>]) -> Usage {
        let now = std::time::Instant::now();
        let seconds = self
            .last_at
            .map_or(0.0, |at| now.duration_since(at).as_secs_f64());
        self.last_at = Some(now);
        let mut by_pid = HashMap::new();
        let (mut postgres, mut nats, mut bench) = (0u64, 0u64, 0u64);
        let me = std::process::id();
        for pid in std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            let Some((name, ticks)) = process(pid) else {
                continue;
            };
            let delta = ticks.saturating_sub(*self.last_by_pid.get(&pid).unwrap_or(&ticks));
            if pid == me {
                bench += delta;
            }
            match name.as_str() {
                "postgres" => postgres += delta,
                "nats-server" => nats += delta,
                _ => {}
            }
            by_pid.insert(pid, ticks);
        }
        let percent = |ticks: u64| {
            if seconds > 0.0 {
                100.0 * ticks as f64 / TICKS / seconds
            } else {
                0.0
            }
        };
        let slots = slots
            .iter()
            .map(|pid| {
                let pid = (*pid)?;
                let ticks = *by_pid.get(&pid)?;
                Some(percent(ticks.saturating_sub(*self.last_by_pid.get(&pid)?)))
            })
            .collect();
        let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        let machine_now = machine();
        let machine = match (self.last_machine, machine_now) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                100.0 * cores * (b1 - b0) as f64 / (t1 - t0) as f64
            }
            _ => 0.0,
        };
        self.last_machine = machine_now;
        self.last_by_pid = by_pid;
        Usage {
            machine,
            postgres: percent(postgres),
            nats: percent(nats),
            bench: percent(bench),
            slots,
        }
    }
}
