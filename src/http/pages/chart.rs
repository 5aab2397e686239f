//! The overview's charts, drawn on the server as SVG (no script, no external resource):
//! bars (stacked when a bar has several segments) and a line of rates, with y-axis gridlines,
//! a few bucket labels and, on every bar and point, a `<title>` with its exact values (shown on
//! hover, read by screen readers). They scale to their container; below 640 px the container
//! scrolls sideways so that the labels stay readable (see `admin.css`).

use std::fmt::Write;

use crate::usage::stats::SeriesItem;

/// The width of a chart across the page, in SVG units (it scales to its box).
pub const WIDE: f64 = 900.0;
/// The width of a chart in half the page: narrower units, so its labels keep their size.
pub const HALF: f64 = 450.0;
const HEIGHT: f64 = 280.0;
const LEFT: f64 = 72.0;
const BOTTOM: f64 = 36.0;
const TOP: f64 = 12.0;

/// XML-escaped text.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A round axis maximum ≥ `max` whose quarters are round too (1, 2, 4, 6 or 8 × a power of
/// ten; at least 4, so that a count's gridlines fall on whole numbers).
fn nice_max(max: i64) -> i64 {
    if max <= 4 {
        return 4;
    }
    let mut step = 1i64;
    loop {
        for m in [1, 2, 4, 6, 8] {
            if step.saturating_mul(m) >= max {
                return step.saturating_mul(m);
            }
        }
        step = step.saturating_mul(10);
    }
}

/// [`nice_max`] for any positive value (dollars can be fractions).
fn nice_max_f(max: f64) -> f64 {
    if max.is_nan() || max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let mut step = 10f64.powf(max.log10().floor());
    loop {
        for m in [1.0, 2.0, 4.0, 6.0, 8.0] {
            if step * m >= max * (1.0 - 1e-12) {
                return step * m;
            }
        }
        step *= 10.0;
    }
}

/// `1.2M`, `34k`, `999`.
pub fn short_number(n: i64) -> String {
    let f = n as f64;
    match n.abs() {
        1_000_000_000.. => format!("{:.1}G", f / 1e9),
        1_000_000.. => format!("{:.1}M", f / 1e6),
        10_000.. => format!("{:.0}k", f / 1e3),
        _ => n.to_string(),
    }
}

/// What a y axis counts, for its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    Count,
    Usd,
    Percent,
    /// Durations in seconds (`850 ms`, `1.20 s`).
    Seconds,
}

impl Axis {
    fn label(self, v: f64) -> String {
        match self {
            Axis::Count => short_number(v.round() as i64),
            Axis::Usd if v == 0.0 => "$0".to_owned(),
            Axis::Usd if v >= 1000.0 => format!("${}", short_number(v.round() as i64)),
            Axis::Usd if v >= 1.0 => format!("${v:.0}"),
            Axis::Usd => {
                let decimals = (-v.log10().floor()) as usize;
                format!("${v:.decimals$}")
            }
            Axis::Percent => format!("{v:.0} %"),
            Axis::Seconds if v == 0.0 => "0".to_owned(),
            Axis::Seconds => super::format::duration(v),
        }
    }
}

/// One bar: its bucket label, its segments bottom up (CSS class, value), and the text shown on
/// hover.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub label: String,
    pub segments: Vec<(&'static str, f64)>,
    pub title: String,
}

fn open(svg: &mut String, width: f64, title: &str) {
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {width} {HEIGHT}" role="img" aria-label="{t}" xmlns="http://www.w3.org/2000/svg"><title>{t}</title>"#,
        t = esc(title)
    );
}

/// Gridlines and y labels for `0..=max`.
fn grid(svg: &mut String, width: f64, max: f64, axis: Axis) {
    let plot_h = HEIGHT - TOP - BOTTOM;
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let y = TOP + plot_h - plot_h * (v / max);
        let _ = write!(
            svg,
            r#"<line x1="{LEFT}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" class="grid"/><text x="{tx}" y="{ty:.1}" class="axis" text-anchor="end">{label}</text>"#,
            x2 = width - 8.0,
            tx = LEFT - 6.0,
            ty = y + 4.0,
            label = esc(&axis.label(v))
        );
    }
}

fn empty(svg: &mut String, width: f64, text: &str) {
    let _ = write!(
        svg,
        r#"<text x="{x}" y="{y}" class="empty" text-anchor="middle">{t}</text>"#,
        x = LEFT + (width - LEFT - 8.0) / 2.0,
        y = TOP + (HEIGHT - TOP - BOTTOM) / 2.0,
        t = esc(text)
    );
}

