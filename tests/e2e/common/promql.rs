//! The metric names a PromQL expression reads, without a PromQL parser:
//! strings, label matchers, ranges and grouping clauses are dropped, and
//! what is left that is an identifier, not a function call, not a keyword
//! and not a Grafana variable is a metric name.

/// Words that are not metric names, besides the [`GROUPING`] words:
/// aggregations (which may be followed by `by (...)` before their `(`),
/// modifiers, operators and constants.
const KEYWORDS: [&str; 21] = [
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
    "atan2",
];
/// Words followed by a list of label names.
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Every metric name `expr` reads, in order of appearance.
pub fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_quoted(&chars, i),
            '{' => i = skip_until(&chars, i, '}'),
            '[' => i = skip_until(&chars, i, ']'),
            '#' => i = skip_until(&chars, i, '\n'),
            '$' => {
                i += 1;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let call = j < chars.len() && chars[j] == '(';
                let lower = word.to_ascii_lowercase();
                if GROUPING.contains(&lower.as_str()) && call {
                    // `by (label, ...)`: label names, not metrics.
                    i = skip_until(&chars, j, ')');
                } else if !call
                    && !KEYWORDS.contains(&lower.as_str())
                    && !GROUPING.contains(&lower.as_str())
                {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The index after the closing quote of the string opening at `i`.
fn skip_quoted(chars: &[char], i: usize) -> usize {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() && chars[j] != quote {
        if chars[j] == '\\' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

/// The index after the first `close` from `i` on, skipping quoted strings.
fn skip_until(chars: &[char], i: usize, close: char) -> usize {
    let mut j = i + 1;
    while j < chars.len() && chars[j] != close {
        if matches!(chars[j], '"' | '\'' | '`') {
            j = skip_quoted(chars, j);
        } else {
            j += 1;
        }
    }
    j + 1
}

#[test]
fn metric_names_skip_functions_labels_ranges_and_grouping() {
    assert_eq!(
        metric_names("sum by (job) (rate(batchd_cost_usd_total[1d])) / max without (x) (up)"),
        ["batchd_cost_usd_total", "up"]
    );
    let expr = r#"histogram_quantile(0.99, sum by (priority, le) (rate(batchd_task_latency_seconds_bucket{priority="1", model=~"gpt.*"}[$__rate_interval])))
      / on (job) group_left (x) up offset 1w > bool 1.2e3 and batchd:queue_depth:normal"#;
    assert_eq!(
        metric_names(expr),
        [
            "batchd_task_latency_seconds_bucket",
            "up",
            "batchd:queue_depth:normal"
        ]
    );
}
