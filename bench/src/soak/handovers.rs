//! Partition hand-overs, read back from the appliers' logs (`handing partitions over`, logged each time an applier
//! gives partitions up because the members it sees changed): after a kill they are expected; any others mean the
//! appliers saw the membership change while no applier came or went.

use std::path::Path;

use super::chaos::Kill;
use super::fleet::Role;

/// One applier giving partitions up.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Handover {
    /// Seconds from the start of the load.
    pub t_s: f64,
    /// The log it is from (`soak-applier-1.0`: slot 1, first process).
    pub log: String,
    /// Members that applier saw.
    pub members: u64,
    pub partitions: String,
    /// Within 30 s after an applier's kill or restart.
    pub after_kill: bool,
}

/// The hand-overs in `dir`'s applier logs written since `started_unix`.
pub(crate) fn read(dir: &Path, started_unix: f64, kills: &[Kill]) -> Vec<Handover> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let fresh = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .is_some_and(|t| t.as_secs_f64() >= started_unix - 120.0);
        if !name.starts_with("soak-applier-") || !fresh {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text
            .lines()
            .filter(|l| l.contains("handing partitions over"))
        {
            let Ok(log) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let Some(at) = log["timestamp"].as_str().and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            }) else {
                continue;
            };
            let t_s = (at.unix_timestamp_nanos() as f64 / 1e9) - started_unix;
            let after_kill = kills.iter().filter(|k| k.role == Role::Applier).any(|k| {
                (k.at_s..k.at_s + 30.0).contains(&t_s)
                    || (k.ready_s..k.ready_s + 30.0).contains(&t_s)
            });
            out.push(Handover {
                t_s,
                log: name.trim_end_matches(".log").to_owned(),
                members: log["members"].as_u64().unwrap_or(0),
                partitions: log["to_stop"].as_str().unwrap_or("").to_owned(),
                after_kill,
            });
        }
    }
    out.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    out
}
