//! The soak's processes: N ingests (each on its own port, as behind a load balancer) and M appliers sharing one
//! consumer prefix, each in a slot that outlives its process: a killed process is started again in the same slot
//! (same ports), its RSS read from /proc and its counters scraped from `/metrics`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use stripe_sync_testkit::nats::free_port;

use crate::harness::{Proc, get_text, wait_http_ok};

/// What a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    Ingest,
    Applier,
}

impl Role {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Applier => "applier",
        }
    }

    /// The counter scraped from its `/metrics`, summed by `outcome`.
    fn counter(self) -> &'static str {
        match self {
            Self::Ingest => stripe_sync_shared::metrics::names::WEBHOOKS,
            Self::Applier => stripe_sync_shared::metrics::names::EVENTS_APPLIED,
        }
    }
}

/// One place in the fleet.
struct Slot {
    role: Role,
    index: usize,
    /// Ingest's webhook port (`None` for an applier).
    http_port: Option<u16>,
    metrics_port: u16,
    proc: Option<Proc>,
    incarnation: u32,
    /// Counters of this slot's ended processes, and of the running one at its last scrape.
    ended: BTreeMap<String, f64>,
    current: BTreeMap<String, f64>,
}

impl Slot {
    fn name(&self) -> String {
        format!("{}-{}", self.role.name(), self.index)
    }
}

/// The processes.
pub(crate) struct Fleet {
    slots: Vec<Slot>,
    ingest_bin: PathBuf,
    applier_bin: PathBuf,
    ingest_env: HashMap<String, String>,
    applier_env: HashMap<String, String>,
}

impl Fleet {
    /// Slots for `ingests` and `appliers`; nothing started yet. The envs are complete but for the ports.
    pub(crate) fn new(
        bins: &crate::harness::Binaries,
        ingest_env: HashMap<String, String>,
        applier_env: HashMap<String, String>,
        ingests: usize,
        appliers: usize,
    ) -> Self {
        let slot = |role, index, http_port| Slot {
            role,
            index,
            http_port,
            metrics_port: free_port(),
            proc: None,
            incarnation: 0,
            ended: BTreeMap::new(),
            current: BTreeMap::new(),
        };
        let slots = (0..ingests)
            .map(|i| slot(Role::Ingest, i, Some(free_port())))
            .chain((0..appliers).map(|i| slot(Role::Applier, i, None)))
            .collect();
        Self {
            slots,
            ingest_bin: bins.ingest.clone(),
            applier_bin: bins.applier.clone(),
            ingest_env,
            applier_env,
        }
    }

    /// The ingests' webhook ports, in slot order.
    pub(crate) fn ingest_ports(&self) -> Vec<u16> {
        self.slots.iter().filter_map(|s| s.http_port).collect()
    }

    /// Names of the slots (`ingest-0`...), in order.
    pub(crate) fn names(&self) -> Vec<String> {
        self.slots.iter().map(Slot::name).collect()
    }

