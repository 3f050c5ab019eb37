//! Errors in OpenAI's wire shape: `{"error": {"message", "type", "param", "code"}}`.
//!
//! The messages copy OpenAI's wording where it is known, so client code that
//! matches on them behaves the same against the simulator.

use axum::http::StatusCode;
use serde::Serialize;
use serde_json::Value;

/// One error answer: the HTTP status and the body fields.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub(crate) fn invalid_request(
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    ) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
            kind: "invalid_request_error",
            param,
            code,
        }
    }

    pub(crate) fn unparsable_json() -> Self {
        Self::invalid_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
             but what was sent was not valid JSON.)"
                .to_owned(),
            None,
            None,
        )
    }

    pub(crate) fn body_too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "The request body is larger than the simulator's limit of {limit} bytes."
            ),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub(crate) fn missing_model() -> Self {
        Self::invalid_request("you must provide a model parameter".to_owned(), None, None)
    }

    pub(crate) fn missing(param: &str) -> Self {
        Self::invalid_request(
            format!("Missing required parameter: '{param}'."),
            Some(param.to_owned()),
            Some("missing_required_parameter"),
        )
    }

    pub(crate) fn invalid_type(param: &str, expected: &str, got: &Value) -> Self {
        Self::invalid_request(
            format!(
                "Invalid type for '{param}': expected {expected}, but got {} instead.",
                describe(got)
            ),
            Some(param.to_owned()),
            Some("invalid_type"),
        )
    }

    pub(crate) fn invalid_value(param: &str, message: String) -> Self {
        Self::invalid_request(message, Some(param.to_owned()), Some("invalid_value"))
    }

    pub(crate) fn empty_array(param: &str) -> Self {
        Self::invalid_request(
            format!(
                "Invalid '{param}': empty array. Expected an array with minimum length 1, \
                 but got an empty array instead."
            ),
            Some(param.to_owned()),
            Some("empty_array"),
        )
    }

    pub(crate) fn below_min(param: &str, min: i64, got: &Value) -> Self {
        Self::invalid_request(
            format!(
                "Invalid '{param}': integer below minimum value. Expected a value >= {min}, \
                 but got {got} instead."
            ),
            Some(param.to_owned()),
            Some("integer_below_min_value"),
        )
    }

    pub(crate) fn above_max(param: &str, max: i64, got: &Value) -> Self {
        Self::invalid_request(
            format!(
                "Invalid '{param}': integer above maximum value. Expected a value <= {max}, \
                 but got {got} instead."
            ),
            Some(param.to_owned()),
            Some("integer_above_max_value"),
        )
    }

    pub(crate) fn streaming_unsupported() -> Self {
        Self::invalid_request(
            "streaming is not supported by the simulator".to_owned(),
            Some("stream".to_owned()),
            Some("unsupported_value"),
        )
    }

    pub(crate) fn bad_authorization() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect API key provided: the Authorization header must be \
                      'Bearer <API key>'."
                .to_owned(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// The 401 of a revoked or wrong key. Like OpenAI, it shows only the
    /// first 8 and last 4 characters of a long key, and none of a short one.
    pub(crate) fn invalid_api_key(key: Option<&str>) -> Self {
        let Some(key) = key else {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "You didn't provide an API key. You need to provide your API key in an \
                          Authorization header using Bearer auth (i.e. Authorization: Bearer \
                          YOUR_KEY), or as the password field (with blank username) if you're \
                          accessing the API from your browser and are prompted for a username \
                          and password. You can obtain an API key from \
                          https://platform.openai.com/account/api-keys."
                    .to_owned(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
            };
        };
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: format!(
                "Incorrect API key provided: {}. You can find your API key at \
                 https://platform.openai.com/account/api-keys.",
                mask_key(key)
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub(crate) fn forbidden() -> Self {
        ApiError {
            status: StatusCode::FORBIDDEN,
            message: "Country, region, or territory not supported".to_owned(),
            kind: "request_forbidden",
            param: None,
            code: Some("unsupported_country_region_territory"),
        }
    }

    pub(crate) fn insufficient_quota() -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "You exceeded your current quota, please check your plan and billing \
                      details. For more information on this error, read the docs: \
                      https://platform.openai.com/docs/guides/error-codes/api-errors."
                .to_owned(),
            kind: "insufficient_quota",
            param: None,
            code: Some("insufficient_quota"),
        }
    }

    /// The 400 of a `bad_request` fault: the request itself is refused.
    pub(crate) fn rejected() -> Self {
        Self::invalid_request(
            "Your request was rejected as a result of our safety system.".to_owned(),
            None,
            Some("invalid_prompt"),
        )
    }

    /// The 503 OpenAI answers while overloaded or starting.
    pub(crate) fn overloaded() -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "The server is overloaded or not ready yet.".to_owned(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub(crate) fn invalid_url(method: &str, path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("Invalid URL ({method} {path})"),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub(crate) fn model_not_found(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model '{model}' does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: None,
            code: Some("model_not_found"),
        }
    }

    pub(crate) fn server_error() -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "The server had an error while processing your request. Sorry about that!"
                .to_owned(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// A 429; `kind` is `requests` or `tokens`, as OpenAI reports which limit was hit.
    pub(crate) fn rate_limited(kind: &'static str, message: String) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message,
            kind,
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    /// The JSON body, serialised once.
    pub(crate) fn to_body(&self) -> Vec<u8> {
        let envelope = Envelope {
            error: Body {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        // Serialising plain strings and options cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }
}

impl ApiError {
    /// The same error in Anthropic's shape, typed by its status.
    pub(crate) fn to_anthropic_body(&self) -> Vec<u8> {
        let body =
            crate::anthropic::ErrorResponse::for_status(self.status.as_u16(), self.message.clone());
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// A key as OpenAI echoes it: the first 8 and last 4 characters of a key
/// of more than 16, stars for the rest; only stars for a shorter one.
fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 16 {
        return "*".repeat(chars.len());
    }
    let (head, tail) = (8, 4);
    let mut masked: String = chars[..head].iter().collect();
    masked.push_str(&"*".repeat(chars.len() - head - tail));
    masked.extend(&chars[chars.len() - tail..]);
    masked
}

/// How OpenAI names a JSON value's type in its messages.
fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a decimal",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn body_has_openai_error_shape_with_null_param_and_code() {
        let body: Value = serde_json::from_slice(&ApiError::server_error().to_body()).unwrap();
        assert_eq!(
            body,
            json!({"error": {
                "message": "The server had an error while processing your request. Sorry about that!",
                "type": "server_error",
                "param": null,
                "code": null
            }})
        );
    }

    #[test]
    fn api_key_is_masked_and_never_echoed_in_full() {
        let key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123";
        let error = ApiError::invalid_api_key(Some(key));
        assert_eq!(error.code, Some("invalid_api_key"));
        assert!(!error.message.contains(key), "{}", error.message);
        assert!(error
            .message
            .starts_with("Incorrect API key provided: sk-proj-**************************0123."));
        assert_eq!(mask_key("sk-short"), "********");
        assert_eq!(mask_key("sk-0123456789abcd"), "sk-01234*****abcd");
    }

    #[test]
    fn invalid_type_names_the_parameter_and_the_received_type() {
        let error = ApiError::invalid_type("model", "a string", &json!(7));
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert_eq!(error.param.as_deref(), Some("model"));
        assert_eq!(
            error.message,
            "Invalid type for 'model': expected a string, but got an integer instead."
        );
    }
}
