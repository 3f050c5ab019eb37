//! Scripted faults: outages, refused connections, auth and quota failures,
//! 429 storms and slowness, each in a time window on the simulator's clock
//! and optionally for one model.
//!
//! The syntax shared by `--fault`, [`Fault`]'s `FromStr` and `Display` is
//! `KIND[=VALUE]@FROM..UNTIL[:MODEL]`, for example `outage@10s..20s`,
//! `unauthorized@0s..30s:gpt-4.1-nano` or `slow=2000@5s..15s`. Times are
//! offsets from the clock's start, `FROM` included and `UNTIL` excluded, in
//! Go-style durations (`250ms`, `1.5s`, `1m30s`). Files and the admin API use
//! objects with the same parts: `{"kind": "slow", "value": 2000, "from": "5s",
//! "until": "15s", "model": "gpt-4.1"}`.
//!
//! No I/O and no clock of its own: callers pass `now`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::rate_limit::format_duration;

/// At most this many faults at once, so the admin API cannot grow memory
/// or the per-request scan without bound.
pub const MAX_FAULTS: usize = 1000;

/// Retry-after of a `rate_limit_storm` given without a value.
const DEFAULT_STORM_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Longest offset or value accepted: a week is far beyond any test run.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a fault does to the requests in its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Every chat completion is answered with this 5xx status: 503 "The
    /// server is overloaded or not ready yet." or 500 "The server had an
    /// error while processing your request."
    Outage { status: u16 },
    /// The listener is closed and open connections are dropped; it reopens
    /// on the same port when the window ends. Never per model.
    Refuse,
    /// 401 `invalid_api_key`, as for a revoked key.
    Unauthorized,
    /// 403 `unsupported_country_region_territory`.
    Forbidden,
    /// 404 `model_not_found`.
    ModelNotFound,
    /// 429 `insufficient_quota`, without `retry-after`.
    Quota,
    /// 400 `invalid_request_error`: the provider refuses the request itself,
    /// as it does for a prompt it will not serve.
    BadRequest,
    /// 429 `rate_limit_exceeded` with `retry-after` and `retry-after-ms`.
    RateLimitStorm { retry_after: Duration },
    /// Extra latency before the answer, whatever the answer is.
    Slow { extra: Duration },
}

/// Kind names as written in the fault syntax, in the order they are listed
/// in error messages.
const KIND_NAMES: [&str; 9] = [
    "outage",
    "refuse",
    "unauthorized",
    "forbidden",
    "model_not_found",
    "quota",
    "bad_request",
    "rate_limit_storm",
    "slow",
];

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Outage { .. } => "outage",
            FaultKind::Refuse => "refuse",
            FaultKind::Unauthorized => "unauthorized",
            FaultKind::Forbidden => "forbidden",
            FaultKind::ModelNotFound => "model_not_found",
            FaultKind::Quota => "quota",
            FaultKind::BadRequest => "bad_request",
            FaultKind::RateLimitStorm { .. } => "rate_limit_storm",
            FaultKind::Slow { .. } => "slow",
        }
    }

    /// The kind named `name` (`-` may stand for `_`) with its optional value:
    /// the status of an `outage`, the milliseconds of `slow` and of a
    /// `rate_limit_storm`'s retry-after.
    pub fn from_parts(name: &str, value: Option<u64>) -> Result<FaultKind, FaultError> {
        let name = name.trim().replace('-', "_");
        let no_value = |kind: FaultKind| match value {
            None => Ok(kind),
            Some(_) => Err(FaultError::UnexpectedValue(kind.name())),
        };
        match name.as_str() {
            "outage" => match value.unwrap_or(503) {
                status @ (500 | 503) => Ok(FaultKind::Outage {
                    status: status as u16,
                }),
                other => Err(FaultError::OutageStatus(other)),
            },
            "refuse" => no_value(FaultKind::Refuse),
            "unauthorized" => no_value(FaultKind::Unauthorized),
            "forbidden" => no_value(FaultKind::Forbidden),
            "model_not_found" => no_value(FaultKind::ModelNotFound),
            "quota" => no_value(FaultKind::Quota),
            "bad_request" => no_value(FaultKind::BadRequest),
            "rate_limit_storm" => {
                let retry_after = match value {
                    None => DEFAULT_STORM_RETRY_AFTER,
                    Some(ms) => positive_millis("rate_limit_storm", ms)?,
                };
                Ok(FaultKind::RateLimitStorm { retry_after })
            }
            "slow" => {
                let ms = value.ok_or(FaultError::MissingValue(
                    "slow needs its extra latency in ms, e.g. slow=2000@5s..15s",
                ))?;
                Ok(FaultKind::Slow {
                    extra: positive_millis("slow", ms)?,
                })
            }
            _ => Err(FaultError::UnknownKind(name)),
        }
    }

    /// The value written after `=`, when the kind has one to show.
    fn value(self) -> Option<u64> {
        let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        match self {
            FaultKind::Outage { status: 503 } => None,
            FaultKind::Outage { status } => Some(u64::from(status)),
            FaultKind::RateLimitStorm { retry_after } => Some(millis(retry_after)),
            FaultKind::Slow { extra } => Some(millis(extra)),
            _ => None,
        }
    }

    /// Whether the fault answers the request in place of the model; `slow`
    /// only delays and `refuse` acts on connections.
    fn answers(self) -> bool {
        !matches!(self, FaultKind::Refuse | FaultKind::Slow { .. })
    }

    /// Which answering fault wins when several are active: the ones a real
    /// provider checks first (the key, then the model, then the account).
    fn precedence(self) -> u8 {
        match self {
            FaultKind::Unauthorized => 0,
            FaultKind::Forbidden => 1,
            FaultKind::ModelNotFound => 2,
            FaultKind::Quota => 3,
            FaultKind::BadRequest => 4,
            FaultKind::Outage { .. } => 5,
            FaultKind::RateLimitStorm { .. } => 6,
            FaultKind::Refuse | FaultKind::Slow { .. } => u8::MAX,
        }
    }
}

