//! The worker-sweep plot, drawn as SVG by `plotters` (its text is left to the viewer's
//! sans-serif font).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

/// Plots Spillway's drain and the raw `PutObject` loop against the number of workers, with the
/// adaptive pool's throughput as a horizontal line.
pub fn workers(
    svg_path: &Path,
    latency_ms: u128,
    sweep: &[(usize, f64, f64)],
    auto: Option<f64>,
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

fn draw<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}
