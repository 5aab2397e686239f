//! Removing secrets from text before it is stored or logged: the configured keys themselves,
//! and anything shaped like a key (`sk-…`, `AIza…`, `Bearer …`).

use std::sync::LazyLock;

use regex::Regex;

static PATTERNS: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        // OpenAI keys, including the partly masked form OpenAI echoes back.
        (r"sk-[A-Za-z0-9_\-\*]{6,}", "sk-***"),
        // Google API keys.
        (r"AIza[0-9A-Za-z_\-]{10,}", "AIza***"),
        // Bearer tokens (JWTs, opaque tokens).
        (r"(?i)bearer\s+[A-Za-z0-9._~+/=\-]+", "Bearer ***"),
        // `api-key: …` / `x-goog-api-key=…` echoed in messages.
        (
            r"(?i)(api[_-]?key[\x22']?\s*[:=]\s*[\x22']?)[A-Za-z0-9._\-]{8,}",
            "${1}***",
        ),
    ]
    .into_iter()
    .map(|(re, with)| (Regex::new(re).expect("static pattern"), with))
    .collect()
});

/// `text` with every configured secret and every key-shaped token replaced by `***`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(secret.as_str(), "***");
    }
    for (re, with) in PATTERNS.iter() {
        out = re.replace_all(&out, *with).into_owned();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_every_shape_are_removed() {
        let secrets = vec!["my-azure-key-123456".to_owned()];
        let cases = [
            (
                "Incorrect API key provided: sk-test-****abcd. See docs.",
                "sk-test",
            ),
            ("key sk-proj-AbC123_xyz-987 rejected", "AbC123"),
            ("API key AIzaSyA1b2C3d4E5f6G7h8 not valid", "SyA1b2"),
            (
                "header Authorization: Bearer eyJhbGciOi.J9.abc failed",
                "eyJhbGciOi",
            ),
            ("azure said my-azure-key-123456 is wrong", "my-azure-key"),
            ("api-key: 0123456789abcdef0123", "0123456789abcdef"),
        ];
        for (text, leaked) in cases {
            let clean = redact(text, &secrets);
            assert!(!clean.contains(leaked), "{text:?} → {clean:?}");
            assert!(clean.contains("***"), "{clean:?}");
        }
        assert_eq!(
            redact("Rate limit reached for o4-mini", &secrets),
            "Rate limit reached for o4-mini"
        );
    }
}