fn positive_millis(kind: &'static str, ms: u64) -> Result<Duration, FaultError> {
    let duration = Duration::from_millis(ms);
    if ms == 0 || duration > MAX_DURATION {
        return Err(FaultError::ValueRange { kind, ms });
    }
    Ok(duration)
}

/// One scripted fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FaultFields", into = "FaultFields")]
pub struct Fault {
    pub kind: FaultKind,
    /// Start of the window, from the clock's start (included).
    pub from: Duration,
    /// End of the window, from the clock's start (excluded).
    pub until: Duration,
    /// Only requests whose body names this model; `None` for all.
    pub model: Option<String>,
}

impl Fault {
    /// A fault for every model during `window`.
    pub fn new(kind: FaultKind, window: Range<Duration>) -> Fault {
        Fault {
            kind,
            from: window.start,
            until: window.end,
            model: None,
        }
    }

    /// The same fault limited to requests for `model`.
    pub fn for_model(mut self, model: impl Into<String>) -> Fault {
        self.model = Some(model.into());
        self
    }

    /// Checks what the types cannot: a window that is not empty, a model
    /// that is not blank and not on `refuse`, values in range.
    pub fn validate(&self) -> Result<(), FaultError> {
        if self.from >= self.until {
            return Err(FaultError::EmptyWindow {
                from: format_duration(self.from),
                until: format_duration(self.until),
            });
        }
        if self.until > MAX_DURATION {
            return Err(FaultError::TooLate(format_duration(self.until)));
        }
        match &self.model {
            Some(model) if model.trim().is_empty() => return Err(FaultError::EmptyModel),
            Some(_) if self.kind == FaultKind::Refuse => return Err(FaultError::RefusePerModel),
            _ => {}
        }
        match self.kind {
            FaultKind::Outage { status } if !matches!(status, 500 | 503) => {
                Err(FaultError::OutageStatus(u64::from(status)))
            }
            FaultKind::RateLimitStorm { retry_after: value } | FaultKind::Slow { extra: value }
                if value.is_zero() || value > MAX_DURATION =>
            {
                Err(FaultError::ValueRange {
                    kind: self.kind.name(),
                    ms: u64::try_from(value.as_millis()).unwrap_or(u64::MAX),
                })
            }
            _ => Ok(()),
        }
    }

    fn is_active(&self, at: Duration) -> bool {
        self.from <= at && at < self.until
    }

