//! The fault rows as an SVG bar chart: what a dead, paused or missing node costs, per
//! scenario, for the sequential cycle and for 64 tasks.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::faults::{Fault, FaultRow};
use crate::median;

/// Which figure of a row a panel shows.
type Figure = fn(&FaultRow) -> f64;

/// Draws the medians of `rows` (one `Vec` per scenario, in [`Fault::ALL`] order) to `path`.
pub(crate) fn draw(path: &Path, rows: &[Vec<FaultRow>]) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(40);
    title.titled(
        "fencelock on 5 nodes: lock + release cycles per second, by node fault",
        ("sans-serif", 18),
    )?;
    let panels = body.split_evenly((1, 2));
    let series: [(&str, Figure); 2] = [
        ("one task, sequential", |r| r.seq_rate),
        ("64 tasks, own resources", |r| r.par_rate),
    ];
    for (panel, (caption, figure)) in panels.iter().zip(series) {
        let medians: Vec<f64> = rows
            .iter()
            .map(|runs| median(runs.iter().map(figure).collect()))
            .collect();
        let top = medians.iter().cloned().fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d((0..Fault::ALL.len() as u32 - 1).into_segmented(), 0.0..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(Fault::ALL.len())
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => Fault::ALL
                    .get(*i as usize)
                    .map(|f| short(*f).to_owned())
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc("cycles/s")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .light_line_style(WHITE)
            .draw()?;
        chart.draw_series(medians.iter().enumerate().map(|(i, &value)| {
            let i = i as u32;
            let color = if i == 0 { BLUE } else { RGBColor(230, 120, 30) };
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), value),
                ],
                color.filled(),
            );
            bar.set_margin(0, 0, 12, 12);
            bar
        }))?;
        chart.draw_series(medians.iter().enumerate().map(|(i, &value)| {
            Text::new(
                format!("{value:.0}"),
                (SegmentValue::CenterOf(i as u32), value + top * 0.01),
                TextStyle::from(("sans-serif", 13).into_font())
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )
        }))?;
    }
    root.present()?;
    Ok(())
}

/// The scenario's name on the chart's axis.
fn short(fault: Fault) -> &'static str {
    match fault {
        Fault::AllUp => "all up",
        Fault::OneClosed => "1 closed",
        Fault::OnePaused => "1 paused",
        Fault::TwoClosed => "2 closed",
    }
}
