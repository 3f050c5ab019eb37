//! Pricing: a dated price table and the cost of one call's usage, a plain
//! function the Dispatcher (outcomes) and the CostAccountant (ledger) share.
//!
//! Costs are whole pico-dollars ([`Picousd`], 10⁻¹² USD): every price in
//! USD per million tokens with up to six decimals is a whole number of
//! pico-dollars per token, so sums of calls equal the price of summed tokens
//! exactly, and the ledger matches a provider's bill to the last digit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::task::{RouteKind, ServiceTier, Usage};

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
    /// Prompt tokens written to the provider's cache (Anthropic's
    /// `cache_creation_input_tokens`); default: the input price.
    #[serde(default)]
    pub cache_write: Option<f64>,
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
    /// The price of the `priority` service tier as a multiple of the
    /// standard price (OpenAI charges about 1.75x). The `flex` tier is
    /// priced at the Batch API rate (`batch_discount` off).
    #[serde(default = "default_priority_multiplier")]
    pub priority_multiplier: f64,
    /// Prices by model name.
    pub models: BTreeMap<String, ModelPrice>,
}

fn default_batch_discount() -> f64 {
    0.5
}

fn default_priority_multiplier() -> f64 {
    1.75
}

/// An amount in pico-dollars (10⁻¹² USD).
pub type Picousd = u64;

/// Pico-dollars in one USD.
pub const PICOUSD_PER_USD: f64 = 1e12;

/// USD of an amount in pico-dollars.
pub fn usd(amount: Picousd) -> f64 {
    amount as f64 / PICOUSD_PER_USD
}

/// Pico-dollars per token of a price in USD per million tokens.
fn per_token(usd_per_million: f64) -> Picousd {
    // 1 USD / 1M tokens = 10^6 pico-dollars per token.
    (usd_per_million * 1e6).round().max(0.0) as Picousd
}

/// How a call is priced: the way it was sent, the service tier that
/// served it, and the multiplier of its window (off-peak).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Terms {
    /// Realtime or batch job.
    pub route: RouteKind,
    /// The service tier it was served at.
    pub tier: ServiceTier,
    /// 1.0, or the off-peak window's price multiplier.
    pub multiplier: f64,
}

impl Terms {
    /// A batch job's line: the batch rate, no multiplier.
    pub const BATCH_JOB: Terms = Terms {
        route: RouteKind::BatchApi,
        tier: ServiceTier::Default,
        multiplier: 1.0,
    };
}

impl PriceTable {
    /// The cost of `usage` on `model` in USD; `None` when the model has no price.
    pub fn cost(&self, model: &str, usage: &Usage, route: RouteKind) -> Option<f64> {
        self.cost_picousd(model, usage, route).map(usd)
    }

    /// The cost of `usage` on `model` in pico-dollars; `None` when the
    /// model has no price. (Off-peak prices are `[offpeak] price_multiplier`,
    /// applied per task with [`scale`].)
    pub fn cost_picousd(&self, model: &str, usage: &Usage, route: RouteKind) -> Option<Picousd> {
        self.tier_cost_picousd(model, usage, route, ServiceTier::Default)
    }

    /// The cost of a call served at `tier`: flex at the batch rate,
    /// priority at `priority_multiplier` times the standard price (a batch
    /// job always at the batch rate).
    pub fn tier_cost_picousd(
        &self,
        model: &str,
        usage: &Usage,
        route: RouteKind,
        tier: ServiceTier,
    ) -> Option<Picousd> {
        let p = self.models.get(model)?;
        let factor = match (route, tier) {
            (RouteKind::BatchApi, _) | (RouteKind::Realtime, ServiceTier::Flex) => {
                1.0 - self.batch_discount
            }
            (RouteKind::Realtime, ServiceTier::Priority) => self.priority_multiplier,
            (RouteKind::Realtime, ServiceTier::Default) => 1.0,
        };
        Some(scale(cost(p, usage), factor))
    }

    /// The cost of a call's usage on `model`, priced on its `terms`.
    pub fn call_cost_picousd(&self, model: &str, usage: &Usage, terms: Terms) -> Option<Picousd> {
        self.tier_cost_picousd(model, usage, terms.route, terms.tier)
            .map(|cost| scale(cost, terms.multiplier))
    }

    /// What a call that cost `cost` on `model` saved against the same usage
    /// on `reference` (the model tiering chose against), on the same
    /// `terms`; 0 with no reference, the same model, or a model without a
    /// price.
    pub fn saving_against(
        &self,
        reference: Option<&str>,
        model: &str,
        usage: &Usage,
        terms: Terms,
        cost: Picousd,
    ) -> Picousd {
        reference
            .filter(|r| *r != model)
            .and_then(|r| self.call_cost_picousd(r, usage, terms))
            .map_or(0, |at_reference| at_reference.saturating_sub(cost))
    }

