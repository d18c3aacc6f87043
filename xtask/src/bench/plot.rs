//! The worker-sweep plot, drawn as SVG by `plotters` (its text is left to the viewer's
//! sans-serif font).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

/// Plots Spillway's drain and the raw `PutObject` loop against the number of workers, with the
/// adaptive pool's throughput as a horizontal line and its trajectory (`path`: the limits it
/// went through, in order) drawn on the drain's curve.
pub fn workers(
    svg_path: &Path,
    latency_ms: u128,
    sweep: &[(usize, f64, f64)],
    auto: Option<f64>,
    path: &[f64],
) -> anyhow::Result<()> {
    let max_x = sweep.iter().map(|p| p.0).max().unwrap_or(64).max(2) as f64;
    let max_y = sweep
        .iter()
        .flat_map(|p| [p.1, p.2])
        .chain(auto)
        .fold(1.0f64, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(draw)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Upload throughput vs workers (store latency {latency_ms} ms, 1.92 MB objects)"
                ),
                ("sans-serif", 22),
            )
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d((1.0f64..max_x).log_scale(), 0.0..max_y * 1.15)
            .map_err(draw)?;
        chart
            .configure_mesh()
            .x_desc("upload workers (log scale)")
            .y_desc("MB/s")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .max_light_lines(0)
            .draw()
            .map_err(draw)?;
        let ours: Vec<(f64, f64)> = sweep.iter().map(|p| (p.0 as f64, p.1)).collect();
        let raw: Vec<(f64, f64)> = sweep.iter().map(|p| (p.0 as f64, p.2)).collect();
        for (points, color, label) in [
            (ours, BLUE, "Spillway: uploader drain"),
            (raw, RED, "baseline: raw PutObject loop"),
        ] {
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(draw)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 4, color.filled())),
                )
                .map_err(draw)?;
        }
        if let Some(a) = auto {
            let green = RGBColor(0, 140, 60);
            chart
                .draw_series(LineSeries::new(
                    vec![(1.0, a), (max_x, a)],
                    green.stroke_width(2),
                ))
                .map_err(draw)?
                .label("Spillway: --workers auto (no latency given)")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], green));
        }
        let on_curve: Vec<(f64, f64)> = path
            .iter()
            .filter_map(|&l| Some((l, curve_at(sweep, l)?)))
            .collect();
        if on_curve.len() > 1 {
            let green = RGBColor(0, 140, 60);
            chart
                .draw_series(LineSeries::new(
                    on_curve.clone(),
                    green.mix(0.6).stroke_width(1),
                ))
                .map_err(draw)?
                .label("--workers auto's limits in order, placed on the drain's curve")
                .legend(move |(x, y)| Circle::new((x + 10, y), 3, green.filled()));
            chart
                .draw_series(
                    on_curve
                        .iter()
                        .map(|&p| Circle::new(p, 3, green.mix(0.8).filled())),
                )
                .map_err(draw)?;
            if let Some(&last) = on_curve.last() {
                chart
                    .draw_series(std::iter::once(Cross::new(last, 7, green.stroke_width(3))))
                    .map_err(draw)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(draw)?;
        root.present().map_err(draw)?;
    }
    std::fs::write(svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))
}

/// The drain's throughput at `workers`, interpolated on the sweep (linear in log workers);
/// `None` outside the sweep.
fn curve_at(sweep: &[(usize, f64, f64)], workers: f64) -> Option<f64> {
    let mut points: Vec<(f64, f64)> = sweep.iter().map(|p| (p.0 as f64, p.1)).collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points.windows(2).find_map(|w| {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        (x0 <= workers && workers <= x1 && x0 > 0.0 && x1 > x0).then(|| {
            let t = (workers.ln() - x0.ln()) / (x1.ln() - x0.ln());
            y0 + t * (y1 - y0)
        })
    })
}

fn draw<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}