    fn applies_to(&self, model: Option<&str>) -> bool {
        match (&self.model, model) {
            (None, _) => true,
            (Some(wanted), Some(model)) => wanted == model,
            (Some(_), None) => false,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.name())?;
        if let Some(value) = self.kind.value() {
            write!(f, "={value}")?;
        }
        write!(
            f,
            "@{}..{}",
            format_duration(self.from),
            format_duration(self.until)
        )?;
        if let Some(model) = &self.model {
            write!(f, ":{model}")?;
        }
        Ok(())
    }
}

impl FromStr for Fault {
    type Err = FaultError;

    /// Parses `KIND[=VALUE]@FROM..UNTIL[:MODEL]`. The model is everything
    /// after the first `:` that follows the window, so fine-tuned model ids
    /// (`ft:gpt-4o-mini:org::id`) work.
    fn from_str(spec: &str) -> Result<Fault, FaultError> {
        let (head, rest) = spec.trim().split_once('@').ok_or(FaultError::Syntax)?;
        let (name, value) = match head.split_once('=') {
            Some((name, value)) => {
                let number = value.trim().parse::<u64>().map_err(|_| FaultError::Value {
                    kind: name.trim().to_owned(),
                    text: value.to_owned(),
                })?;
                (name, Some(number))
            }
            None => (head, None),
        };
        let kind = FaultKind::from_parts(name, value)?;
        let (window, model) = match rest.split_once(':') {
            Some((window, model)) => (window, Some(model.trim().to_owned())),
            None => (rest, None),
        };
        let (from, until) = window
            .split_once("..")
            .ok_or_else(|| FaultError::Window(window.to_owned()))?;
        let fault = Fault {
            kind,
            from: parse_duration(from)?,
            until: parse_duration(until)?,
            model,
        };
        fault.validate()?;
        Ok(fault)
    }
}

/// A fault as files and the admin API write it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultFields {
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<u64>,
    from: String,
    until: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model: Option<String>,
}

impl TryFrom<FaultFields> for Fault {
    type Error = FaultError;

    fn try_from(fields: FaultFields) -> Result<Fault, FaultError> {
        let fault = Fault {
            kind: FaultKind::from_parts(&fields.kind, fields.value)?,
            from: parse_duration(&fields.from)?,
            until: parse_duration(&fields.until)?,
            model: fields.model,
        };
        fault.validate()?;
        Ok(fault)
    }
}

impl From<Fault> for FaultFields {
    fn from(fault: Fault) -> FaultFields {
        FaultFields {
            kind: fault.kind.name().to_owned(),
            value: fault.kind.value(),
            from: format_duration(fault.from),
            until: format_duration(fault.until),
            model: fault.model,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("expected KIND[=VALUE]@FROM..UNTIL[:MODEL], for example outage@10s..20s")]
    Syntax,
    #[error("unknown fault kind '{0}'; expected one of {kinds}", kinds = KIND_NAMES.join(", "))]
    UnknownKind(String),
    #[error("the value of {kind} must be a whole number, not '{text}'")]
    Value { kind: String, text: String },
    #[error("{0} takes no value")]
    UnexpectedValue(&'static str),
    #[error("{0}")]
    MissingValue(&'static str),
    #[error("an outage answers 500 or 503, not {0}")]
    OutageStatus(u64),
    #[error("the value of {kind} is in ms and must be between 1 and a week, not {ms}")]
    ValueRange { kind: &'static str, ms: u64 },
    #[error("window '{0}' must be FROM..UNTIL, for example 10s..20s")]
    Window(String),
    #[error("'{text}' is not a duration: {reason}")]
    Duration { text: String, reason: &'static str },
    #[error("the window {from}..{until} is empty: it must end after it starts")]
    EmptyWindow { from: String, until: String },
    #[error("the window ends at {0}, more than a week after the start")]
    TooLate(String),
    #[error("the model after ':' is empty")]
    EmptyModel,
    #[error("refuse closes the whole listener and cannot be limited to one model")]
    RefusePerModel,
    #[error("at most {MAX_FAULTS} faults can be set at once")]
    TooMany,
}

/// A Go-style duration: one or more `NUMBER UNIT` parts, units `ms`, `s`,
/// `m` and `h`, decimals allowed (`250ms`, `1.5s`, `1m30s`); a bare `0` too.
pub fn parse_duration(text: &str) -> Result<Duration, FaultError> {
    let text = text.trim();
    let error = |reason| FaultError::Duration {
        text: text.to_owned(),
        reason,
    };
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(error("it is empty"));
    }
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(error("each number needs a unit: ms, s, m or h")),
            _ => return Err(error("units are ms, s, m and h")),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return Err(error("a unit needs a number before it"));
        }
        if fraction.contains('.') || fraction.len() > 9 {
            return Err(error("not a number"));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| error("not a number"))?
        };
        let fraction_value: u128 = if fraction.is_empty() {
            0
        } else {
            fraction.parse().map_err(|_| error("not a number"))?
        };
        let scale = 10u128.pow(fraction.len() as u32);
        total = whole
            .checked_mul(unit_nanos)
            .and_then(|nanos| nanos.checked_add(fraction_value * unit_nanos / scale))
            .and_then(|nanos| total.checked_add(nanos))
            .ok_or_else(|| error("too long"))?;
        rest = after;
    }
    let total = u64::try_from(total).map_err(|_| error("too long"))?;
    let duration = Duration::from_nanos(total);
    if duration > MAX_DURATION {
        return Err(error("longer than a week"));
    }
    Ok(duration)
}

/// The faults and the clock their windows are measured on.
#[derive(Debug, Clone)]
pub(crate) struct FaultClock {
    started: Instant,
    faults: Vec<Fault>,
}

/// What the active faults do to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Effects {
    /// The fault that answers in place of the model, if any.
    pub answer: Option<FaultKind>,
    /// Sum of the active `slow` faults.
    pub extra_latency: Duration,
}

