//! Prices per 1M tokens and the cost of one call, exact to the micro-dollar.
//!
//! A price per 1,000,000 tokens in USD times a token count is the cost in micro-dollars, so
//! the whole computation is decimal arithmetic on exact values (`rust_decimal`), rounded once,
//! half to even, to whole micro-dollars. Floats never enter it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The built-in table (`pricing/prices.toml`), compiled into the binary.
const BUILTIN: &str = include_str!("../pricing/prices.toml");

/// One model's prices, USD per 1M tokens.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Price {
    #[schema(value_type = String, example = "2.50")]
    pub input: Decimal,
    #[schema(value_type = String, example = "1.25")]
    pub cached_input: Decimal,
    #[schema(value_type = String, example = "10.00")]
    pub output: Decimal,
    /// Reasoning tokens; the output price when the table does not name one.
    #[schema(value_type = String, example = "10.00")]
    pub reasoning: Decimal,
    /// Where the price was read.
    pub source: Option<String>,
    /// When it was read.
    pub date: Option<String>,
    /// `builtin` or the path of the `LLM_PRICES_PATH` file that set it.
    pub origin: String,
}

/// Token counts as a usage row holds them (cached ⊆ prompt, reasoning ⊆ completion).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: i64,
    pub completion: i64,
    pub cached: i64,
    pub reasoning: i64,
}

impl Price {
    /// `(prompt − cached)·input + cached·cached_input + (completion − reasoning)·output +
    /// reasoning·reasoning`, in micro-dollars, rounded half to even. Counts a provider got
    /// inconsistent (more cached than prompt tokens) are clamped, never negative.
    pub fn cost_micros(&self, t: Tokens) -> i64 {
        let cached = t.cached.clamp(0, t.prompt.max(0));
        let reasoning = t.reasoning.clamp(0, t.completion.max(0));
        let d = Decimal::from;
        let exact = d(t.prompt.max(0) - cached) * self.input
            + d(cached) * self.cached_input
            + d(t.completion.max(0) - reasoning) * self.output
            + d(reasoning) * self.reasoning;
        exact
            .round_dp_with_strategy(0, RoundingStrategy::MidpointNearestEven)
            .try_into()
            .unwrap_or(i64::MAX)
    }
}

/// Why a prices file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {reason}")]
pub struct PriceError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

/// The active price table: the built-in one, overridden and extended by a user file.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    models: BTreeMap<String, Price>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    models: BTreeMap<String, toml::Spanned<RawPrice>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: toml::Value,
    cached_input: Option<toml::Value>,
    output: toml::Value,
    reasoning: Option<toml::Value>,
    source: Option<String>,
    date: Option<String>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A price as written: a decimal string, or a TOML number read through its shortest decimal
/// form (`0.075` is 0.075 exactly). Must be ≥ 0.
fn price(value: &toml::Value, key: &str) -> Result<Decimal, String> {
    let parsed = match value {
        toml::Value::String(s) => Decimal::from_str(s.trim()).ok(),
        toml::Value::Integer(i) => Some(Decimal::from(*i)),
        toml::Value::Float(f) if f.is_finite() => Decimal::from_str(&f.to_string()).ok(),
        _ => None,
    };
    match parsed {
        Some(p) if p >= Decimal::ZERO => Ok(p.normalize()),
        Some(_) => Err(format!("`{key}` must not be negative")),
        None => {
            let got = match value {
                toml::Value::String(s) => format!("{s:?}"),
                other => format!("a {}", other.type_str()),
            };
            Err(format!(
                "`{key}` must be a decimal number of USD per 1M tokens, got {got}"
            ))
        }
    }
}

