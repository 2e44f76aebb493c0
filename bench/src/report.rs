//! Results: a markdown summary on stdout, raw numbers in bench/out/results.json, and the chart (PNG).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::applier::Drain;
use crate::ceiling::Ceiling;

/// Everything one `all` run measured.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Results {
    pub machine: String,
    pub ingest: Option<crate::ingest::Report>,
    pub drains: Vec<Drain>,
    pub ceiling: Option<Ceiling>,
    pub e2e: Option<crate::e2e::Report>,
    pub backlog: Option<Drain>,
    pub backlog_ingest_peak_rss_mib: Option<f64>,
}

/// Registers the bundled font as "sans-serif", the one every chart writes with.
pub(crate) fn register_sans_serif() -> anyhow::Result<()> {
    register_font(
        "sans-serif",
        FontStyle::Normal,
        include_bytes!("../assets/DejaVuSans.ttf"),
    )
    .map_err(|_| anyhow::anyhow!("font"))
}

/// CPU model, cores and memory, for the record.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    format!("{cpu}, {cores} cores, {mem} GiB")
}

impl Results {
    pub(crate) fn markdown(&self) -> String {
        let mut out = format!("Machine: {}\n\n", self.machine);
        if let Some(i) = &self.ingest {
            out += &format!(
                "| ingest, {} connections | req/s | p50 ms | p99 ms | peak RSS MiB |\n|---|---|---|---|---|\n\
                 | stripe-sync-ingest (durable ack) | {:.0} | {:.2} | {:.2} | {:.1} |\n\
                 | no-op axum (ceiling) | {:.0} | {:.2} | {:.2} | {:.1} |\n\
                 | ratio to ceiling | {:.0} % | | | |\n\n",
                i.connections,
                i.ingest.rate,
                i.ingest.p50_ms,
                i.ingest.p99_ms,
                i.ingest.peak_rss_mib,
                i.noop.rate,
                i.noop.p50_ms,
                i.noop.p99_ms,
                i.noop.peak_rss_mib,
                100.0 * i.ingest.rate / i.noop.rate
            );
            // Both costs on the same two cores: a request needs its HTTP work and its durable publish.
            let bound = 1.0 / (1.0 / i.noop.rate + 1.0 / i.jetstream_only);
            out += &format!(
                "JetStream alone (same bodies, {} concurrent publishers awaiting acks, no HTTP): {:.0} publishes/s. \
                 HTTP and JetStream together on this machine: at most 1/(1/{:.0} + 1/{:.0}) = {:.0} req/s; \
                 ingest reaches {:.0} % of that bound.\n\n",
                i.connections,
                i.jetstream_only,
                i.noop.rate,
                i.jetstream_only,
                bound,
                100.0 * i.ingest.rate / bound
            );
        }
        if !self.drains.is_empty() {
            out += "| appliers | events | events/s | peak RSS MiB (max of appliers) |\n|---|---|---|---|\n";
            for d in &self.drains {
                out += &format!(
                    "| {} | {} | {:.0} | {:.1} |\n",
                    d.appliers, d.events, d.rate, d.peak_rss_mib
                );
            }
            out += "\n";
        }
        if let Some(c) = &self.ceiling {
            let by: Vec<String> = c
                .by_connections
                .iter()
                .map(|(n, r)| format!("{n} conn: {r:.0}/s"))
                .collect();
            out += &format!(
                "Postgres ceiling (COPY + INSERT ON CONFLICT, batches of {}): best {:.0} events/s ({})\n",
                c.batch,
                c.best,
                by.join(", ")
            );
            if let Some(one) = self.drains.iter().find(|d| d.appliers == 1) {
                out += &format!(
                    "One applier: {:.0} % of the ceiling.\n",
                    100.0 * one.rate / c.best
                );
            }
            out += "\n";
        }
        if let Some(e) = &self.e2e {
            out += &format!(
                "End to end at {}/s for {} s ({} events): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms; \
                 ingest answers p50 {:.2} ms, p99 {:.2} ms; peak RSS ingest {:.1} MiB, applier {:.1} MiB\n\n",
                e.rate,
                e.seconds,
                e.latency.events,
                e.latency.p50_ms,
                e.latency.p90_ms,
                e.latency.p99_ms,
                e.latency.p999_ms,
                e.latency.max_ms,
                e.http_p50_ms,
                e.http_p99_ms,
                e.ingest_peak_rss_mib,
                e.applier_peak_rss_mib
            );
        }
        if let Some(b) = &self.backlog {
            out += &format!(
                "Backlog of {} events drained by one applier at {:.0} events/s; applier peak RSS {:.1} MiB (RSS each second: {})\n",
                b.events,
                b.rate,
                b.peak_rss_mib,
                b.rss_samples_mib
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        if let Some(rss) = self.backlog_ingest_peak_rss_mib {
            out += &format!(
                "Ingest peak RSS under load with that backlog in the stream: {rss:.1} MiB\n"
            );
        }
        out
    }

    /// Draws throughput by number of appliers (with the Postgres ceiling) and latency percentiles.
    pub(crate) fn chart(&self, path: &Path) -> anyhow::Result<()> {
        register_sans_serif()?;
        let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(700);

        let max_rate = self
            .drains
            .iter()
            .map(|d| d.rate)
            .chain(self.ceiling.as_ref().map(|c| c.best))
            .fold(1.0, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&left)
            .caption("Applier throughput (events/s)", ("sans-serif", 24))
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0.5f64..4.5f64, 0f64..max_rate)?;
        chart
            .configure_mesh()
            .x_desc("appliers")
            .y_desc("events/s")
            .x_labels(4)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        let points: Vec<(f64, f64)> = self
            .drains
            .iter()
            .map(|d| (d.appliers as f64, d.rate))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), BLUE.stroke_width(3)))?
            .label("stripe-sync-applier")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 5, BLUE.filled())))?;
        if let Some(c) = &self.ceiling {
            chart
                .draw_series(LineSeries::new(
                    vec![(0.5, c.best), (4.5, c.best)],
                    RED.stroke_width(2),
                ))?
                .label("Postgres ceiling (COPY + upsert)")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE)
            .border_style(BLACK)
            .draw()?;

        let quantiles = [("p50", 0usize), ("p90", 1), ("p99", 2), ("p99.9", 3)];
        let ingest: Vec<f64> = self.ingest.as_ref().map_or(vec![], |i| {
            vec![
                i.ingest.p50_ms,
                i.ingest.p90_ms,
                i.ingest.p99_ms,
                i.ingest.p999_ms,
            ]
        });
        let e2e: Vec<f64> = self.e2e.as_ref().map_or(vec![], |e| {
            let l = &e.latency;
            vec![l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms]
        });
        let max_ms = ingest.iter().chain(e2e.iter()).copied().fold(1.0, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(&right)
            .caption("Latency percentiles (ms)", ("sans-serif", 24))
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..3.5f64, 0f64..max_ms)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("ms")
            .x_labels(4)
            .x_label_formatter(&|x| {
                quantiles
                    .iter()
                    .find(|q| (q.1 as f64 - x).abs() < 0.01)
                    .map_or(String::new(), |q| q.0.to_owned())
            })
            .draw()?;
        let series = [
            (
                ingest,
                GREEN,
                format!(
                    "ingest, {} conns, max throughput",
                    self.ingest.as_ref().map_or(0, |i| i.connections)
                ),
            ),
            (
                e2e,
                MAGENTA,
                format!(
                    "webhook 200 -> row committed, {}/s",
                    self.e2e.as_ref().map_or(0, |e| e.rate)
                ),
            ),
        ];
        for (values, color, label) in series {
            if values.is_empty() {
                continue;
            }
            let points: Vec<(f64, f64)> = values
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64, *v))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(points.iter().map(|p| Circle::new(*p, 5, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE)
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
