//! The soak's chart (PNG, like docs/benchmarks.png): throughput, latency and the RSS of every process over time,
//! each kill marked by a vertical line (red: an ingest, orange: an applier).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::fleet::Role;
use super::output::{Report, Sample};

const ORANGE: RGBColor = RGBColor(255, 140, 0);

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Draws the chart to `path`.
pub(crate) fn draw(r: &Report, path: &Path) -> anyhow::Result<()> {
    crate::report::register_sans_serif()?;
    let root = BitMapBackend::new(path, (1400, 1640)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "Soak: {} min at {}/s, {} ingests + {} appliers, one killed every {:.0} s",
        r.config.minutes,
        r.config.rate,
        r.config.ingests,
        r.config.appliers,
        r.config.kill_every.as_secs_f64()
    );
    let root = root.titled(&title, ("sans-serif", 26))?;
    let panels = root.split_evenly((4, 1));
    let x_max = r.samples.last().map_or(1.0, |s| s.t_s / 60.0).max(1.0);
    throughput(r, &panels[0], x_max)?;
    latency(r, &panels[1], x_max)?;
    memory(r, &panels[2], x_max)?;
    cpu(r, &panels[3], x_max)?;
    root.present()?;
    Ok(())
}

type Chart<'a, 'b, Y> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>;

/// A panel: its caption, axes (x in minutes), mesh, and a vertical line at each kill from `low` up.
fn frame<'a, 'b: 'a, Y>(
    r: &Report,
    area: &'a Area<'b>,
    caption: &str,
    (x_max, y): (f64, Y),
    y_desc: &str,
    low: f64,
) -> anyhow::Result<Chart<'a, 'b, Y::CoordDescType>>
where
    Y: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, y)?;
    let high = chart.y_range().end;
    chart
        .configure_mesh()
        .x_desc("minutes")
        .y_desc(y_desc)
        .draw()?;
    chart.draw_series(kill_lines(r, low, high))?;
    Ok(chart)
}

/// A labelled line of `points`.
fn line<Y>(
    chart: &mut Chart<'_, '_, Y>,
    points: Vec<(f64, f64)>,
    label: &str,
    color: RGBColor,
) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    Ok(())
}

/// The chart's legend at `position`.
fn legend<'a, 'b: 'a, Y>(
    chart: &mut Chart<'a, 'b, Y>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn minutes(s: &Sample) -> f64 {
    s.t_s / 60.0
}

/// Vertical lines at each kill, from `low` to `high`.
fn kill_lines(r: &Report, low: f64, high: f64) -> Vec<PathElement<(f64, f64)>> {
    r.kills
        .iter()
        .map(|k| {
            let color = if k.role == Role::Ingest { RED } else { ORANGE };
            let x = k.at_s / 60.0;
            PathElement::new(vec![(x, low), (x, high)], color.stroke_width(2))
        })
        .collect()
}

