//! OpenAI's `service_tier` on Chat Completions, as the simulator serves it.
//!
//! - `flex` (for the models of the flex list only; others answer as
//!   `default`, as OpenAI does): slower answers (the latency times
//!   `flex_latency_factor`), now and then a 429 `resource_unavailable`
//!   (at `flex_unavailable_rate`, from the seeded dice; not billed, no rate
//!   budget spent), and tokens billed apart at Batch API rates;
//! - `priority` (or `fast`, which OpenAI reports as `priority`): faster
//!   answers (`priority_latency_factor`), billed apart at the priority
//!   premium;
//! - `auto`, `default`, `scale` or no field: the default tier.
//!
//! The response's `service_tier` names the tier actually used.

use axum::http::StatusCode;
use serde_json::Value;

use super::api_error::ApiError;

/// Models that take `flex` unless [`crate::sim::SimServer::set_flex_models`]
/// says otherwise: OpenAI offers flex for its reasoning models only.
pub const DEFAULT_FLEX_MODELS: [&str; 5] = ["gpt-5", "gpt-5-mini", "gpt-5-nano", "o3", "o4-mini"];

/// A service tier, as asked for and as used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ServiceTier {
    #[default]
    Default,
    Flex,
    Priority,
}

impl ServiceTier {
    /// The name a response reports.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ServiceTier::Default => "default",
            ServiceTier::Flex => "flex",
            ServiceTier::Priority => "priority",
        }
    }

    /// The tier a request asks for; an unknown value is a 400 as OpenAI
    /// answers it.
    pub(crate) fn parse(value: Option<&Value>) -> Result<ServiceTier, ApiError> {
        match value {
            None | Some(Value::Null) => Ok(ServiceTier::Default),
            Some(Value::String(s)) => match s.as_str() {
                "auto" | "default" | "scale" => Ok(ServiceTier::Default),
                "flex" => Ok(ServiceTier::Flex),
                "priority" | "fast" => Ok(ServiceTier::Priority),
                other => Err(ApiError::invalid_value(
                    "service_tier",
                    format!(
                        "Invalid value: '{other}'. Supported values are: 'auto', 'default', \
                         'flex', 'scale', 'priority' and 'fast'."
                    ),
                )),
            },
            Some(other) => Err(ApiError::invalid_type("service_tier", "a string", other)),
        }
    }

    /// The tier used for `model`: flex only where the flex list allows it.
    pub(crate) fn used_for(self, model: &str, flex_models: &[String]) -> ServiceTier {
        match self {
            ServiceTier::Flex if !flex_models.iter().any(|m| m == model) => ServiceTier::Default,
            tier => tier,
        }
    }
}

/// How the tiers behave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierConfig {
    /// Latency of a flex answer, as a multiple of the default tier's.
    pub flex_latency_factor: f64,
    /// Fraction of flex requests refused with 429 `resource_unavailable`.
    pub flex_unavailable_rate: f64,
    /// Latency of a priority answer, as a multiple of the default tier's.
    pub priority_latency_factor: f64,
}

impl Default for TierConfig {
    /// Flex three times slower and never refused; priority twice as fast.
    fn default() -> Self {
        TierConfig {
            flex_latency_factor: 3.0,
            flex_unavailable_rate: 0.0,
            priority_latency_factor: 0.5,
        }
    }
}

impl TierConfig {
    /// The latency factor of `tier` (1 for the default tier).
    pub(crate) fn latency_factor(&self, tier: ServiceTier) -> f64 {
        let f = match tier {
            ServiceTier::Default => 1.0,
            ServiceTier::Flex => self.flex_latency_factor,
            ServiceTier::Priority => self.priority_latency_factor,
        };
        if f.is_finite() {
            f.max(0.0)
        } else {
            1.0
        }
    }
}

/// The 429 OpenAI answers when flex capacity is short (not billed).
pub(crate) fn resource_unavailable() -> ApiError {
    ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        message: "Resource unavailable: flex processing has no capacity for this request \
                  right now. Please retry later, or use the default service tier."
            .to_owned(),
        kind: "resource_unavailable",
        param: None,
        code: Some("resource_unavailable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tiers_parse_as_openai_names_them() {
        let parse = |v: Value| ServiceTier::parse(Some(&v));
        assert_eq!(ServiceTier::parse(None).unwrap(), ServiceTier::Default);
        for (v, t) in [
            (json!(null), ServiceTier::Default),
            (json!("auto"), ServiceTier::Default),
            (json!("default"), ServiceTier::Default),
            (json!("scale"), ServiceTier::Default),
            (json!("flex"), ServiceTier::Flex),
            (json!("priority"), ServiceTier::Priority),
            (json!("fast"), ServiceTier::Priority),
        ] {
            assert_eq!(parse(v.clone()).unwrap(), t, "{v}");
        }
        let e = parse(json!("cheap")).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("service_tier"));
        assert!(parse(json!(3)).is_err());
    }

    #[test]
    fn flex_is_used_only_for_the_models_of_the_flex_list() {
        let list = vec!["gpt-5-mini".to_owned()];
        assert_eq!(
            ServiceTier::Flex.used_for("gpt-5-mini", &list),
            ServiceTier::Flex
        );
        assert_eq!(
            ServiceTier::Flex.used_for("gpt-4.1-mini", &list),
            ServiceTier::Default
        );
        assert_eq!(
            ServiceTier::Priority.used_for("gpt-4.1-mini", &list),
            ServiceTier::Priority
        );
    }

    #[test]
    fn a_refusal_has_openais_shape() {
        let body: Value = serde_json::from_slice(&resource_unavailable().to_body()).unwrap();
        assert_eq!(body["error"]["code"], "resource_unavailable");
        assert_eq!(body["error"]["type"], "resource_unavailable");
    }
}
