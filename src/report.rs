//! `incept report RUN`: loss and accuracy curves of a run, drawn from its summary.csv to SVG.

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// One parsed row of summary.csv.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub epoch: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
}

/// Reads a run's summary.csv.
pub fn read_summary(path: &Path) -> Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = |name: &str| {
        header.iter().position(|h| *h == name).with_context(|| {
            format!("{}: no column {name}; is this an incept summary.csv?", path.display())
        })
    };
    let cols =
        [col("epoch")?, col("train_loss")?, col("train_acc")?, col("test_loss")?, col("test_acc")?];
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').collect();
        let get = |c: usize| -> Result<f64> {
            fields.get(c).and_then(|f| f.trim().parse().ok()).with_context(|| {
                format!("{} line {}: malformed row {line:?}", path.display(), i + 2)
            })
        };
        rows.push(Row {
            epoch: get(cols[0])?,
            train_loss: get(cols[1])?,
            train_acc: get(cols[2])?,
            test_loss: get(cols[3])?,
            test_acc: get(cols[4])?,
        });
    }
    if rows.is_empty() {
        bail!("{} has no finished epoch yet", path.display());
    }
    Ok(rows)
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>, title: &str, y: &str, series: &[Series],
) -> Result<()> {
    let (x0, x1) = range(series.iter().flat_map(|s| s.2.iter().map(|p| p.0)));
    let (y0, y1) = range(series.iter().flat_map(|s| s.2.iter().map(|p| p.1)));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y)
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    for (name, color, points) in series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok(())
}

/// Draws `curves.svg` (loss and accuracy per epoch, train and test) into the run folder and
/// returns its path.
pub fn report(run: &Path) -> Result<PathBuf> {
    let rows = read_summary(&run.join("summary.csv"))?;
    let out = run.join("curves.svg");
    {
        let root = SVGBackend::new(&out, (1100, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        let (left, right) = root.split_horizontally(550);
        let pts = |f: fn(&Row) -> f64| rows.iter().map(|r| (r.epoch, f(r))).collect::<Vec<_>>();
        panel(
            &left,
            "loss",
            "cross-entropy",
            &[("train", BLUE, pts(|r| r.train_loss)), ("test", RED, pts(|r| r.test_loss))],
        )?;
        panel(
            &right,
            "accuracy",
            "accuracy (%)",
            &[
                ("train", BLUE, pts(|r| r.train_acc * 100.0)),
                ("test", RED, pts(|r| r.test_acc * 100.0)),
            ],
        )?;
        root.present().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    Ok(out)
}