fn x_label(svg: &mut String, x: f64, label: &str) {
    let _ = write!(
        svg,
        r#"<text x="{x:.1}" y="{y}" class="axis" text-anchor="middle">{label}</text>"#,
        y = HEIGHT - BOTTOM + 18.0,
        label = esc(&short_bucket(label))
    );
}

/// Every how many buckets a label fits (about one per 110 units).
fn label_every(n: usize, width: f64) -> usize {
    let fit = ((width - LEFT) / 110.0).max(1.0) as usize;
    n.div_ceil(fit).max(1)
}

/// The axis maximum for `items`: a round number at or above the tallest stack.
fn axis_max(items: &[Bar], axis: Axis) -> f64 {
    let top = items
        .iter()
        .map(|b| b.segments.iter().map(|s| s.1.max(0.0)).sum::<f64>())
        .fold(0.0, f64::max);
    match axis {
        Axis::Count => nice_max(top.ceil() as i64) as f64,
        _ => nice_max_f(top),
    }
}

/// Bars (stacked by segment) over the buckets; `empty_text` when there are none.
pub fn bars(items: &[Bar], width: f64, title: &str, axis: Axis, empty_text: &str) -> String {
    let mut svg = String::new();
    open(&mut svg, width, title);
    let plot_w = width - LEFT - 8.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let max = axis_max(items, axis);
    grid(&mut svg, width, max, axis);
    if items.is_empty() {
        empty(&mut svg, width, empty_text);
    }
    let slot = plot_w / items.len().max(1) as f64;
    let bar_width = (slot * 0.8).max(1.0);
    let label_every = label_every(items.len(), width);
    for (i, item) in items.iter().enumerate() {
        let x = LEFT + slot * i as f64 + (slot - bar_width) / 2.0;
        let _ = write!(svg, "<g><title>{}</title>", esc(&item.title));
        let mut base = 0.0;
        for (class, value) in &item.segments {
            let h = plot_h * (value.max(0.0) / max);
            if h > 0.0 {
                let _ = write!(
                    svg,
                    r#"<rect x="{x:.1}" y="{y:.1}" width="{bar_width:.1}" height="{h:.1}" class="{class}"/>"#,
                    y = TOP + plot_h - base - h,
                );
            }
            base += h;
        }
        svg.push_str("</g>");
        if i % label_every == 0 {
            x_label(&mut svg, x + bar_width / 2.0, &item.label);
        }
    }
    svg.push_str("</svg>");
    svg
}

/// Horizontal bars, one row per item (a model), labelled on the left, stacked by segment,
/// against an x axis of `axis`; `empty_text` when there are none.
pub fn hbars(items: &[Bar], width: f64, title: &str, axis: Axis, empty_text: &str) -> String {
    const ROW: f64 = 26.0;
    const LABEL: f64 = 150.0;
    const AXIS: f64 = 24.0;
    let height = TOP + ROW * items.len().max(3) as f64 + AXIS;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{t}" xmlns="http://www.w3.org/2000/svg"><title>{t}</title>"#,
        t = esc(title)
    );
    // Room on the right for the last axis label, centred on the end of the plot.
    let plot_w = width - LABEL - 40.0;
    let plot_h = ROW * items.len().max(3) as f64;
    let max = axis_max(items, axis);
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let x = LABEL + plot_w * k as f64 / 4.0;
        let _ = write!(
            svg,
            r#"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{y2:.1}" class="grid"/><text x="{x:.1}" y="{ty:.1}" class="axis" text-anchor="middle">{label}</text>"#,
            y2 = TOP + plot_h,
            ty = TOP + plot_h + 17.0,
            label = esc(&axis.label(v))
        );
    }
    if items.is_empty() {
        let _ = write!(
            svg,
            r#"<text x="{x}" y="{y}" class="empty" text-anchor="middle">{t}</text>"#,
            x = LABEL + plot_w / 2.0,
            y = TOP + plot_h / 2.0,
            t = esc(empty_text)
        );
    }
    for (i, item) in items.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let label: String = if item.label.chars().count() > 22 {
            item.label.chars().take(21).chain(['…']).collect()
        } else {
            item.label.clone()
        };
        let _ = write!(
            svg,
            r#"<g><title>{}</title><text x="{lx}" y="{ly:.1}" class="axis" text-anchor="end">{}</text>"#,
            esc(&item.title),
            esc(&label),
            lx = LABEL - 6.0,
            ly = y + ROW / 2.0 + 4.0,
        );
        let mut base = 0.0;
        for (class, value) in &item.segments {
            let w = plot_w * (value.max(0.0) / max);
            if w > 0.0 {
                let _ = write!(
                    svg,
                    r#"<rect x="{x:.1}" y="{ry:.1}" width="{w:.1}" height="{h:.1}" class="{class}"/>"#,
                    x = LABEL + base,
                    ry = y + 4.0,
                    h = ROW - 8.0,
                );
            }
            base += w;
        }
        svg.push_str("</g>");
    }
    svg.push_str("</svg>");
    svg
}