fn throughput(r: &Report, area: &Area<'_>, x_max: f64) -> anyhow::Result<()> {
    let y_max = r
        .samples
        .iter()
        .map(|s| s.accepted_per_s.max(s.committed_per_s))
        .fold(f64::from(r.config.rate), f64::max)
        * 1.15;
    let mut chart = frame(
        r,
        area,
        "events per second (10 s windows)",
        (x_max, 0f64..y_max),
        "events/s",
        0.0,
    )?;
    for k in &r.kills {
        let label = format!("{} SIG{}", k.slot(), k.signal);
        chart.draw_series(std::iter::once(Text::new(
            label,
            (x_max.mul_add(0.004, k.at_s / 60.0), y_max * 0.97),
            ("sans-serif", 13),
        )))?;
    }
    let series: [(&str, RGBColor, fn(&Sample) -> f64); 3] = [
        ("answered 200", BLUE, |s| s.accepted_per_s),
        ("committed", GREEN, |s| s.committed_per_s),
        ("failed attempts (retried)", MAGENTA, |s| {
            s.failed_attempts as f64 / 10.0
        }),
    ];
    for (label, color, value) in series {
        let points = r.samples.iter().map(|s| (minutes(s), value(s))).collect();
        line(&mut chart, points, label, color)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
    Ok(())
}

fn latency(r: &Report, area: &Area<'_>, x_max: f64) -> anyhow::Result<()> {
    let floor = 0.5;
    let y_max = r
        .samples
        .iter()
        .filter_map(|s| s.e2e_max_ms)
        .fold(100.0, f64::max)
        * 2.0;
    let mut chart = frame(
        r,
        area,
        "latency, ms (log scale; 10 s windows, by commit time)",
        (x_max, (floor..y_max).log_scale()),
        "ms",
        floor,
    )?;
    let series: [(&str, RGBColor, fn(&Sample) -> Option<f64>); 4] = [
        ("200 -> committed, max", RGBColor(200, 160, 220), |s| {
            s.e2e_max_ms
        }),
        ("200 -> committed, p99", MAGENTA, |s| s.e2e_p99_ms),
        ("200 -> committed, p50", BLUE, |s| s.e2e_p50_ms),
        ("ingest's answer, p99", GREEN, |s| s.webhook_p99_ms),
    ];
    for (label, color, value) in series {
        let points: Vec<(f64, f64)> = r
            .samples
            .iter()
            .filter_map(|s| value(s).map(|v| (minutes(s), v.max(floor))))
            .collect();
        line(&mut chart, points, label, color)?;
    }
    // Hand-overs no kill explains: a triangle at the bottom.
    chart
        .draw_series(
            r.handovers
                .iter()
                .filter(|h| h.t_s >= 0.0 && !h.after_kill)
                .map(|h| TriangleMarker::new((h.t_s / 60.0, floor * 1.3), 6, BLACK.filled())),
        )?
        .label("partition hand-over, no applier killed")
        .legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, BLACK.filled()));
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}

fn memory(r: &Report, area: &Area<'_>, x_max: f64) -> anyhow::Result<()> {
    let y_max = r
        .samples
        .iter()
        .flat_map(|s| s.rss_mib.iter().flatten().copied())
        .fold(10.0, f64::max)
        * 1.2;
    let mut chart = frame(
        r,
        area,
        "RSS of each process, MiB (a gap: killed, until restarted)",
        (x_max, 0f64..y_max),
        "MiB",
        0.0,
    )?;
    for (i, name) in r.slots.iter().enumerate() {
        let color = Palette99::pick(i + 1).to_rgba();
        // One line per run of samples with the process up.
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for s in &r.samples {
            match s.rss_mib.get(i).copied().flatten() {
                Some(v) => runs
                    .last_mut()
                    .into_iter()
                    .for_each(|run| run.push((minutes(s), v))),
                None => runs.push(Vec::new()),
            }
        }
        for (j, run) in runs.into_iter().filter(|run| !run.is_empty()).enumerate() {
            let drawn = chart.draw_series(LineSeries::new(run, color.stroke_width(2)))?;
            if j == 0 {
                drawn.label(name.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
        }
    }
    legend(&mut chart, SeriesLabelPosition::MiddleLeft)?;
    Ok(())
}

fn cpu(r: &Report, area: &Area<'_>, x_max: f64) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
    let y_max = 100.0 * cores * 1.1;
    let mut chart = frame(
        r,
        area,
        "CPU, % of one core (the machine's top line: all its cores)",
        (x_max, 0f64..y_max),
        "%",
        0.0,
    )?;
    let role = |prefix: &'static str| {
        move |s: &Sample| -> f64 {
            r.slots
                .iter()
                .zip(&s.cpu.slots)
                .filter(|(name, _)| name.starts_with(prefix))
                .filter_map(|(_, c)| *c)
                .sum()
        }
    };
    let (ingests, appliers) = (role("ingest"), role("applier"));
    let series: [(&str, RGBColor, &dyn Fn(&Sample) -> f64); 6] = [
        ("machine", BLACK, &|s| s.cpu.machine),
        ("Postgres", BLUE, &|s| s.cpu.postgres),
        ("NATS", GREEN, &|s| s.cpu.nats),
        ("ingests", RED, &ingests),
        ("appliers", ORANGE, &appliers),
        ("benchmark (load + clock)", RGBColor(150, 150, 150), &|s| {
            s.cpu.bench
        }),
    ];
    for (label, color, value) in series {
        let points = r
            .samples
            .iter()
            .filter(|s| s.cpu.machine > 0.0)
            .map(|s| (minutes(s), value(s)))
            .collect();
        line(&mut chart, points, label, color)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
    Ok(())
}