/// What the listener should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenPlan {
    /// Closed until this long from now (then look again).
    Refuse { for_: Duration },
    /// Open; the next refusal starts this long from now, if one is scheduled.
    Open { next_refusal_in: Option<Duration> },
}

impl FaultClock {
    pub(crate) fn new(now: Instant) -> Self {
        FaultClock {
            started: now,
            faults: Vec::new(),
        }
    }

    pub(crate) fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    pub(crate) fn reset(&mut self, now: Instant) {
        self.started = now;
    }

    pub(crate) fn faults(&self) -> &[Fault] {
        &self.faults
    }

    /// Adds all of `faults` or, if one is invalid or they are too many, none.
    pub(crate) fn add(&mut self, faults: Vec<Fault>) -> Result<(), FaultError> {
        for fault in &faults {
            fault.validate()?;
        }
        if self.faults.len() + faults.len() > MAX_FAULTS {
            return Err(FaultError::TooMany);
        }
        self.faults.extend(faults);
        Ok(())
    }

    /// Removes every fault; returns how many there were.
    pub(crate) fn clear(&mut self) -> usize {
        std::mem::take(&mut self.faults).len()
    }

    /// The faults that act on a request for `model` arriving at `now`.
    pub(crate) fn effects(&self, now: Instant, model: Option<&str>) -> Effects {
        let at = self.elapsed(now);
        let mut effects = Effects::default();
        for fault in &self.faults {
            if !fault.is_active(at) || !fault.applies_to(model) {
                continue;
            }
            match fault.kind {
                FaultKind::Slow { extra } => {
                    effects.extra_latency = effects.extra_latency.saturating_add(extra);
                }
                // Without a model there is nothing to be "not found".
                FaultKind::ModelNotFound if model.is_none() => {}
                kind if kind.answers() => {
                    let wins = effects
                        .answer
                        .is_none_or(|current| kind.precedence() < current.precedence());
                    if wins {
                        effects.answer = Some(kind);
                    }
                }
                _ => {}
            }
        }
        effects
    }

    pub(crate) fn listen_plan(&self, now: Instant) -> ListenPlan {
        let at = self.elapsed(now);
        let refusals = self
            .faults
            .iter()
            .filter(|fault| fault.kind == FaultKind::Refuse);
        let mut open_at = None;
        let mut next_start = None;
        for fault in refusals {
            if fault.is_active(at) {
                open_at = open_at.max(Some(fault.until));
            } else if fault.from > at {
                next_start =
                    Some(next_start.map_or(fault.from, |start: Duration| start.min(fault.from)));
            }
        }
        match open_at {
            Some(until) => ListenPlan::Refuse {
                for_: until.saturating_sub(at),
            },
            None => ListenPlan::Open {
                next_refusal_in: next_start.map(|start| start.saturating_sub(at)),
            },
        }
    }
}