    /// An upper bound of a call's cost before it is made: every prompt token
    /// at the uncached (or cache-write, if higher) rate and the whole output
    /// limit at the output rate (at the priority tier, times
    /// `priority_multiplier`: [`PriceTable::tier_estimate_picousd`]).
    pub fn estimate_picousd(
        &self,
        model: &str,
        prompt_tokens: u64,
        max_output_tokens: u64,
    ) -> Option<Picousd> {
        let p = self.models.get(model)?;
        let input = per_token(p.input.max(p.cache_write.unwrap_or(0.0)));
        Some(
            prompt_tokens
                .saturating_mul(input)
                .saturating_add(max_output_tokens.saturating_mul(per_token(p.output))),
        )
    }

    /// [`PriceTable::estimate_picousd`] for a call at `tier`.
    pub fn tier_estimate_picousd(
        &self,
        model: &str,
        prompt_tokens: u64,
        max_output_tokens: u64,
        tier: ServiceTier,
    ) -> Option<Picousd> {
        let e = self.estimate_picousd(model, prompt_tokens, max_output_tokens)?;
        Some(match tier {
            ServiceTier::Priority => scale(e, self.priority_multiplier.max(1.0)),
            ServiceTier::Default | ServiceTier::Flex => e,
        })
    }
}

impl PriceTable {
    /// What the cached tokens of `usage` saved on `model` in pico-dollars:
    /// each at the input price less the cached price (0 without a price).
    pub fn cache_saving_picousd(&self, model: &str, usage: &Usage, route: RouteKind) -> Picousd {
        let Some(p) = self.models.get(model) else {
            return 0;
        };
        let factor = match route {
            RouteKind::Realtime => 1.0,
            RouteKind::BatchApi => 1.0 - self.batch_discount,
        };
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let per_token_saved = per_token(p.input).saturating_sub(per_token(p.cached_input));
        scale(cached.saturating_mul(per_token_saved), factor)
    }
}

/// `amount` times `factor` (a discount or a multiplier), rounded.
pub fn scale(amount: Picousd, factor: f64) -> Picousd {
    if factor == 1.0 {
        amount
    } else {
        (amount as f64 * factor).round().max(0.0) as Picousd
    }
}

