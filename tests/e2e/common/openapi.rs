//! Validates Chat Completions bodies against OpenAI's published OpenAPI spec,
//! so tests prove "shaped like OpenAI" against the source rather than our
//! reading of it.
//!
//! The spec is vendored at `tests/fixtures/openai-openapi.json` (MIT, see
//! `openai-openapi.LICENSE` beside it); a checkout next to the shared folder
//! also finds `../shared/vendor/openai-openapi.json`.
//!
//! The spec says `openapi: 3.1.0` (JSON Schema 2020-12) but still marks some
//! fields with OpenAPI 3.0's `nullable: true`, which JSON Schema ignores; those
//! schemas are rewritten to also accept `null`. `discriminator` and the `x-*`
//! extensions are annotations and are left alone.
//!
//! Use it with `#[path = "common/openapi.rs"] mod openapi;` or from a
//! `tests/e2e/common/mod.rs` with `pub mod openapi;`.

// Each test binary uses only some of the helpers.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

use serde_json::{json, Map, Value};

/// Where the spec is looked for, first match wins: the fixture is what CI has.
const SPEC_PATHS: [&str; 2] = [
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/openai-openapi.json"
    ),
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/vendor/openai-openapi.json"
    ),
];

const SCHEMA_REF_PREFIX: &str = "#/components/schemas/";

/// Checks a request body against `CreateChatCompletionRequest`.
pub fn validate_chat_request(body: &Value) -> Result<(), Vec<String>> {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    validate(
        VALIDATOR.get_or_init(|| compile("CreateChatCompletionRequest")),
        body,
    )
}

/// Checks a response body against `CreateChatCompletionResponse`.
pub fn validate_chat_response(body: &Value) -> Result<(), Vec<String>> {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    validate(
        VALIDATOR.get_or_init(|| compile("CreateChatCompletionResponse")),
        body,
    )
}

/// Checks `body` against the spec's schema `name` (compiled each call:
/// for the few checks outside the hot test paths).
pub fn validate_schema(name: &str, body: &Value) -> Result<(), Vec<String>> {
    validate(&compile(name), body)
}

/// Checks one line of a Batch API input file: `custom_id`, `method` POST,
/// `url` `/v1/chat/completions`, and a `body` that is a
/// `CreateChatCompletionRequest` (the spec has no schema for the line itself).
pub fn validate_batch_input_line(line: &Value) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    if line["custom_id"].as_str().is_none_or(str::is_empty) {
        errors.push("custom_id: a non-empty string is required".to_owned());
    }
    if line["method"] != "POST" {
        errors.push(format!("method: POST required, got {}", line["method"]));
    }
    if line["url"] != "/v1/chat/completions" {
        errors.push(format!(
            "url: /v1/chat/completions required, got {}",
            line["url"]
        ));
    }
    if let Some(extra) = line.as_object().and_then(|m| {
        m.keys()
            .find(|k| !["custom_id", "method", "url", "body"].contains(&k.as_str()))
    }) {
        errors.push(format!("unknown field {extra}"));
    }
    if let Err(mut e) = validate_chat_request(&line["body"]) {
        errors.append(&mut e);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn validate(validator: &jsonschema::Validator, body: &Value) -> Result<(), Vec<String>> {
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|error| format!("at '{}': {error}", error.instance_path))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// The parsed spec, read once per test binary.
fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = SPEC_PATHS
            .iter()
            .map(Path::new)
            .find(|path| path.exists())
            .unwrap_or_else(|| panic!("OpenAI OpenAPI spec not found; looked at {SPEC_PATHS:?}"));
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
        serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{} is not JSON: {error}", path.display()))
    })
}

/// A JSON Schema document holding `name` and every schema it refers to,
/// with `"$ref": "#/components/schemas/<name>"` at its root.
fn compile(name: &str) -> jsonschema::Validator {
    let spec = spec();
    let version = spec["openapi"].as_str().unwrap_or_default();
    assert!(
        version.starts_with("3."),
        "expected an OpenAPI 3.x spec, found version '{version}'"
    );
    let all = spec["components"]["schemas"]
        .as_object()
        .expect("the spec has components.schemas");

    let mut needed = BTreeSet::new();
    let mut pending = vec![name.to_owned()];
    while let Some(next) = pending.pop() {
        if !needed.insert(next.clone()) {
            continue;
        }
        let schema = all
            .get(&next)
            .unwrap_or_else(|| panic!("the spec has no schema '{next}'"));
        collect_refs(schema, &mut pending);
    }
    let schemas: Map<String, Value> = needed
        .into_iter()
        .map(|name| {
            let mut schema = all[&name].clone();
            accept_null_where_nullable(&mut schema);
            (name, schema)
        })
        .collect();

    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("{SCHEMA_REF_PREFIX}{name}"),
        "components": {"schemas": schemas},
    });
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .unwrap_or_else(|error| panic!("cannot compile the schema of {name}: {error}"))
}

fn collect_refs(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                if let Some(name) = reference.strip_prefix(SCHEMA_REF_PREFIX) {
                    into.push(name.to_owned());
                }
            }
            map.values().for_each(|child| collect_refs(child, into));
        }
        Value::Array(items) => items.iter().for_each(|child| collect_refs(child, into)),
        _ => {}
    }
}

/// OpenAPI 3.0's `nullable: true` becomes `anyOf: [schema, {type: null}]`.
fn accept_null_where_nullable(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.values_mut().for_each(accept_null_where_nullable);
            if map.get("nullable") == Some(&Value::Bool(true)) {
                map.remove("nullable");
                let schema = Value::Object(std::mem::take(map));
                *value = json!({"anyOf": [schema, {"type": "null"}]});
            }
        }
        Value::Array(items) => items.iter_mut().for_each(accept_null_where_nullable),
        _ => {}
    }
}