/// Reads faults from a JSON file (a list of fault objects, or an object
/// with a `faults` list) or a TOML file (`[[faults]]` tables), by extension.
pub fn load_faults(path: &Path) -> Result<Vec<Fault>, FaultsFileError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct FaultsTable {
        faults: Vec<Fault>,
    }

    let text = std::fs::read_to_string(path).map_err(|source| FaultsFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let extension = path
        .extension()
        .and_then(|extension| extension.to_str())
        .map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("json") if text.trim_start().starts_with('[') => serde_json::from_str(&text),
        Some("json") => serde_json::from_str::<FaultsTable>(&text).map(|table| table.faults),
        Some("toml") => {
            return toml::from_str::<FaultsTable>(&text)
                .map(|table| table.faults)
                .map_err(|source| FaultsFileError::Toml {
                    path: path.to_owned(),
                    source: Box::new(source),
                })
        }
        _ => return Err(FaultsFileError::Format(path.to_owned())),
    }
    .map_err(|source| FaultsFileError::Json {
        path: path.to_owned(),
        source,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum FaultsFileError {
    #[error("cannot read the faults file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("faults file {path} is not a valid JSON list of faults")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("faults file {path} is not a valid TOML list of [[faults]]")]
    Toml {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("faults file {0} must end in .json or .toml")]
    Format(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn parse(spec: &str) -> Fault {
        spec.parse()
            .unwrap_or_else(|error| panic!("{spec}: {error}"))
    }

    fn error(spec: &str) -> String {
        match spec.parse::<Fault>() {
            Ok(fault) => panic!("{spec} parsed as {fault:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn parses_every_kind_of_the_documented_syntax() {
        let cases = [
            ("outage@10s..20s", FaultKind::Outage { status: 503 }),
            ("outage=500@10s..20s", FaultKind::Outage { status: 500 }),
            ("refuse@10s..20s", FaultKind::Refuse),
            ("unauthorized@10s..20s", FaultKind::Unauthorized),
            ("forbidden@10s..20s", FaultKind::Forbidden),
            ("model_not_found@10s..20s", FaultKind::ModelNotFound),
            ("model-not-found@10s..20s", FaultKind::ModelNotFound),
            ("quota@10s..20s", FaultKind::Quota),
            ("bad_request@10s..20s", FaultKind::BadRequest),
            ("bad-request@10s..20s", FaultKind::BadRequest),
            (
                "rate_limit_storm@10s..20s",
                FaultKind::RateLimitStorm {
                    retry_after: secs(1),
                },
            ),
            (
                "rate_limit_storm=250@10s..20s",
                FaultKind::RateLimitStorm {
                    retry_after: ms(250),
                },
            ),
            ("slow=2000@10s..20s", FaultKind::Slow { extra: secs(2) }),
        ];
        for (spec, kind) in cases {
            assert_eq!(parse(spec), Fault::new(kind, secs(10)..secs(20)), "{spec}");
        }
    }

    #[test]
    fn model_is_everything_after_the_window_colons_included() {
        assert_eq!(
            parse("unauthorized@0s..30s:gpt-4.1-nano"),
            Fault::new(FaultKind::Unauthorized, secs(0)..secs(30)).for_model("gpt-4.1-nano")
        );
        let fine_tuned = parse("outage@1s..2s:ft:gpt-4o-mini:acme::abc123");
        assert_eq!(
            fine_tuned.model.as_deref(),
            Some("ft:gpt-4o-mini:acme::abc123")
        );
    }

    #[test]
    fn durations_take_go_style_units_and_decimals() {
        let cases = [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("250ms", ms(250)),
            ("1.5s", ms(1500)),
            (".5s", ms(500)),
            ("0.001s", ms(1)),
            ("2m", secs(120)),
            ("1m30s", secs(90)),
            ("1h0m0s", secs(3600)),
            ("1m1.25s", ms(61_250)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        for bad in [
            "",
            "10",
            "5x",
            "s",
            "1.2.3s",
            "1.5",
            "-1s",
            "169h",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "accepted '{bad}'");
        }
    }

    #[test]
    fn display_is_the_syntax_and_parses_back() {
        for spec in [
            "outage@10s..20s",
            "outage=500@1.5s..2m0s",
            "slow=2000@5s..15s:gpt-4.1",
            "rate_limit_storm=1000@0s..1s",
            "refuse@250ms..750ms",
        ] {
            let fault = parse(spec);
            assert_eq!(fault.to_string(), spec);
            assert_eq!(parse(&fault.to_string()), fault);
        }
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        let cases = [
            ("outage", "expected KIND[=VALUE]@FROM..UNTIL[:MODEL]"),
            (
                "blackout@1s..2s",
                "unknown fault kind 'blackout'; expected one of outage, refuse",
            ),
            ("outage@1s", "window '1s' must be FROM..UNTIL"),
            (
                "outage@10..20s",
                "'10' is not a duration: each number needs a unit",
            ),
            ("outage@20s..10s", "the window 20s..10s is empty"),
            ("outage@10s..10s", "the window 10s..10s is empty"),
            ("outage=404@1s..2s", "an outage answers 500 or 503, not 404"),
            ("slow@1s..2s", "slow needs its extra latency in ms"),
            (
                "slow=fast@1s..2s",
                "the value of slow must be a whole number, not 'fast'",
            ),
            (
                "slow=0@1s..2s",
                "the value of slow is in ms and must be between 1 and a week",
            ),
            ("quota=5@1s..2s", "quota takes no value"),
            ("refuse@1s..2s:gpt-4.1", "refuse closes the whole listener"),
            ("outage@1s..2s:", "the model after ':' is empty"),
        ];
        for (spec, expected) in cases {
            let message = error(spec);
            assert!(message.contains(expected), "{spec}: {message}");
        }
    }

    #[test]
    fn objects_from_files_and_the_admin_api_use_the_same_rules() {
        let fault: Fault = serde_json::from_str(
            r#"{"kind": "slow", "value": 2000, "from": "5s", "until": "15s", "model": "gpt-4.1"}"#,
        )
        .unwrap();
        assert_eq!(fault, parse("slow=2000@5s..15s:gpt-4.1"));
        assert_eq!(
            serde_json::to_value(&fault).unwrap(),
            serde_json::json!({"kind": "slow", "value": 2000, "from": "5s", "until": "15s",
                               "model": "gpt-4.1"})
        );
        let bad =
            serde_json::from_str::<Fault>(r#"{"kind": "outage", "from": "9s", "until": "3s"}"#);
        assert!(bad.unwrap_err().to_string().contains("is empty"));
        let unknown_field = serde_json::from_str::<Fault>(
            r#"{"kind": "outage", "from": "1s", "until": "3s", "at": 1}"#,
        );
        assert!(unknown_field
            .unwrap_err()
            .to_string()
            .contains("unknown field `at`"));
    }

    #[test]
    fn windows_include_their_start_and_exclude_their_end() {
        let start = Instant::now();
        let mut clock = FaultClock::new(start);
        clock.add(vec![parse("outage@1s..2s")]).unwrap();
        let at = |offset: Duration| clock.effects(start + offset, Some("m")).answer;
        assert_eq!(at(ms(999)), None);
        assert_eq!(at(secs(1)), Some(FaultKind::Outage { status: 503 }));
        assert_eq!(at(ms(1999)), Some(FaultKind::Outage { status: 503 }));
        assert_eq!(at(secs(2)), None);
    }

    #[test]
    fn model_filter_and_precedence_decide_the_answer() {
        let start = Instant::now();
        let mut clock = FaultClock::new(start);
        clock
            .add(vec![
                parse("rate_limit_storm@0s..10s"),
                parse("outage@0s..10s"),
                parse("unauthorized@0s..10s:gpt-4.1-nano"),
                parse("model_not_found@0s..10s"),
                parse("slow=100@0s..10s:gpt-4.1"),
                parse("slow=50@0s..10s"),
            ])
            .unwrap();
        let now = start + secs(1);
        assert_eq!(
            clock.effects(now, Some("gpt-4.1-nano")).answer,
            Some(FaultKind::Unauthorized),
            "the key is checked first"
        );
        let other = clock.effects(now, Some("gpt-4.1"));
        assert_eq!(other.answer, Some(FaultKind::ModelNotFound));
        assert_eq!(other.extra_latency, ms(150), "slow faults add up");
        let no_model = clock.effects(now, None);
        assert_eq!(
            no_model.answer,
            Some(FaultKind::Outage { status: 503 }),
            "nothing to be not found without a model"
        );
        assert_eq!(no_model.extra_latency, ms(50));
    }

    #[test]
    fn listen_plan_follows_refuse_windows_and_the_clock() {
        let start = Instant::now();
        let mut clock = FaultClock::new(start);
        assert_eq!(
            clock.listen_plan(start),
            ListenPlan::Open {
                next_refusal_in: None
            }
        );
        clock
            .add(vec![
                parse("refuse@2s..3s"),
                parse("refuse@2500ms..4s"),
                parse("outage@0s..1s"),
            ])
            .unwrap();
        assert_eq!(
            clock.listen_plan(start + secs(1)),
            ListenPlan::Open {
                next_refusal_in: Some(secs(1))
            }
        );
        assert_eq!(
            clock.listen_plan(start + ms(2600)),
            ListenPlan::Refuse { for_: ms(1400) },
            "overlapping windows: closed until the later end"
        );
        assert_eq!(
            clock.listen_plan(start + secs(4)),
            ListenPlan::Open {
                next_refusal_in: None
            }
        );
        clock.reset(start + secs(4));
        assert_eq!(
            clock.listen_plan(start + secs(4)),
            ListenPlan::Open {
                next_refusal_in: Some(secs(2))
            },
            "a reset clock replays the windows"
        );
    }

    #[test]
    fn adding_is_all_or_nothing_and_bounded() {
        let mut clock = FaultClock::new(Instant::now());
        let mut invalid = parse("outage@1s..2s");
        invalid.until = Duration::ZERO;
        assert!(clock.add(vec![parse("quota@1s..2s"), invalid]).is_err());
        assert!(clock.faults().is_empty());
        let many = vec![parse("quota@1s..2s"); MAX_FAULTS];
        clock.add(many).unwrap();
        assert_eq!(
            clock.add(vec![parse("quota@1s..2s")]),
            Err(FaultError::TooMany)
        );
        assert_eq!(clock.clear(), MAX_FAULTS);
    }

    #[test]
    fn faults_files_are_read_as_json_or_toml() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("faults.json");
        std::fs::write(
            &json,
            r#"[{"kind": "outage", "from": "10s", "until": "20s"},
                {"kind": "slow", "value": 300, "from": "0s", "until": "5s", "model": "gpt-5"}]"#,
        )
        .unwrap();
        let wrapped = dir.path().join("wrapped.json");
        std::fs::write(
            &wrapped,
            r#"{"faults": [{"kind": "quota", "from": "1s", "until": "2s"}]}"#,
        )
        .unwrap();
        let toml = dir.path().join("faults.toml");
        std::fs::write(
            &toml,
            "[[faults]]\nkind = \"refuse\"\nfrom = \"1s\"\nuntil = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(
            load_faults(&json).unwrap(),
            vec![parse("outage@10s..20s"), parse("slow=300@0s..5s:gpt-5")]
        );
        assert_eq!(load_faults(&wrapped).unwrap(), vec![parse("quota@1s..2s")]);
        assert_eq!(load_faults(&toml).unwrap(), vec![parse("refuse@1s..2s")]);

        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "[[faults]]\nkind = \"refuse\"\nfrom = \"3s\"\nuntil = \"2s\"\n",
        )
        .unwrap();
        let error = load_faults(&bad).unwrap_err();
        let message = format!("{error}: {}", std::error::Error::source(&error).unwrap());
        assert!(
            message.contains("bad.toml") && message.contains("is empty"),
            "{message}"
        );
        let yaml = dir.path().join("faults.yaml");
        std::fs::write(&yaml, "").unwrap();
        assert!(load_faults(&yaml)
            .unwrap_err()
            .to_string()
            .contains(".json or .toml"));
        let missing = load_faults(&dir.path().join("missing.json")).unwrap_err();
        assert!(missing.to_string().contains("missing.json"), "{missing}");
    }
}
