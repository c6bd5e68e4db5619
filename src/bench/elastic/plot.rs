//! The scenario's figure: one panel per system, throughput per 100 ms over time against the
//! offered load, the KN count on the right axis, reconfigurations shaded from start to end.
//! SVG and PNG from the same drawing, in the sweep figure's style.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{ElasticResult, SystemResult, INTERVAL};
use crate::bench::plot::{err, register_font, COLORS};

/// Draws `r` into `svg` and `png`.
pub fn draw(r: &ElasticResult, svg: &Path, png: &Path) -> anyhow::Result<()> {
    register_font()?;
    let size = (1500, 120 + 420 * r.systems.len().max(1) as u32);
    {
        let root = SVGBackend::new(svg, size).into_drawing_area();
        draw_on(&root, r)?;
        root.present().map_err(err)?;
    }
    {
        let root = BitMapBackend::new(png, size).into_drawing_area();
        draw_on(&root, r)?;
        root.present().map_err(err)?;
    }
    Ok(())
}

/// The offered load in ops/s as a step line.
fn offered(r: &ElasticResult) -> Vec<(f64, f64)> {
    let [b, u, t] = r.phases_s;
    let (lo, hi) = (r.base_rate, r.base_rate * r.burst_factor);
    vec![
        (0.0, lo),
        (b, lo),
        (b, hi),
        (b + u, hi),
        (b + u, lo),
        (b + u + t, lo),
    ]
}

fn draw_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    r: &ElasticResult,
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let title = format!(
        "Elasticity: {} {}, {} keys, open-loop base {:.0} ops/s, x{} burst, KNs by {} (in-process, 2 cores)",
        r.workload,
        r.zipf.map_or("uniform".into(), |z| format!("zipf {z}")),
        r.keys,
        r.base_rate,
        r.burst_factor,
        r.mode
    );
    let root = root.titled(&title, ("sans-serif", 22)).map_err(err)?;
    let per_s = 1.0 / INTERVAL.as_secs_f64();
    let total: f64 = r.phases_s.iter().sum();
    // Up to 1.6 times the burst: catch-up spikes after a stall run off the top.
    let peak = r.base_rate * r.burst_factor;
    let y_hi = r
        .systems
        .iter()
        .flat_map(|s| s.samples.iter().map(|x| x.ops as f64 * per_s))
        .fold(1.0, f64::max)
        .min(peak * 1.6)
        .max(peak * 1.15);
    let kn_hi = r
        .systems
        .iter()
        .map(|s| s.peak_kns)
        .max()
        .unwrap_or(1)
        .max(2) as f64
        + 1.0;
    let panels = root.split_evenly((r.systems.len().max(1), 1));
    for (i, (s, area)) in r.systems.iter().zip(panels.iter()).enumerate() {
        panel(area, r, s, COLORS[i % COLORS.len()], total, y_hi, kn_hi)?;
    }
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    r: &ElasticResult,
    s: &SystemResult,
    color: RGBColor,
    total: f64,
    y_hi: f64,
    kn_hi: f64,
) -> anyhow::Result<()> {
    let per_s = 1.0 / INTERVAL.as_secs_f64();
    let caption = format!(
        "{}: longest dip {:.1} s, {} moved",
        s.system,
        s.longest_dip_s,
        crate::size::human(s.bytes_moved)
    );
    let mut ch = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .right_y_label_area_size(50)
        .build_cartesian_2d(0f64..total, 0f64..y_hi)
        .map_err(err)?
        .set_secondary_coord(0f64..total, 0f64..kn_hi);
    ch.configure_mesh()
        .light_line_style(WHITE)
        .x_desc("time (s)")
        .y_desc("ops/s (per 100 ms; spikes above the top are clipped)")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    ch.configure_secondary_axes()
        .y_desc("KNs")
        .y_labels(kn_hi as usize + 1)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    // Reconfigurations: shaded from start to end, labelled at the top.
    let shade = RGBColor(0xd6, 0x27, 0x28);
    for c in &s.reconfigs {
        let (x0, x1) = (
            c.started_s,
            (c.started_s + c.took_s).max(c.started_s + 0.15),
        );
        ch.draw_series(std::iter::once(Rectangle::new(
            [(x0, 0.0), (x1, y_hi)],
            shade.mix(0.18).filled(),
        )))
        .map_err(err)?;
        ch.draw_series(std::iter::once(PathElement::new(
            [(x0, 0.0), (x0, y_hi)],
            shade.mix(0.7).stroke_width(1),
        )))
        .map_err(err)?;
        let sign = if c.action == "add" { "+" } else { "-" };
        ch.draw_series(std::iter::once(Text::new(
            format!("{sign}kn{}", c.kn),
            (x0 + total * 0.004, y_hi * 0.97),
            ("sans-serif", 14).into_font().color(&shade),
        )))
        .map_err(err)?;
    }
    let gray = RGBColor(0x70, 0x70, 0x70);
    ch.draw_series(DashedLineSeries::new(
        offered(r),
        6,
        4,
        gray.stroke_width(1),
    ))
    .map_err(err)?
    .label("offered load")
    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], gray.stroke_width(1)));
    let pts: Vec<(f64, f64)> = s
        .samples
        .iter()
        .map(|x| (x.t - INTERVAL.as_secs_f64() / 2.0, x.ops as f64 * per_s))
        .collect();
    ch.draw_series(LineSeries::new(pts, color.stroke_width(2)))
        .map_err(err)?
        .label(format!("{} throughput", s.system))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    // KN count as a step line on the right axis.
    let mut steps: Vec<(f64, f64)> = Vec::new();
    let mut prev = None;
    for x in &s.samples {
        let k = x.kns as f64;
        if prev != Some(k) {
            if let Some(p) = prev {
                steps.push((x.t - INTERVAL.as_secs_f64(), p));
            }
            steps.push((x.t - INTERVAL.as_secs_f64(), k));
            prev = Some(k);
        }
    }
    if let (Some(p), Some(last)) = (prev, s.samples.last()) {
        steps.push((last.t, p));
    }
    ch.draw_secondary_series(LineSeries::new(steps, BLACK.stroke_width(2)))
        .map_err(err)?
        .label("KNs (right axis)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    ch.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    Ok(())
}
