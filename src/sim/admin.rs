//! The simulator's own control API under `/sim/`, beside (not inside)
//! OpenAI's `/v1/`: scripted faults, the faults' clock and the counters.
//!
//! - `GET /sim/faults`: the faults and the clock, `{"clock": "1.5s", "faults": [...]}`.
//! - `POST /sim/faults`: adds one fault object or a list of them, all or none.
//! - `DELETE /sim/faults`: removes every fault, `{"cleared": n}`.
//! - `GET /sim/stats`: the totals of [`SimStats`] and `models`, the same
//!   counters per model.
//! - `GET /sim/bill`: billed tokens per model (requests answered with a 200
//!   at the default tier).
//! - `GET /sim/tiers`: `{"flex": {...}, "priority": {...}, "flex_models": [...]}`:
//!   the bills of the answers served at the flex tier (priced at the batch
//!   rate) and at the priority tier (priced at the priority premium), and
//!   the models that take flex.
//! - `POST /sim/clock/reset`: the faults' clock starts again at zero.
//! - `GET /sim/batches`: `{"created": n, "bill": {...}, "faults": {...}}`:
//!   batches created (OpenAI Batches and Anthropic Message Batches), the
//!   batch part of the bill (tokens per model, priced at the batch rate) and
//!   the batch faults in force.
//! - `POST /sim/batches/faults`: sets the batch faults for batches of
//!   either API created from now on (`{"expire_after_lines": 2, "failing_custom_ids": ["t1"]}`).
//!
//! Errors use OpenAI's error body with status 400.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;

use super::api_error::ApiError;
use super::fault::Fault;
use super::rate_limit::format_duration;
use super::service::{error_response, invalid_url, json_response, Shared};
use super::SimStats;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/sim/faults",
            get(list_faults)
                .post(add_faults)
                .delete(clear_faults)
                .fallback(invalid_url),
        )
        .route("/sim/stats", get(stats).fallback(invalid_url))
        .route("/sim/bill", get(bill).fallback(invalid_url))
        .route("/sim/tiers", get(tier_bills).fallback(invalid_url))
        .route("/sim/clock/reset", post(reset_clock).fallback(invalid_url))
        .route("/sim/batches", get(batches).fallback(invalid_url))
        .route(
            "/sim/batches/faults",
            post(set_batch_faults).fallback(invalid_url),
        )
}

#[derive(Serialize)]
struct FaultList {
    clock: String,
    faults: Vec<Fault>,
}

fn fault_list(shared: &Shared) -> Response {
    let list = FaultList {
        clock: format_duration(shared.clock()),
        faults: shared.faults(),
    };
    json_response(StatusCode::OK, &list)
}

async fn list_faults(State(shared): State<Arc<Shared>>) -> Response {
    fault_list(&shared)
}

async fn add_faults(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(body) = body else {
        return error_response(&ApiError::unparsable_json());
    };
    // Chosen by shape, so an error names the fault's problem.
    let parsed = if body.trim_ascii_start().starts_with(b"[") {
        serde_json::from_slice::<Vec<Fault>>(&body)
    } else {
        serde_json::from_slice::<Fault>(&body).map(|fault| vec![fault])
    };
    let faults = match parsed {
        Ok(faults) => faults,
        Err(error) => return bad_request(format!("invalid fault: {error}")),
    };
    match shared.add_faults(faults) {
        Ok(()) => fault_list(&shared),
        Err(error) => bad_request(format!("invalid fault: {error}")),
    }
}

async fn clear_faults(State(shared): State<Arc<Shared>>) -> Response {
    #[derive(Serialize)]
    struct Cleared {
        cleared: usize,
    }
    let cleared = shared.clear_faults();
    json_response(StatusCode::OK, &Cleared { cleared })
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    #[derive(Serialize)]
    struct Stats {
        #[serde(flatten)]
        totals: SimStats,
        models: BTreeMap<String, SimStats>,
    }
    let stats = Stats {
        totals: shared.stats(),
        models: shared.model_stats(),
    };
    json_response(StatusCode::OK, &stats)
}

async fn bill(State(shared): State<Arc<Shared>>) -> Response {
    json_response(StatusCode::OK, &shared.bill())
}

async fn tier_bills(State(shared): State<Arc<Shared>>) -> Response {
    let report = serde_json::json!({
        "flex": shared.flex_bill(),
        "priority": shared.priority_bill(),
        "flex_models": shared.flex_models(),
    });
    json_response(StatusCode::OK, &report)
}

fn batch_report(shared: &Shared) -> Response {
    let faults = super::service::lock(&shared.batches).faults();
    let report = serde_json::json!({
        "created": shared.batch_creations(),
        "bill": shared.batch_bill(),
        "faults": faults,
    });
    json_response(StatusCode::OK, &report)
}

async fn batches(State(shared): State<Arc<Shared>>) -> Response {
    batch_report(&shared)
}

async fn set_batch_faults(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(body) = body else {
        return error_response(&ApiError::unparsable_json());
    };
    match serde_json::from_slice::<super::BatchFaults>(&body) {
        Ok(faults) => {
            super::service::lock(&shared.batches).set_faults(faults);
            batch_report(&shared)
        }
        Err(error) => bad_request(format!("invalid batch faults: {error}")),
    }
}

async fn reset_clock(State(shared): State<Arc<Shared>>) -> Response {
    shared.reset_clock();
    fault_list(&shared)
}

fn bad_request(message: String) -> Response {
    error_response(&ApiError::invalid_request(message, None, None))
}