    fn find(&self, role: Role, index: usize) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.role == role && s.index == index)
    }

    /// Starts the process of a slot; returns the port and path that answer 200 once it is ready.
    pub(crate) fn spawn(
        &mut self,
        role: Role,
        index: usize,
    ) -> anyhow::Result<(u16, &'static str)> {
        let i = self
            .find(role, index)
            .ok_or_else(|| anyhow::anyhow!("no slot {role:?} {index}"))?;
        let slot = &mut self.slots[i];
        let (bin, mut env, args): (_, _, &[&str]) = match role {
            Role::Ingest => (&self.ingest_bin, self.ingest_env.clone(), &[]),
            Role::Applier => (&self.applier_bin, self.applier_env.clone(), &["run"]),
        };
        env.insert("METRICS_PORT".into(), slot.metrics_port.to_string());
        if let Some(port) = slot.http_port {
            env.insert("PORT".into(), port.to_string());
        }
        let name = format!("soak-{}.{}", slot.name(), slot.incarnation);
        slot.proc = Some(Proc::spawn(bin, args, &env, &name)?);
        slot.incarnation += 1;
        Ok(match slot.http_port {
            Some(port) => (port, "/readyz"),
            None => (slot.metrics_port, "/readyz"),
        })
    }

    /// Takes a slot's process out (to kill it); its counters as last scraped count as ended.
    pub(crate) fn take(&mut self, role: Role, index: usize) -> Option<Proc> {
        let i = self.find(role, index)?;
        let slot = &mut self.slots[i];
        for (k, v) in std::mem::take(&mut slot.current) {
            *slot.ended.entry(k).or_default() += v;
        }
        slot.proc.take()
    }

    /// RSS (MiB) of each slot's process, `None` while it is down.
    pub(crate) fn rss(&self) -> Vec<Option<f64>> {
        self.slots
            .iter()
            .map(|s| s.proc.as_ref().map(Proc::rss_mib))
            .collect()
    }

    /// Pid of each slot's process, `None` while it is down.
    pub(crate) fn pids(&self) -> Vec<Option<u32>> {
        self.slots
            .iter()
            .map(|s| s.proc.as_ref().map(Proc::pid))
            .collect()
    }

    /// Peak RSS (VmHWM, MiB) of each slot's running process.
    pub(crate) fn peak_rss(&self) -> Vec<Option<f64>> {
        self.slots
            .iter()
            .map(|s| s.proc.as_ref().map(Proc::peak_rss_mib))
            .collect()
    }

    /// Pid of a slot's process.
    pub(crate) fn pid(&self, role: Role, index: usize) -> Option<u32> {
        self.slots[self.find(role, index)?]
            .proc
            .as_ref()
            .map(Proc::pid)
    }

    /// Reads the counters of the running processes (one slot, or all).
    pub(crate) async fn scrape(&mut self, only: Option<(Role, usize)>) {
        for slot in &mut self.slots {
            if slot.proc.is_none() || only.is_some_and(|(r, i)| (r, i) != (slot.role, slot.index)) {
                continue;
            }
            let Ok(Ok(text)) = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                get_text(slot.metrics_port, "/metrics"),
            )
            .await
            else {
                continue;
            };
            slot.current = sum_by_outcome(&text, slot.role.counter());
        }
    }

    /// A role's counters by outcome, over every process that ran in its slots.
    pub(crate) fn counters(&self, role: Role) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for slot in self.slots.iter().filter(|s| s.role == role) {
            for (k, v) in slot.ended.iter().chain(&slot.current) {
                *out.entry(k.clone()).or_default() += v;
            }
        }
        out
    }

    /// Stops every process (SIGTERM, bounded wait).
    pub(crate) async fn stop_all(&mut self) {
        let procs: Vec<Proc> = self
            .slots
            .iter_mut()
            .filter_map(|s| s.proc.take())
            .collect();
        for proc in procs {
            proc.stop().await;
        }
    }
}

/// Waits until a started process answers on its readiness port.
pub(crate) async fn wait_ready((port, path): (u16, &'static str)) {
    wait_http_ok(port, path).await;
}

/// `metric{...,outcome="x",...} v` lines summed by outcome.
fn sum_by_outcome(text: &str, metric: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let outcome = labels
            .split(',')
            .find_map(|l| l.strip_prefix("outcome=\""))
            .map_or("", |v| v.trim_end_matches('"'));
        if let Ok(v) = value.trim().parse::<f64>() {
            *out.entry(outcome.to_owned()).or_default() += v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_by_outcome_across_labels() {
        let text = "# TYPE x counter\n\
            stripe_sync_events_applied_total{object_type=\"customer\",outcome=\"applied\"} 3\n\
            stripe_sync_events_applied_total{object_type=\"invoice\",outcome=\"applied\"} 4\n\
            stripe_sync_events_applied_total{object_type=\"invoice\",outcome=\"duplicate\"} 2\n\
            stripe_sync_event_age_seconds_bucket{le=\"1\"} 9\n";
        let sums = sum_by_outcome(text, "stripe_sync_events_applied_total");
        assert_eq!(sums.get("applied"), Some(&7.0));
        assert_eq!(sums.get("duplicate"), Some(&2.0));
        assert_eq!(sums.len(), 2);
    }
}
