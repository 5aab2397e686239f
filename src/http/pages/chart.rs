//! The overview's time-series chart, drawn on the server as SVG (no script, no external
//! resource): a bar per bucket of total tokens, with failed-call markers omitted for
//! clarity, y-axis gridlines and a few bucket labels. Scales to its container's width.

use std::fmt::Write;

use crate::usage::stats::SeriesItem;

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 280.0;
const LEFT: f64 = 64.0;
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

/// A round axis maximum ≥ `max` (1, 2 or 5 × a power of ten).
fn nice_max(max: i64) -> i64 {
    if max <= 0 {
        return 1;
    }
    let mut step = 1i64;
    loop {
        for m in [1, 2, 5] {
            if step.saturating_mul(m) >= max {
                return step.saturating_mul(m);
            }
        }
        step = step.saturating_mul(10);
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

/// The SVG of `items` (total tokens per bucket), with `title` for screen readers.
pub fn token_bars(items: &[SeriesItem], title: &str) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{t}" xmlns="http://www.w3.org/2000/svg"><title>{t}</title>"#,
        t = esc(title)
    );
    let plot_w = WIDTH - LEFT - 8.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let max = nice_max(items.iter().map(|i| i.total_tokens).max().unwrap_or(0));
    for k in 0..=4 {
        let v = max * k / 4;
        let y = TOP + plot_h - plot_h * (v as f64 / max as f64);
        let _ = write!(
            svg,
            r#"<line x1="{LEFT}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" class="grid"/><text x="{tx}" y="{ty:.1}" class="axis" text-anchor="end">{label}</text>"#,
            x2 = WIDTH - 8.0,
            tx = LEFT - 6.0,
            ty = y + 4.0,
            label = short_number(v)
        );
    }
    if items.is_empty() {
        let _ = write!(
            svg,
            r#"<text x="{x}" y="{y}" class="empty" text-anchor="middle">No calls in this range</text>"#,
            x = LEFT + plot_w / 2.0,
            y = TOP + plot_h / 2.0
        );
    }
    let n = items.len().max(1) as f64;
    let slot = plot_w / n;
    let bar = (slot * 0.8).max(1.0);
    let label_every = (items.len() / 8).max(1);
    for (i, item) in items.iter().enumerate() {
        let h = plot_h * (item.total_tokens as f64 / max as f64);
        let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
        let _ = write!(
            svg,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{bar:.1}" height="{h:.1}" class="bar"><title>{label}: {tokens} tokens, {calls} calls</title></rect>"#,
            y = TOP + plot_h - h,
            label = esc(&item.bucket),
            tokens = item.total_tokens,
            calls = item.total_calls
        );
        if i % label_every == 0 {
            let _ = write!(
                svg,
                r#"<text x="{x:.1}" y="{y}" class="axis" text-anchor="middle">{label}</text>"#,
                x = x + bar / 2.0,
                y = HEIGHT - BOTTOM + 16.0,
                label = esc(&short_bucket(&item.bucket))
            );
        }
    }
    svg.push_str("</svg>");
    svg
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
        }
    }

    #[test]
    fn bars_are_drawn_and_labels_escaped() {
        let svg = token_bars(&[item("2025-01-01", 10), item("2025-01-02", 40)], "a<b");
        assert_eq!(svg.matches("<rect").count(), 2);
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
        assert!(svg.contains(">01-02<"));
        assert!(token_bars(&[], "t").contains("No calls"));
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0), 1);
        assert_eq!(nice_max(7), 10);
        assert_eq!(nice_max(1_300), 2_000);
        assert_eq!(nice_max(4_900_000), 5_000_000);
        assert_eq!(short_number(1_250_000), "1.2M");
        assert_eq!(short_bucket("2025-01-31T10:00:00+00:00"), "01-31 10h");
        assert_eq!(short_bucket("2025-03-01T00:00:00-05:00"), "2025-03");
    }
}
