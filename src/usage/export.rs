//! CSV export of the listing: RFC 4180, one header row, every matching row newest first,
//! produced batch by batch (constant memory), with cells that a spreadsheet would run as a
//! formula defused.

use super::list::UsageRow;

/// The columns, in order.
pub const COLUMNS: [&str; 21] = [
    "id",
    "created_at",
    "started_at",
    "latency_sec",
    "user_id",
    "username",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "success",
    "error",
    "cost",
    "cost_currency",
    "metadata",
    "node_name",
    // Issue 20; last, so that the earlier columns keep their places.
    "is_streaming",
    "first_chunk_at",
    "ttft_sec",
];

/// One RFC 4180 field: quoted when it holds a comma, quote, CR or LF (quotes doubled). Text
/// starting with `=`, `+`, `-`, `@` (or their full-width forms `＝ ＋ － ＠`), also after
/// leading whitespace, or with a tab or a CR, is prefixed with `'` so that spreadsheets show it
/// instead of evaluating it (OWASP's CSV-injection rule; some spreadsheets skip the spaces or
/// fold the full-width forms).
pub fn field(out: &mut String, value: &str) {
    const TRIGGERS: [char; 8] = [
        '=', '+', '-', '@', '\u{FF1D}', '\u{FF0B}', '\u{FF0D}', '\u{FF20}',
    ];
    let defuse = value.starts_with(['\t', '\r']) || value.trim_start().starts_with(TRIGGERS);
    let quote = defuse || value.contains([',', '"', '\r', '\n']);
    if quote {
        out.push('"');
    }
    if defuse {
        out.push('\'');
    }
    for c in value.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    if quote {
        out.push('"');
    }
}

fn record(out: &mut String, values: &[&str]) {
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        field(out, v);
    }
    out.push_str("\r\n");
}

/// The header row.
pub fn header() -> String {
    let mut out = String::new();
    record(&mut out, &COLUMNS);
    out
}

fn num<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// One row as a CSV record (numbers as the JSON writes them; empty for null).
pub fn row(out: &mut String, r: &UsageRow) {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let id = r.id.to_string();
    let latency = opt(r.latency_sec.map(|l| num(&l)));
    let ttft = opt(r.ttft_sec.map(|l| num(&l)));
    let user_id = opt(r.user_id.map(|u| u.to_string()));
    let (p, c, t, ca, re) = (
        r.prompt_tokens.to_string(),
        r.completion_tokens.to_string(),
        r.total_tokens.to_string(),
        r.cached_tokens.to_string(),
        r.reasoning_tokens.to_string(),
    );
    let cost = opt(r.cost.map(|c| num(&c)));
    let metadata = r.metadata.to_string();
    let node = r
        .metadata
        .get("node_name")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    record(
        out,
        &[
            &id,
            &r.created_at,
            r.started_at.as_deref().unwrap_or_default(),
            &latency,
            &user_id,
            r.username.as_deref().unwrap_or_default(),
            &r.model,
            &p,
            &c,
            &t,
            &ca,
            &re,
            if r.success { "true" } else { "false" },
            r.error.as_deref().unwrap_or_default(),
            &cost,
            &r.cost_currency,
            &metadata,
            node,
            if r.is_streaming { "true" } else { "false" },
            r.first_chunk_at.as_deref().unwrap_or_default(),
            &ttft,
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(v: &str) -> String {
        let mut s = String::new();
        field(&mut s, v);
        s
    }

    #[test]
    fn quoting_and_formula_defusing() {
        assert_eq!(one("plain"), "plain");
        assert_eq!(one("a,b"), "\"a,b\"");
        assert_eq!(one("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(one("two\nlines"), "\"two\nlines\"");
        assert_eq!(one("=1+1"), "\"'=1+1\"");
        assert_eq!(one("+SUM(A1)"), "\"'+SUM(A1)\"");
        assert_eq!(one("-2"), "\"'-2\"");
        assert_eq!(one("@cmd"), "\"'@cmd\"");
        assert_eq!(one("\tx"), "\"'\tx\"");
        assert_eq!(one("a=b"), "a=b");
        // Issue 17, item 10: after spaces, and the full-width forms.
        assert_eq!(one(" =1+1"), "\"' =1+1\"");
        assert_eq!(one("  @cmd"), "\"'  @cmd\"");
        assert_eq!(one("\u{3000}-2"), "\"'\u{3000}-2\"");
        assert_eq!(one("＝1+1"), "\"'＝1+1\"");
        assert_eq!(one("＋SUM(A1)"), "\"'＋SUM(A1)\"");
        assert_eq!(one("－2"), "\"'－2\"");
        assert_eq!(one("＠cmd"), "\"'＠cmd\"");
        assert_eq!(one(" plain"), " plain");
        assert_eq!(one(""), "");
    }
}