/// Parses one prices file; `origin` names it in errors and in each price.
pub fn parse(text: &str, origin: &str) -> Result<BTreeMap<String, Price>, PriceError> {
    let fail = |line: usize, reason: String| PriceError {
        file: origin.to_owned(),
        line,
        reason,
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
        fail(line, e.message().to_owned())
    })?;
    let mut out = BTreeMap::new();
    for (name, spanned) in raw.models {
        let line = line_of(text, spanned.span().start);
        let r = spanned.into_inner();
        if name.trim().is_empty() {
            return Err(fail(line, "a model name must not be empty".into()));
        }
        let get = |v: &toml::Value, key: &str| {
            price(v, key).map_err(|reason| fail(line, format!("model {name:?}: {reason}")))
        };
        let input = get(&r.input, "input")?;
        let output = get(&r.output, "output")?;
        let cached_input = match &r.cached_input {
            Some(v) => get(v, "cached_input")?,
            None => input,
        };
        let reasoning = match &r.reasoning {
            Some(v) => get(v, "reasoning")?,
            None => output,
        };
        out.insert(
            name,
            Price {
                input,
                cached_input,
                output,
                reasoning,
                source: r.source,
                date: r.date,
                origin: origin.to_owned(),
            },
        );
    }
    Ok(out)
}

/// `name` without a trailing `-YYYY-MM-DD` date, if it has one.
fn snapshot_base(name: &str) -> Option<&str> {
    let (base, date) = name.split_at(name.len().checked_sub(11)?);
    let b = date.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    (b[0] == b'-'
        && digits(1..5)
        && b[5] == b'-'
        && digits(6..8)
        && b[8] == b'-'
        && digits(9..11)
        && !base.is_empty())
    .then_some(base)
}

impl PriceTable {
    /// The built-in table alone.
    pub fn builtin() -> Self {
        Self {
            models: parse(BUILTIN, "builtin").expect("pricing/prices.toml is valid (tested)"),
        }
    }

    /// The built-in table with the entries of the file at `path` (if any) on top.
    pub fn load(path: Option<&Path>) -> Result<Self, PriceError> {
        let mut table = Self::builtin();
        if let Some(path) = path {
            let origin = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| PriceError {
                file: origin.clone(),
                line: 0,
                reason: format!("cannot read it: {e}"),
            })?;
            table.models.extend(parse(&text, &origin)?);
        }
        Ok(table)
    }

    /// The price of `model`: its own entry, else (for a dated snapshot such as
    /// `gpt-4o-2024-11-20`) its base name's entry. Nothing else is guessed.
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        self.models
            .get(model)
            .or_else(|| snapshot_base(model).and_then(|base| self.models.get(base)))
    }

    /// The cost of one call in micro-dollars; `None` when the model has no price.
    pub fn cost_micros(&self, model: &str, tokens: Tokens) -> Option<i64> {
        self.lookup(model).map(|p| p.cost_micros(tokens))
    }

    /// Every entry, by model name.
    pub fn models(&self) -> &BTreeMap<String, Price> {
        &self.models
    }
}

/// The currency of every cost (the successor's `cost_currency`).
pub const CURRENCY: &str = "USD";

/// An amount of USD in whole micro-dollars, written to JSON as a number of dollars
/// (`Usd(1280)` → `0.00128`). Sums stay integers until they are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(pub i64);

impl Serialize for Usd {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Exact below 2^53 micro-dollars (9 billion USD); the shortest form of the f64 is the
        // six-decimal value itself.
        s.serialize_f64(self.0 as f64 / 1e6)
    }
}

