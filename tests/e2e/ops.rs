//! The operations files checked without running batchd: the alert rules
//! (`promtool check rules`, `promtool test rules` with a firing and a
//! quiet case for every alert, a runbook section each), the metric names
//! the rules and the dashboard read (each one batchd exports), and the
//! compose file (`docker-compose config`).

use crate::common;

use std::collections::BTreeSet;

use batchd_actors::metrics as m;
use common::prometheus::{repo, run_ok, tool};
use common::promql::metric_names;
use serde_yaml::Value as Yaml;

const RULES: &str = "config/prometheus/alerts.yml";
const RULE_TESTS: [&str; 2] = ["alerts.test.yml", "alerts.weekly.test.yml"];
const DASHBOARD: &str = "config/grafana/dashboards/batchd.json";

fn yaml(path: &str) -> Yaml {
    let text = std::fs::read_to_string(repo().join(path)).expect(path);
    serde_yaml::from_str(&text).expect(path)
}

/// Every rule of the rule file.
fn rules() -> Vec<Yaml> {
    yaml(RULES)["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .collect()
}

fn alert_names() -> Vec<String> {
    rules()
        .iter()
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let out = run_ok(&promtool, &["check", "rules", RULES], &repo());
    assert!(out.contains("SUCCESS"), "{out}");
    let mut args = vec!["test", "rules"];
    args.extend(RULE_TESTS);
    let out = run_ok(&promtool, &args, &repo().join("config/prometheus/tests"));
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test_and_a_runbook() {
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for file in RULE_TESTS {
        let tests = yaml(&format!("config/prometheus/tests/{file}"));
        for t in tests["tests"].as_sequence().expect("tests") {
            for case in t["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = case["alertname"].as_str().expect("alertname").to_owned();
                match case["exp_alerts"].as_sequence() {
                    Some(list) if !list.is_empty() => firing.insert(name),
                    _ => quiet.insert(name),
                };
            }
        }
    }
    let operations = std::fs::read_to_string(repo().join("docs/OPERATIONS.md")).unwrap();
    for rule in rules().iter().filter(|r| r["alert"].is_string()) {
        let name = rule["alert"].as_str().unwrap();
        assert!(firing.contains(name), "{name} has no firing test");
        assert!(quiet.contains(name), "{name} has no quiet test");
        for key in ["summary", "description", "runbook"] {
            assert!(rule["annotations"][key].is_string(), "{name} has no {key}");
        }
        let anchor = format!("docs/OPERATIONS.md#{}", name.to_lowercase());
        assert_eq!(
            rule["annotations"]["runbook"].as_str(),
            Some(anchor.as_str())
        );
        assert!(
            operations.contains(&format!("\n### {name}\n")),
            "docs/OPERATIONS.md has no `### {name}` section"
        );
    }
    assert!(alert_names().len() >= 10);
}

/// Names a rule or panel may read: what batchd exports, what the rule file
/// records, and Prometheus's own `up`.
fn allowed_names() -> BTreeSet<String> {
    let mut allowed: BTreeSet<String> = rules()
        .iter()
        .filter_map(|r| r["record"].as_str().map(str::to_owned))
        .collect();
    allowed.insert("up".to_owned());
    allowed
}

#[test]
fn rules_and_dashboard_read_only_metrics_batchd_exports() {
    let allowed = allowed_names();
    let check = |what: &str, expr: &str| {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{what} reads no metric: {expr}");
        for name in names {
            assert!(
                m::is_exported(&name) || allowed.contains(&name),
                "{what} reads {name:?}, which batchd does not export (actors/src/metrics.rs)"
            );
        }
    };
    for rule in rules() {
        let what = rule["alert"]
            .as_str()
            .or(rule["record"].as_str())
            .expect("a rule is an alert or a record");
        check(what, rule["expr"].as_str().expect("expr"));
    }
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 20, "{} panel queries", exprs.len());
    for (panel, expr) in &exprs {
        check(panel, expr);
    }
    // Every metric batchd exports is on the dashboard or in a rule.
    let mut read: BTreeSet<String> = exprs.iter().flat_map(|(_, e)| metric_names(e)).collect();
    read.extend(
        rules()
            .iter()
            .flat_map(|r| metric_names(r["expr"].as_str().unwrap())),
    );
    for name in m::ALL.into_iter().filter(|n| !m::HISTOGRAMS.contains(n)) {
        if name != m::ROUTE_RATE_LIMIT {
            assert!(read.contains(name), "{name} is on no panel and in no rule");
        }
    }
}

/// (panel title, PromQL) of every dashboard query.
pub fn dashboard_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join(DASHBOARD)).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                panel["title"].as_str().unwrap_or_default().to_owned(),
                target["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    out
}

#[test]
fn compose_file_is_valid_and_mounts_files_that_exist() {
    let compose: Yaml =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap())
            .unwrap();
    for (name, service) in compose["services"].as_mapping().expect("services") {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if let Some(path) = source.strip_prefix("./") {
                assert!(
                    repo().join(path).exists(),
                    "{name:?} mounts {source}, which does not exist"
                );
            }
        }
    }
    let Some(docker_compose) = tool("docker-compose") else {
        return;
    };
    run_ok(
        &docker_compose,
        &["-f", "docker-compose.yml", "config", "-q"],
        &repo(),
    );
}
