//! Pricing: a dated price table and the cost of one task's usage. The
//! CostAccountant builds on this; here it is a plain function.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::task::{RouteKind, Usage};

/// USD per million tokens for one model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Uncached prompt tokens.
    pub input: f64,
    /// Cached prompt tokens.
    pub cached_input: f64,
    /// Completion tokens.
    pub output: f64,
}

/// Prices as published on a given date.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    /// The date the prices were read from the providers' pages (YYYY-MM-DD).
    pub as_of: String,
    /// Discount for Batch API jobs, as a fraction (0.5 = half price).
    #[serde(default = "default_batch_discount")]
    pub batch_discount: f64,
    /// Prices by model name.
    pub models: BTreeMap<String, ModelPrice>,
}

fn default_batch_discount() -> f64 {
    0.5
}

impl PriceTable {
    /// The cost of `usage` on `model`; `None` when the model has no price.
    pub fn cost(&self, model: &str, usage: &Usage, route: RouteKind) -> Option<f64> {
        let p = self.models.get(model)?;
        Some(cost(p, usage, route, self.batch_discount))
    }
}

/// Cost in USD: uncached input, cached input and output at their rates.
pub fn cost(price: &ModelPrice, usage: &Usage, route: RouteKind, batch_discount: f64) -> f64 {
    let cached = usage.cached_input_tokens.min(usage.input_tokens);
    let uncached = usage.input_tokens - cached;
    let full = (uncached as f64 * price.input
        + cached as f64 * price.cached_input
        + usage.output_tokens as f64 * price.output)
        / 1_000_000.0;
    match route {
        RouteKind::Realtime => full,
        RouteKind::BatchApi => full * (1.0 - batch_discount),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input_tokens: u64, cached_input_tokens: u64, output_tokens: u64) -> Usage {
        Usage {
            input_tokens,
            cached_input_tokens,
            output_tokens,
        }
    }

    #[test]
    fn cached_tokens_are_priced_at_the_cached_rate() {
        let p = ModelPrice {
            input: 0.15,
            cached_input: 0.075,
            output: 0.60,
        };
        let u = usage(812, 768, 41);
        let c = cost(&p, &u, RouteKind::Realtime, 0.5);
        let expected = (44.0 * 0.15 + 768.0 * 0.075 + 41.0 * 0.60) / 1e6;
        assert!((c - expected).abs() < 1e-15, "{c} vs {expected}");
        let b = cost(&p, &u, RouteKind::BatchApi, 0.5);
        assert!((b - expected / 2.0).abs() < 1e-15);
    }

    #[test]
    fn cached_count_above_input_is_clamped() {
        let p = ModelPrice {
            input: 1.0,
            cached_input: 0.5,
            output: 0.0,
        };
        let c = cost(&p, &usage(10, 50, 0), RouteKind::Realtime, 0.5);
        assert!((c - 5.0 / 1e6).abs() < 1e-15);
    }

    #[test]
    fn unknown_model_has_no_price() {
        let t = PriceTable {
            as_of: "2026-01-01".into(),
            batch_discount: 0.5,
            models: BTreeMap::new(),
        };
        assert!(t
            .cost("x", &Usage::default(), RouteKind::Realtime)
            .is_none());
    }
}
