//! The sweep's figure: one column per workload; throughput against KNs on top (modelled
//! and measured, both log-scaled and labelled as such), RTs per operation below. The same
//! drawing goes to an SVG and a PNG; text uses DejaVu Sans compiled into the binary, so
//! no system font is needed.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::BenchResult;

static FONT: OnceLock<Result<(), String>> = OnceLock::new();

pub(crate) fn register_font() -> anyhow::Result<()> {
    FONT.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| "the compiled-in DejaVu Sans font does not load".to_owned())
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

pub(crate) const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

pub(crate) fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the figure: {e}")
}

/// Draws `results` into `svg` and `png`.
pub fn draw(results: &[BenchResult], svg: &Path, png: &Path, title: &str) -> anyhow::Result<()> {
    register_font()?;
    let size = (1500, 950);
    {
        let root = SVGBackend::new(svg, size).into_drawing_area();
        draw_on(&root, results, title)?;
        root.present().map_err(err)?;
    }
    {
        let root = BitMapBackend::new(png, size).into_drawing_area();
        draw_on(&root, results, title)?;
        root.present().map_err(err)?;
    }
    Ok(())
}

fn ordered<T: PartialEq + Clone>(it: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = Vec::new();
    for x in it {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

fn draw_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    results: &[BenchResult],
    title: &str,
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let workloads = ordered(results.iter().map(|r| r.workload.clone()));
    let systems = ordered(results.iter().map(|r| r.system));
    let nic = results
        .first()
        .map(|r| r.modeled.nic.clone())
        .unwrap_or_default();
    // KNs on a log2 axis: x = log2(KNs), labelled with the KN count.
    let max_x = (results.iter().map(|r| r.kns).max().unwrap_or(1).max(2) as f64).log2();
    let ticks = max_x.ceil() as usize + 1;
    let tputs = results.iter().flat_map(|r| {
        [Some(r.throughput_ops), r.modeled.throughput_ops]
            .into_iter()
            .flatten()
    });
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for t in tputs.filter(|t| *t > 0.0 && t.is_finite()) {
        lo = lo.min(t);
        hi = hi.max(t);
    }
    if !lo.is_finite() {
        (lo, hi) = (1.0, 10.0);
    }
    let (lo, hi) = (
        10f64.powf(lo.log10().floor()),
        10f64.powf(hi.log10().ceil()),
    );
    let rts_hi = results
        .iter()
        .map(|r| r.rts_per_op)
        .fold(0.0, f64::max)
        .max(0.1)
        * 1.15;
    let cols = workloads.len().max(1);
    let rows = root.split_evenly((2, cols));
    for (w, wl) in workloads.iter().enumerate() {
        let pts = |sys: &str, f: &dyn Fn(&BenchResult) -> Option<f64>| -> Vec<(f64, f64)> {
            let mut v: Vec<(f64, f64)> = results
                .iter()
                .filter(|r| &r.workload == wl && r.system == sys)
                .filter_map(|r| f(r).map(|y| ((r.kns as f64).log2(), y)))
                .collect();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v
        };
        // Throughput.
        let mut ch = ChartBuilder::on(&rows[w])
            .caption(format!("{wl}: throughput"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..max_x, (lo..hi).log_scale())
            .map_err(err)?;
        ch.configure_mesh()
            .x_desc("KNs")
            .y_desc("ops/s (log)")
            .x_labels(ticks)
            .x_label_formatter(&|x| format!("{:.0}", x.exp2()))
            .y_label_formatter(&|y| format!("{y:.0e}"))
            .draw()
            .map_err(err)?;
        for (i, sys) in systems.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let m = pts(sys, &|r| r.modeled.throughput_ops);
            ch.draw_series(LineSeries::new(m.clone(), c.stroke_width(2)))
                .map_err(err)?
                .label(format!("{sys} modelled ({nic})"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
            ch.draw_series(m.iter().map(|&p| Circle::new(p, 4, c.filled())))
                .map_err(err)?;
            let me = pts(sys, &|r| Some(r.throughput_ops));
            let faint = c.mix(0.6);
            ch.draw_series(LineSeries::new(me.clone(), faint.stroke_width(1)))
                .map_err(err)?
                .label(format!("{sys} measured (in-process, 2 cores)"))
                .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 5, faint.filled()));
            ch.draw_series(
                me.iter()
                    .map(|&p| TriangleMarker::new(p, 5, faint.filled())),
            )
            .map_err(err)?;
        }
        if w == 0 {
            ch.configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(err)?;
        }
        // Round trips.
        let mut ch = ChartBuilder::on(&rows[cols + w])
            .caption(
                format!("{wl}: RTs per operation (counted)"),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..max_x, 0f64..rts_hi)
            .map_err(err)?;
        ch.configure_mesh()
            .x_desc("KNs")
            .y_desc("RTs/op")
            .x_labels(ticks)
            .x_label_formatter(&|x| format!("{:.0}", x.exp2()))
            .draw()
            .map_err(err)?;
        for (i, sys) in systems.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let r = pts(sys, &|r| Some(r.rts_per_op));
            ch.draw_series(LineSeries::new(r.clone(), c.stroke_width(2)))
                .map_err(err)?
                .label(sys.to_string())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
            ch.draw_series(r.iter().map(|&p| Circle::new(p, 4, c.filled())))
                .map_err(err)?;
        }
        if w == 0 {
            ch.configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(err)?;
        }
    }
    Ok(())
}
