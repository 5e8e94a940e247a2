//! Line charts as PNG (plotters' bitmap backend; text through ab_glyph with a TrueType font
//! of the system: DejaVu Sans or Liberation Sans, or the file in `ANYWORK_BENCH_FONT`).
//!
//! ```ignore
//! plot::png(path, &[Panel::new("dispatch", "sessions", "ms").log_x().series("p50", points)], 2)?;
//! ```

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, anyhow};
use plotters::prelude::*;

/// One line: `(x, y)` points in order of x.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart of a figure.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic axes (the values must be > 0).
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
}

impl Panel {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            log_x: false,
            log_y: false,
            series: Vec::new(),
        }
    }

    pub fn log_x(mut self) -> Self {
        self.log_x = true;
        self
    }

    pub fn log_y(mut self) -> Self {
        self.log_y = true;
        self
    }

    pub fn series(mut self, label: &str, points: Vec<(f64, f64)>) -> Self {
        self.series.push(Series {
            label: label.into(),
            points,
        });
        self
    }
}

/// Fonts tried in order after `ANYWORK_BENCH_FONT`.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
];

/// Registers a system font as plotters' `sans-serif` (once).
fn font() -> anyhow::Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let wanted = std::env::var("ANYWORK_BENCH_FONT").ok();
        let path = wanted
            .iter()
            .map(String::as_str)
            .chain(FONTS.iter().copied())
            .find(|p| Path::new(p).is_file())
            .ok_or_else(|| {
                format!(
                    "no TrueType font for the plot's text: install fonts-dejavu-core or set \
                     ANYWORK_BENCH_FONT to a .ttf file (looked at {})",
                    FONTS.join(", ")
                )
            })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        // plotters keeps the font for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a font plotters can read"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// `panels` in a grid of `columns`, each 640 × 420 pixels, into the PNG at `path`.
pub fn png(path: &Path, panels: &[Panel], columns: usize) -> anyhow::Result<()> {
    font()?;
    let columns = columns.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(columns).max(1);
    let (w, h) = (640 * columns as u32, 420 * rows as u32);
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        for (panel, area) in panels.iter().zip(root.split_evenly((rows, columns))) {
            draw(&area, panel).with_context(|| format!("panel {}", panel.title))?;
        }
        root.present()?;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(())
}

/// A log axis is drawn as a linear one over log10 of the values, labelled with the values.
fn axis(log: bool, v: f64) -> f64 {
    if log {
        v.max(f64::MIN_POSITIVE).log10()
    } else {
        v
    }
}

fn label(log: bool, v: f64) -> String {
    let v = if log { 10f64.powf(v) } else { v };
    let a = v.abs();
    if a >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if a >= 100.0 || a == 0.0 || (a - a.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The range of `values` with a margin (from 0 on a linear axis whose values are ≥ 0).
fn range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if !log && lo >= 0.0 {
        lo = 0.0;
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    (lo - if log { pad } else { 0.0 }, hi + pad)
}

/// Tick labels: one per decade on a log axis (so that they fall on 1, 10, 100…).
fn labels(log: bool, lo: f64, hi: f64) -> usize {
    if log {
        ((hi.floor() - lo.ceil()) as usize + 1).clamp(2, 10)
    } else {
        8
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn draw(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
) -> anyhow::Result<()> {
    let points = |s: &Series| -> Vec<(f64, f64)> {
        s.points
            .iter()
            .map(|&(x, y)| (axis(panel.log_x, x), axis(panel.log_y, y)))
            .collect()
    };
    let all: Vec<(f64, f64)> = panel.series.iter().flat_map(points).collect();
    let (x0, x1) = range(all.iter().map(|p| p.0), panel.log_x);
    let (y0, y1) = range(all.iter().map(|p| p.1), panel.log_y);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let (log_x, log_y) = (panel.log_x, panel.log_y);
    let x_format = move |v: &f64| label(log_x, *v);
    let y_format = move |v: &f64| label(log_y, *v);
    chart
        .configure_mesh()
        .x_desc(&panel.x_label)
        .y_desc(&panel.y_label)
        .x_label_formatter(&x_format)
        .y_label_formatter(&y_format)
        .x_labels(labels(panel.log_x, x0, x1))
        .y_labels(labels(panel.log_y, y0, y1))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (i, series) in panel.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let line = points(series);
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
            .label(series.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    if panel.series.len() > 1 || panel.series.iter().any(|s| !s.label.is_empty()) {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_two_panels() {
        if font().is_err() {
            eprintln!("no system font; the PNG cannot carry text here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plot.png");
        let panels = [
            Panel::new("dispatch", "sessions", "ms")
                .log_x()
                .series("p50", vec![(10.0, 1.0), (100.0, 2.0), (1000.0, 30.0)])
                .series("p99", vec![(10.0, 3.0), (100.0, 8.0), (1000.0, 90.0)]),
            Panel::new("RSS", "sessions", "MiB").series("", vec![(1.0, 12.0), (2.0, 14.0)]),
        ];
        png(&path, &panels, 2).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // 1280 × 420: the width and height in the IHDR chunk.
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 1280);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 420);
    }
}