/// `LLM_PRICES_PATH` as given in the settings.
pub fn prices_path(raw: Option<&str>) -> Option<PathBuf> {
    raw.map(str::trim)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

/// Micro-dollars as exact USD with six decimals (`1280` → `0.001280`).
pub fn usd(micros: i64) -> Decimal {
    Decimal::new(micros, 6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn the_builtin_table_parses_and_names_its_sources() {
        let t = PriceTable::builtin();
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4.1-nano",
            "o3",
            "o4-mini",
            "gemini-2.5-pro",
            "gemini-2.5-flash",
        ] {
            let p = t.lookup(m).unwrap_or_else(|| panic!("{m} priced"));
            assert!(p.source.as_deref().unwrap().starts_with("https://"), "{m}");
            assert!(p.date.is_some(), "{m}");
            assert!(p.input > Decimal::ZERO && p.output >= p.input, "{m}");
        }
    }

    #[test]
    fn snapshots_fall_back_to_their_base_name_and_nothing_else_is_guessed() {
        let t = PriceTable::builtin();
        assert_eq!(t.lookup("gpt-4o-2024-11-20"), t.lookup("gpt-4o"));
        assert_eq!(t.lookup("o4-mini-2025-04-16"), t.lookup("o4-mini"));
        for unknown in [
            "gpt-4o-20241120",
            "gpt-4o-latest",
            "GPT-4O",
            "gpt-4o-2024-11",
            "-2024-11-20",
            "gemini-2.5-flash-001",
            "claude-3",
        ] {
            assert_eq!(t.lookup(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn cost_is_exact_and_rounds_half_to_even() {
        let p = Price {
            input: dec("0.15"),
            cached_input: dec("0.075"),
            output: dec("0.60"),
            reasoning: dec("0.60"),
            source: None,
            date: None,
            origin: "test".into(),
        };
        // 1 cached token at 0.075 µ$ → 0.075 → 0; 7 → 0.525 → 1; 6 → 0.45 → 0;
        // 10 → 0.75 → 1; half cases: 0.5 → 0, 1.5 → 2, 2.5 → 2.
        let cached = |n| Tokens {
            prompt: n,
            cached: n,
            ..Default::default()
        };
        assert_eq!(p.cost_micros(cached(1)), 0);
        assert_eq!(p.cost_micros(cached(7)), 1);
        assert_eq!(p.cost_micros(cached(6)), 0);
        let half = |n: i64| {
            Price {
                input: dec("0.5"),
                ..p.clone()
            }
            .cost_micros(Tokens {
                prompt: n,
                ..Default::default()
            })
        };
        assert_eq!((half(1), half(3), half(5)), (0, 2, 2));
        // Inconsistent counts are clamped, not negative.
        assert_eq!(
            p.cost_micros(Tokens {
                prompt: 10,
                cached: 50,
                completion: 1,
                reasoning: 9,
            }),
            1 // 10 cached · 0.075 + 1 reasoning · 0.60 = 1.35 → 1
        );
    }

    #[test]
    fn a_user_file_overrides_and_extends_and_bad_files_name_file_line_and_reason() {
        let text = "[models.\"gpt-4o\"]\ninput = 1\noutput = 2.5\n\n[models.\"my-model\"]\ninput = \"0.1\"\ncached_input = 0.05\noutput = \"0.2\"\nreasoning = 0.3\n";
        let parsed = parse(text, "mine.toml").unwrap();
        assert_eq!(parsed["gpt-4o"].cached_input, dec("1"));
        assert_eq!(parsed["gpt-4o"].reasoning, dec("2.5"));
        assert_eq!(parsed["my-model"].reasoning, dec("0.3"));

        let bad = |text: &str| parse(text, "p.toml").unwrap_err();
        let e = bad(
            "[models.\"a\"]\ninput = 1\noutput = 1\n\n[models.\"b\"]\ninput = -1\noutput = 2\n",
        );
        assert_eq!((e.file.as_str(), e.line), ("p.toml", 5), "{e}");
        assert!(e.reason.contains("negative"), "{e}");
        let e = bad("[models.\"a\"]\ninput = 1\n");
        assert_eq!(e.line, 1, "{e}");
        assert!(e.reason.contains("output"), "{e}");
        let e = bad("[models.\"a\"]\ninput = 1\noutput = \"ten\"\n");
        assert!(e.reason.contains("output"), "{e}");
        let e = bad("[models.\"a\"]\ninput = 1\noutput = 2\ncolour = 3\n");
        assert!(e.reason.contains("colour"), "{e}");
        let e = bad("[models.\"a\"\ninput = 1\n");
        assert_eq!(e.line, 1, "{e}");
        assert_eq!(e.to_string(), format!("p.toml:1: {}", e.reason));
    }
}