/// Full-price cost in pico-dollars: uncached input, cached input, cache
/// writes and output at their rates (usage is inclusive: `input_tokens`
/// counts the cached and cache-write tokens too).
pub fn cost(price: &ModelPrice, usage: &Usage) -> Picousd {
    let cached = usage.cached_input_tokens.min(usage.input_tokens);
    let written = usage
        .cache_write_input_tokens
        .min(usage.input_tokens - cached);
    let uncached = usage.input_tokens - cached - written;
    let write_rate = price.cache_write.unwrap_or(price.input);
    (uncached.saturating_mul(per_token(price.input)))
        .saturating_add(cached.saturating_mul(per_token(price.cached_input)))
        .saturating_add(written.saturating_mul(per_token(write_rate)))
        .saturating_add(usage.output_tokens.saturating_mul(per_token(price.output)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiering_saving_is_the_reference_on_the_same_terms_less_the_cost() {
        let price = |input, output| ModelPrice {
            input,
            cached_input: input / 4.0,
            output,
            cache_write: None,
        };
        let table = PriceTable {
            as_of: "2026-01-01".into(),
            batch_discount: 0.5,
            priority_multiplier: 1.75,
            models: [
                ("cheap".to_owned(), price(0.1, 0.4)),
                ("big".to_owned(), price(2.0, 8.0)),
            ]
            .into(),
        };
        let usage = Usage {
            input_tokens: 1_000_000,
            output_tokens: 100_000,
            ..Usage::default()
        };
        let flex_off_peak = Terms {
            route: RouteKind::Realtime,
            tier: ServiceTier::Flex,
            multiplier: 0.8,
        };
        for terms in [Terms::BATCH_JOB, flex_off_peak] {
            let cost = table.call_cost_picousd("cheap", &usage, terms).unwrap();
            let big = table.call_cost_picousd("big", &usage, terms).unwrap();
            assert_eq!(
                table.saving_against(Some("big"), "cheap", &usage, terms, cost),
                big - cost
            );
            assert_eq!(table.saving_against(None, "cheap", &usage, terms, cost), 0);
            assert_eq!(
                table.saving_against(Some("cheap"), "cheap", &usage, terms, cost),
                0
            );
        }
        // Flex at the batch rate, off-peak at 0.8 of it: 2.0 + 0.8 USD, halved, times 0.8.
        let big = table
            .call_cost_picousd("big", &usage, flex_off_peak)
            .unwrap();
        assert_eq!(usd(big), 1.12);
    }

    #[test]
    fn cached_tokens_save_the_input_price_less_the_cached_price() {
        let table = PriceTable {
            as_of: "2026-01-01".into(),
            batch_discount: 0.5,
            priority_multiplier: 1.75,
            models: [(
                "m".to_owned(),
                ModelPrice {
                    input: 2.0,
                    cached_input: 0.5,
                    output: 8.0,
                    cache_write: None,
                },
            )]
            .into(),
        };
        let usage = Usage {
            input_tokens: 3_000,
            cached_input_tokens: 2_000,
            output_tokens: 100,
            ..Usage::default()
        };
        // 2000 tokens at 1.5 USD per million.
        let saved = table.cache_saving_picousd("m", &usage, RouteKind::Realtime);
        assert_eq!(usd(saved), 0.003);
        assert_eq!(
            table.cache_saving_picousd("m", &usage, RouteKind::BatchApi),
            saved / 2
        );
        assert_eq!(
            table.cache_saving_picousd("unpriced", &usage, RouteKind::Realtime),
            0
        );
    }

    fn table(p: ModelPrice) -> PriceTable {
        PriceTable {
            as_of: "2026-01-01".into(),
            batch_discount: 0.5,
            priority_multiplier: 1.75,
            models: [("m".to_owned(), p)].into(),
        }
    }

    fn usage(input: u64, cached: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            cached_input_tokens: cached,
            output_tokens: output,
            ..Usage::default()
        }
    }

    const MINI: ModelPrice = ModelPrice {
        input: 0.15,
        cached_input: 0.075,
        output: 0.60,
        cache_write: None,
    };

    #[test]
    fn cached_tokens_are_priced_at_the_cached_rate() {
        let u = usage(812, 768, 41);
        // 44 × 0.15 + 768 × 0.075 + 41 × 0.60 USD per million tokens.
        let expected: Picousd = 44 * 150_000 + 768 * 75_000 + 41 * 600_000;
        assert_eq!(cost(&MINI, &u), expected);
        let t = table(MINI);
        assert_eq!(t.cost_picousd("m", &u, RouteKind::Realtime), Some(expected));
        assert_eq!(
            t.cost_picousd("m", &u, RouteKind::BatchApi),
            Some(expected / 2)
        );
        assert_eq!(
            t.cost("m", &u, RouteKind::Realtime),
            Some(expected as f64 / 1e12)
        );
    }

    #[test]
    fn sums_of_calls_equal_the_price_of_summed_tokens() {
        let calls = [
            usage(812, 768, 41),
            usage(13, 0, 7),
            usage(2_000, 1_024, 333),
        ];
        let each: Picousd = calls.iter().map(|u| cost(&MINI, u)).sum();
        let summed = calls.iter().fold(Usage::default(), |mut a, u| {
            a.input_tokens += u.input_tokens;
            a.cached_input_tokens += u.cached_input_tokens;
            a.output_tokens += u.output_tokens;
            a
        });
        assert_eq!(each, cost(&MINI, &summed));
    }

    #[test]
    fn cache_writes_are_priced_at_the_cache_write_rate() {
        let p = ModelPrice {
            input: 3.0,
            cached_input: 0.3,
            output: 15.0,
            cache_write: Some(3.75),
        };
        let u = Usage {
            input_tokens: 100,
            cached_input_tokens: 20,
            cache_write_input_tokens: 50,
            output_tokens: 0,
        };
        assert_eq!(cost(&p, &u), 30 * 3_000_000 + 20 * 300_000 + 50 * 3_750_000);
    }

    #[test]
    fn the_estimate_bounds_the_cost_of_any_answer_within_the_limits() {
        let t = table(MINI);
        let est = t.estimate_picousd("m", 100, 50).unwrap_or(0);
        for u in [usage(100, 0, 50), usage(100, 100, 50), usage(90, 10, 1)] {
            assert!(cost(&MINI, &u) <= est);
        }
    }

    #[test]
    fn cached_count_above_input_is_clamped() {
        let p = ModelPrice {
            input: 1.0,
            cached_input: 0.5,
            output: 0.0,
            cache_write: None,
        };
        assert_eq!(cost(&p, &usage(10, 50, 0)), 5_000_000);
    }

    #[test]
    fn unknown_model_has_no_price() {
        let t = PriceTable {
            models: BTreeMap::new(),
            ..table(MINI)
        };
        assert!(t
            .cost("x", &Usage::default(), RouteKind::Realtime)
            .is_none());
    }

    #[test]
    fn flex_is_priced_at_the_batch_rate_and_priority_at_the_premium() {
        let t = table(MINI);
        let u = usage(812, 768, 41);
        let full = cost(&MINI, &u);
        let at = |tier| t.tier_cost_picousd("m", &u, RouteKind::Realtime, tier);
        assert_eq!(at(ServiceTier::Default), Some(full));
        assert_eq!(at(ServiceTier::Flex), Some(full / 2));
        assert_eq!(
            at(ServiceTier::Flex),
            t.cost_picousd("m", &u, RouteKind::BatchApi)
        );
        assert_eq!(
            at(ServiceTier::Priority),
            Some((full as f64 * 1.75).round() as Picousd)
        );
        // A priority call's estimate still bounds its cost.
        let est = t
            .tier_estimate_picousd("m", 812, 41, ServiceTier::Priority)
            .unwrap();
        assert!(at(ServiceTier::Priority).unwrap() <= est);
    }
}
