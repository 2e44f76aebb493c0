//! The soak's summary in markdown (stdout), from its report.

use std::fmt::Write as _;

use super::output::Report;

/// Thousands separated, as the docs write them.
fn n(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn outcome(map: &std::collections::BTreeMap<String, f64>, key: &str) -> u64 {
    map.get(key).map_or(0, |v| *v as u64)
}

/// The summary.
pub(crate) fn markdown(r: &Report) -> String {
    let c = &r.config;
    let v = &r.verdict;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Soak: {} min at {}/s, {} ingests, {} appliers, a kill every {:.0} s ({:?}), restarted {:.0} s after the signal.\n\
         Machine: {}; load average {:.2} before, {:.2} at most during the run.\n",
        c.minutes,
        c.rate,
        c.ingests,
        c.appliers,
        c.kill_every.as_secs_f64(),
        c.signals,
        c.restart_after.as_secs_f64(),
        r.machine,
        r.load_average_before,
        r.load_average_max
    );
    let failed: u64 = r.failed_attempts.values().sum();
    let by_cause: Vec<String> = r
        .failed_attempts
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {}", n(*v)))
        .collect();
    let worst = r
        .minutes
        .iter()
        .max_by(|a, b| a.latency.p99_ms.total_cmp(&b.latency.p99_ms));
    let not_newest: u64 = v.tables.iter().map(|t| t.not_newest).sum();
    let objects: u64 = v
        .tables
        .iter()
        .filter(|t| t.kind == "object")
        .map(|t| t.expected)
        .sum();
    let items: u64 = v
        .tables
        .iter()
        .filter(|t| t.kind != "object")
        .map(|t| t.expected)
        .sum();
    let rows = [
        (
            "events sent / answered 200",
            format!("{} / {}", n(r.sent), n(r.accepted)),
        ),
        (
            "events due but not sent (sender at its cap of unanswered events)",
            format!("{} (cap {})", n(r.not_offered), n(r.max_unanswered)),
        ),
        (
            "achieved rate (answered 200 per second of load)",
            format!("{:.1}/s over {:.0} s", r.achieved_rate, r.load_seconds),
        ),
        (
            "**lost** (answered 200, missing from `stripe.events`)",
            format!("**{}**", n(v.lost)),
        ),
        ("in `stripe.events` but never answered 200", n(v.unanswered)),
        (
            "**duplicated rows** (rows beyond distinct ids) / missing rows",
            format!(
                "**{}** / {} ({} objects in {} tables, {} list items)",
                n(v.extra_rows),
                n(v.missing_rows),
                n(objects),
                v.tables.iter().filter(|t| t.kind == "object").count(),
                n(items)
            ),
        ),
        (
            "object rows not holding their newest event's object",
            n(not_newest),
        ),
        (
            "redeliveries the applier found already applied (`outcome=\"duplicate\"`)",
            n(outcome(&r.applier_outcomes, "duplicate")),
        ),
        (
            "events older than their row (`outcome=\"stale\"`)",
            n(outcome(&r.applier_outcomes, "stale")),
        ),
        (
            "retried webhooks ingest found already in the stream (`outcome=\"duplicate\"`)",
            n(outcome(&r.ingest_outcomes, "duplicate")),
        ),
        ("dead letters", n(v.dead_letters)),
        (
            "partition hand-overs during the load: within 30 s of an applier's kill or restart / with no applier coming or going",
            format!(
                "{} / {}",
                r.handovers
                    .iter()
                    .filter(|h| h.t_s >= 0.0 && h.after_kill)
                    .count(),
                r.handovers
                    .iter()
                    .filter(|h| h.t_s >= 0.0 && !h.after_kill)
                    .count()
            ),
        ),
        (
            "failed delivery attempts (all retried until 200)",
            format!(
                "{} ({}); {} events needed a retry",
                n(failed),
                if by_cause.is_empty() {
                    "none".into()
                } else {
                    by_cause.join(", ")
                },
                n(r.retried_events)
            ),
        ),
        (
            "webhook 200 → row committed, p50 / p90 / p99 / p99.9 / max",
            format!(
                "{:.1} / {:.1} / {:.1} / {:.1} / {:.0} ms ({} events; {} not observed)",
                r.e2e.p50_ms,
                r.e2e.p90_ms,
                r.e2e.p99_ms,
                r.e2e.p999_ms,
                r.e2e.max_ms,
                n(r.e2e.events),
                n(r.latency_not_observed as u64)
            ),
        ),
        (
            "worst minute's p99 (by commit minute)",
            worst.map_or("-".into(), |m| {
                format!(
                    "{:.0} ms (minute {}, max {:.0} ms)",
                    m.latency.p99_ms,
                    m.minute + 1,
                    m.latency.max_ms
                )
            }),
        ),
        (
            "event age at commit (`_applied_at` − `created`, whole seconds), p50 / p99 / max",
            format!(
                "{:.2} / {:.2} / {:.1} s",
                r.event_age_s.0, r.event_age_s.1, r.event_age_s.2
            ),
        ),
        (
            "ingest's answer (200s), p50 / p99 / max",
            format!(
                "{:.2} / {:.2} / {:.0} ms",
                r.webhook.p50_ms, r.webhook.p99_ms, r.webhook.max_ms
            ),
        ),
        (
            "after the load: last 200 / drained",
            format!(
                "{} / {}",
                r.retry_tail_seconds
                    .map_or("never".into(), |s| format!("{s:.1} s")),
                r.drain_seconds
                    .map_or("not drained".into(), |s| format!("{s:.1} s later"))
            ),
        ),
    ];
    out += "| measure | result |\n|---|---|\n";
    for (k, v) in rows {
        let _ = writeln!(out, "| {k} | {v} |");
    }
    let load: Vec<_> = r
        .samples
        .iter()
        .filter(|s| s.phase == "load" && s.cpu.machine > 0.0)
        .collect();
    let mean = |f: &dyn Fn(&super::output::Sample) -> f64| {
        load.iter().map(|s| f(s)).sum::<f64>() / load.len().max(1) as f64
    };
    let role = |prefix: &'static str| {
        move |s: &super::output::Sample| {
            r.slots
                .iter()
                .zip(&s.cpu.slots)
                .filter(|(name, _)| name.starts_with(prefix))
                .filter_map(|(_, c)| *c)
                .sum::<f64>()
        }
    };
    let _ = writeln!(
        out,
        "\nCPU during the load, mean, % of one core: machine {:.0}, Postgres (all its processes) {:.0}, NATS {:.0}, \
         ingests {:.0}, appliers {:.0}, this benchmark {:.0}.",
        mean(&|s| s.cpu.machine),
        mean(&|s| s.cpu.postgres),
        mean(&|s| s.cpu.nats),
        mean(&role("ingest")),
        mean(&role("applier")),
        mean(&|s| s.cpu.bench)
    );
    let window = r.rss_window_s / 60.0;
    let _ = writeln!(
        out,
        "\n| RSS (MiB) | mean, first {window:.0} min | mean, last {window:.0} min | max |\n|---|---|---|---|"
    );
    for rss in r.rss_by_role.iter().chain(&r.rss_by_slot) {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.1} |",
            rss.name, rss.first_mean, rss.last_mean, rss.max
        );
    }
    out += "\n| kill | at | signal | process | gone | ready again |\n|---|---|---|---|---|---|\n";
    for (i, k) in r.kills.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {:.0} s | SIG{} | {} (pid {}) | +{:.1} s | +{:.1} s |",
            i + 1,
            k.at_s,
            k.signal,
            k.slot(),
            k.pid,
            k.exited_s - k.at_s,
            k.ready_s - k.at_s
        );
    }
    out += "\n| minute | events committed | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n";
    for m in &r.minutes {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {:.0} |",
            m.minute + 1,
            n(m.latency.events),
            m.latency.p50_ms,
            m.latency.p99_ms,
            m.latency.max_ms
        );
    }
    if v.lost > 0 {
        let _ = writeln!(out, "\nLost ids (first 20): {}", v.lost_sample.join(", "));
    }
    for t in v
        .tables
        .iter()
        .filter(|t| t.not_newest > 0 || t.rows != t.expected)
    {
        let _ = writeln!(
            out,
            "\nTable {}: {} rows for {} ids, {} not newest (e.g. {})",
            t.table,
            t.rows,
            t.expected,
            t.not_newest,
            t.not_newest_sample.join(", ")
        );
    }
    out
}
