//! Approximate list prices by model-name prefix, for `cost_usd`.

use anywork_core::TokenUsage;

/// US dollars per million tokens: input, output, cache write, cache read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// Prompt tokens.
    pub input: f64,
    /// Generated tokens.
    pub output: f64,
    /// Tokens written to the prompt cache.
    pub cache_write: f64,
    /// Tokens read from the prompt cache.
    pub cache_read: f64,
}

const fn p(input: f64, output: f64, cache_write: f64, cache_read: f64) -> Price {
    Price {
        input,
        output,
        cache_write,
        cache_read,
    }
}

/// Longest matching prefix wins. Public list prices at the time of writing; `None` for
/// models not listed (the cost is then unknown rather than wrong).
const TABLE: &[(&str, Price)] = &[
    ("claude-opus-4-5", p(5.0, 25.0, 6.25, 0.5)),
    ("claude-opus-4", p(15.0, 75.0, 18.75, 1.5)),
    ("claude-3-opus", p(15.0, 75.0, 18.75, 1.5)),
    ("claude-sonnet-4", p(3.0, 15.0, 3.75, 0.3)),
    ("claude-3-7-sonnet", p(3.0, 15.0, 3.75, 0.3)),
    ("claude-3-5-sonnet", p(3.0, 15.0, 3.75, 0.3)),
    ("claude-haiku-4", p(1.0, 5.0, 1.25, 0.1)),
    ("claude-3-5-haiku", p(0.8, 4.0, 1.0, 0.08)),
    ("claude-3-haiku", p(0.25, 1.25, 0.3, 0.03)),
    ("gpt-4o-mini", p(0.15, 0.6, 0.0, 0.075)),
    ("gpt-4o", p(2.5, 10.0, 0.0, 1.25)),
    ("gpt-4.1-nano", p(0.1, 0.4, 0.0, 0.025)),
    ("gpt-4.1-mini", p(0.4, 1.6, 0.0, 0.1)),
    ("gpt-4.1", p(2.0, 8.0, 0.0, 0.5)),
    ("gpt-5-nano", p(0.05, 0.4, 0.0, 0.005)),
    ("gpt-5-mini", p(0.25, 2.0, 0.0, 0.025)),
    ("gpt-5", p(1.25, 10.0, 0.0, 0.125)),
    ("o4-mini", p(1.1, 4.4, 0.0, 0.275)),
    ("o3-mini", p(1.1, 4.4, 0.0, 0.55)),
    ("o3", p(2.0, 8.0, 0.0, 0.5)),
];

/// The price of `model` (a provider prefix such as `anthropic/` is ignored).
pub fn price(model: &str) -> Option<Price> {
    let model = model
        .rsplit('/')
        .next()
        .unwrap_or(model)
        .to_ascii_lowercase();
    TABLE
        .iter()
        .filter(|(prefix, _)| model.starts_with(prefix))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, price)| *price)
}

/// The cost of `usage` with `model`, when its price is known.
pub fn cost(model: &str, usage: &TokenUsage) -> Option<f64> {
    let price = price(model)?;
    let m = |tokens: u64, per_million: f64| tokens as f64 * per_million / 1_000_000.0;
    Some(
        m(usage.input_tokens, price.input)
            + m(usage.output_tokens, price.output)
            + m(usage.cache_creation_input_tokens, price.cache_write)
            + m(usage.cache_read_input_tokens, price.cache_read),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(
            price("claude-opus-4-5-20251101").map(|p| p.input),
            Some(5.0)
        );
        assert_eq!(price("claude-opus-4-1").map(|p| p.input), Some(15.0));
        assert_eq!(price("gpt-4o-mini-2024").map(|p| p.input), Some(0.15));
        assert!(price("fake-model").is_none());
        let usage = TokenUsage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            ..TokenUsage::default()
        };
        assert_eq!(cost("claude-sonnet-4-5", &usage), Some(18.0));
    }
}
