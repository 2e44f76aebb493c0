//! The Grafana dashboard and the Prometheus alert rules in deploy/ can't be loaded here (no Prometheus, no Grafana):
//! they are parsed and checked against the code. Every metric they query is one the binaries export, every alert
//! says how bad it is and links a runbook that exists in docs/operations.md. (The Kubernetes manifests: k8s.rs.)

use std::collections::BTreeSet;
use std::path::Path;

use stripe_sync_shared::metrics::names;

pub(crate) fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

pub(crate) fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap()
}

/// The `stripe_sync_*` metrics a PromQL expression reads (a histogram's `_bucket`, `_sum`, `_count` as the histogram).
fn metrics_of(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("stripe_sync_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| names::ALL.contains(base))
            .map_or(name.clone(), str::to_owned);
        out.insert(base);
    }
    out
}

/// GitHub's anchors of the markdown headings in `doc`.
fn anchors(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter_map(|l| {
            l.trim_start_matches('#')
                .strip_prefix(' ')
                .filter(|_| l.starts_with('#'))
        })
        .map(|heading| {
            heading
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

#[test]
fn the_alert_rules_watch_what_the_code_exports_and_link_runbooks_that_exist() {
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("deploy/prometheus/alerts.yml")).unwrap();
    let operations = anchors(&read("docs/operations.md"));
    let mut watched = BTreeSet::new();
    let rules = rules["groups"][0]["rules"].as_sequence().unwrap();
    for rule in rules {
        let name = rule["alert"].as_str().unwrap();
        let expr = rule["expr"].as_str().unwrap();
        let used = metrics_of(expr);
        assert!(
            !used.is_empty() || expr.contains("up{"),
            "{name} reads no stripe-sync metric"
        );
        for metric in &used {
            assert!(
                names::ALL.contains(&metric.as_str()),
                "{name} reads {metric}, which the binaries don't export"
            );
        }
        watched.extend(used);
        assert!(
            rule["for"].as_str().is_some(),
            "{name} fires only after a while, not on one scrape"
        );
        assert!(
            matches!(rule["labels"]["severity"].as_str(), Some("page" | "warn")),
            "{name} has a severity"
        );
        assert!(
            rule["annotations"]["summary"].as_str().is_some(),
            "{name} says what is wrong"
        );
        let runbook = rule["annotations"]["runbook"].as_str().unwrap();
        let anchor = runbook.strip_prefix("docs/operations.md#").unwrap();
        assert!(
            operations.contains(anchor),
            "{name}'s runbook #{anchor} is a heading of docs/operations.md"
        );
    }
    for must in [
        names::DEAD_LETTERS,
        names::PARTITION_LAG,
        names::EVENT_AGE,
        names::WEBHOOKS,
    ] {
        assert!(watched.contains(must), "an alert watches {must}");
    }
}

#[test]
fn every_dashboard_panel_queries_metrics_the_code_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/stripe-sync.json")).unwrap();
    let mut shown = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has a query");
        for target in targets {
            for metric in metrics_of(target["expr"].as_str().unwrap()) {
                assert!(
                    names::ALL.contains(&metric.as_str()),
                    "{title} queries {metric}, which the binaries don't export"
                );
                shown.insert(metric);
            }
        }
    }
    for must in [
        names::WEBHOOKS,
        names::EVENTS_APPLIED,
        names::PARTITION_LAG,
        names::EVENT_AGE,
        names::DEAD_LETTERS,
        names::RATE_LIMITED,
    ] {
        assert!(shown.contains(must), "the dashboard shows {must}");
    }
}