/// A line of percentages over the buckets (`None`: no calls there, the line breaks), each
/// point with its title.
pub fn rate_line(
    points: &[(String, Option<f64>, String)],
    width: f64,
    title: &str,
    empty_text: &str,
) -> String {
    let mut svg = String::new();
    open(&mut svg, width, title);
    let plot_w = width - LEFT - 8.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let top = points.iter().filter_map(|p| p.1).fold(0.0, f64::max);
    let max = nice_max_f(top.max(1.0)).min(100.0);
    grid(&mut svg, width, max, Axis::Percent);
    if points.iter().all(|p| p.1.is_none()) {
        empty(&mut svg, width, empty_text);
    }
    let slot = plot_w / points.len().max(1) as f64;
    let label_every = label_every(points.len(), width);
    let at = |i: usize, v: f64| {
        (
            LEFT + slot * i as f64 + slot / 2.0,
            TOP + plot_h - plot_h * (v.min(max) / max),
        )
    };
    let mut path = String::new();
    let mut pen_down = false;
    for (i, (_, value, _)) in points.iter().enumerate() {
        match value {
            Some(v) => {
                let (x, y) = at(i, *v);
                let _ = write!(path, "{}{x:.1},{y:.1} ", if pen_down { "L" } else { "M" });
                pen_down = true;
            }
            None => pen_down = false,
        }
    }
    if !path.is_empty() {
        let _ = write!(svg, r#"<path d="{}" class="line"/>"#, path.trim_end());
    }
    for (i, (label, value, title)) in points.iter().enumerate() {
        if let Some(v) = value {
            let (x, y) = at(i, *v);
            let _ = write!(
                svg,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" class="point"><title>{}</title></circle>"#,
                esc(title)
            );
        }
        if i % label_every == 0 {
            x_label(&mut svg, LEFT + slot * i as f64 + slot / 2.0, label);
        }
    }
    svg.push_str("</svg>");
    svg
}

/// Total tokens per bucket (one segment per bar).
pub fn token_bars(items: &[SeriesItem], title: &str) -> String {
    let bars_of: Vec<Bar> = items
        .iter()
        .map(|i| Bar {
            label: i.bucket.clone(),
            segments: vec![("bar", i.total_tokens as f64)],
            title: format!(
                "{}: {} tokens, {} calls",
                i.bucket,
                super::format::thousands(i.total_tokens),
                super::format::thousands(i.total_calls)
            ),
        })
        .collect();
    bars(&bars_of, WIDE, title, Axis::Count, "No calls in this range")
}

/// `2025-01-31T10:00:00+00:00` → `01-31 10h`; `2025-01-31` → `01-31`; a month → `2025-01`.
fn short_bucket(bucket: &str) -> String {
    match bucket.len() {
        10 => bucket.get(5..).unwrap_or(bucket).to_owned(),
        _ if bucket.get(8..19) == Some("01T00:00:00") => {
            bucket.get(..7).unwrap_or(bucket).to_owned()
        }
        _ => match (bucket.get(5..10), bucket.get(11..13)) {
            (Some(d), Some(h)) => format!("{d} {h}h"),
            _ => bucket.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::Usd;

    fn item(bucket: &str, tokens: i64) -> SeriesItem {
        SeriesItem {
            bucket: bucket.into(),
            total_calls: 1,
            total_prompt_tokens: tokens,
            total_completion_tokens: 0,
            total_tokens: tokens,
            total_cached_tokens: 0,
            total_reasoning_tokens: 0,
            total_cost: Usd(0),
            successful_calls: 1,
        }
    }

    #[test]
    fn bars_are_drawn_and_labels_escaped() {
        let svg = token_bars(&[item("2025-01-01", 10), item("2025-01-02", 40)], "a<b");
        assert_eq!(svg.matches("<rect").count(), 2);
        assert!(svg.contains("<title>2025-01-02: 40 tokens, 1 calls</title>"));
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
        assert!(svg.contains(">01-02<"));
        assert!(token_bars(&[], "t").contains("No calls"));
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0), 4);
        assert_eq!(nice_max(7), 8);
        assert_eq!(nice_max(1_300), 2_000);
        assert_eq!(nice_max(2_030_000), 4_000_000);
        assert_eq!(nice_max(4_900_000), 6_000_000);
        assert_eq!(short_number(1_250_000), "1.2M");
        assert_eq!(short_bucket("2025-01-31T10:00:00+00:00"), "01-31 10h");
        assert_eq!(short_bucket("2025-03-01T00:00:00-05:00"), "2025-03");
        assert_eq!(nice_max_f(0.0031), 0.004);
        assert_eq!(nice_max_f(186.2), 200.0);
        assert_eq!(nice_max_f(0.0), 1.0);
        assert_eq!(Axis::Usd.label(0.0025), "$0.003");
        assert_eq!(Axis::Usd.label(0.05), "$0.05");
        assert_eq!(Axis::Usd.label(150.0), "$150");
        assert_eq!(Axis::Percent.label(12.5), "12 %");
    }

    #[test]
    fn stacked_bars_and_a_broken_line() {
        let b = |l: &str, ok: f64, failed: f64| Bar {
            label: l.into(),
            segments: vec![("ok", ok), ("failed", failed)],
            title: format!("{l}: {ok} ok, {failed} failed"),
        };
        let svg = bars(
            &[b("2025-01-01", 8.0, 2.0), b("2025-01-02", 5.0, 0.0)],
            HALF,
            "Calls",
            Axis::Count,
            "none",
        );
        // A zero segment draws nothing.
        assert_eq!(svg.matches("<rect").count(), 3);
        assert!(svg.contains("<title>2025-01-01: 8 ok, 2 failed</title>"));
        let line = rate_line(
            &[
                ("2025-01-01".into(), Some(20.0), "20 %".into()),
                ("2025-01-02".into(), None, String::new()),
                ("2025-01-03".into(), Some(0.0), "0 %".into()),
            ],
            HALF,
            "Failure rate",
            "none",
        );
        assert_eq!(line.matches("<circle").count(), 2);
        // The gap starts a new stroke.
        assert_eq!(line.matches('M').count(), 2);
        assert!(rate_line(&[], WIDE, "t", "No calls").contains("No calls"));
    }
}
#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn horizontal_bars_name_each_row_and_scale_to_the_longest() {
        let b = |l: &str, p50: f64, p95: f64| Bar {
            label: l.into(),
            segments: vec![("p50", p50), ("p95", p95 - p50)],
            title: format!("{l}: p50 {p50}"),
        };
        let svg = hbars(
            &[
                b("gpt-4o", 1.0, 3.0),
                b("<script>", 2.0, 2.5),
                b("a-model-name-longer-than-twenty-two", 0.5, 12.0),
            ],
            HALF,
            "Latency",
            Axis::Seconds,
            "none",
        );
        // Every row labelled (escaped, long names cut), two segments each.
        assert!(svg.contains(">gpt-4o</text>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;") && !svg.contains("<script>"));
        assert!(svg.contains(">a-model-name-longer-t…</text>"), "{svg}");
        assert_eq!(svg.matches("<rect").count(), 6);
        // The axis reaches past the longest stack (12 s), in durations.
        assert!(svg.contains(">20.0 s</text>"), "{svg}");
        assert!(svg.contains(">0</text>"));
        assert!(!svg.contains(">none</text>"));
        // Nothing to draw: the empty text.
        let empty = hbars(
            &[],
            HALF,
            "Latency",
            Axis::Seconds,
            "No call knows its latency",
        );
        assert!(empty.contains("No call knows its latency"));
        assert_eq!(empty.matches("<rect").count(), 0);
    }

    #[test]
    fn a_long_series_gets_a_label_every_few_bars() {
        let items: Vec<Bar> = (0..90)
            .map(|i| Bar {
                label: format!("2025-01-{:02}", i % 28 + 1),
                segments: vec![("bar", 1.0)],
                title: String::new(),
            })
            .collect();
        let svg = bars(&items, WIDE, "t", Axis::Count, "none");
        let labels = svg.matches("text-anchor=\"middle\"").count();
        assert!((5..=9).contains(&labels), "{labels}");
        let half = bars(&items, HALF, "t", Axis::Count, "none");
        let labels = half.matches("text-anchor=\"middle\"").count();
        assert!((2..=4).contains(&labels), "{labels}");
    }
}
