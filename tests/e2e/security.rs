//! Security against a real nats-server: credentials (password, token,
//! NKey, operator-mode JWT) and TLS (right ones connect, wrong ones fail
//! fast naming what is wrong), batchd under the shipped account config
//! with exactly its permissions, canary secrets that never reach a log
//! line, an outcome, a dead letter or `/metrics`, and label values that
//! producers cannot multiply.

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use batchd::config::Config;
use batchd::nats::NatsError;
use batchd::sim::{SimConfig, SimServer};
use common::jwt;
use common::nats::NatsServer;
use common::process::LoggedBatchd;
use futures::StreamExt;
use serde_json::{json, Value};

const NO_PROVIDER: &str = "http://127.0.0.1:9/v1";

fn config(nats_url: &str, extra: &str) -> Config {
    common::config_with(nats_url, NO_PROVIDER, extra)
}

/// Connects as `config` says; asserts it took less than 6 s either way.
async fn connect(config: &Config) -> Result<async_nats::Client, NatsError> {
    let started = Instant::now();
    let r = batchd::nats::connect(&config.nats).await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    r
}

async fn refused(config: &Config) -> String {
    match connect(config).await {
        Ok(_) => panic!("connected with {:?}", config.nats.auth),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_credentials_connect_and_wrong_ones_fail_fast_naming_what_is_wrong() {
    let user_key = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let dir = NatsServer::dir_for_config();
    let seeds = tempfile::tempdir().unwrap();
    let seed_file = |name: &str, text: &str| {
        let p = seeds.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let right_seed = seed_file("right.nk", &user_key.seed().unwrap());
    let stranger_seed = seed_file("stranger.nk", &stranger.seed().unwrap());
    let garbage_seed = seed_file("garbage.nk", "not a seed\n");
    let conf = format!(
        r#"authorization {{ users = [ {{user: batchd, password: "right-pw"}}, {{nkey: "{}"}} ] }}"#,
        user_key.public_key()
    );
    let nats = NatsServer::start_with_config(dir, &conf, &[]).await;
    let url = nats.url();
    let auth = |toml: &str| config(&url, &format!("[nats.auth]\n{toml}\n"));

    connect(&auth("user = \"batchd\"\npassword = \"right-pw\""))
        .await
        .expect("user and password");
    connect(&auth(&format!("nkey_seed_file = {right_seed:?}")))
        .await
        .expect("NKey seed");

    let e = refused(&auth("user = \"batchd\"\npassword = \"wrong-pw\"")).await;
    assert!(
        e.contains("refused user \"batchd\" with a password")
            && e.contains("authorization violation"),
        "{e}"
    );
    assert!(!e.contains("wrong-pw"), "a password is never printed: {e}");
    let e = refused(&auth(&format!("nkey_seed_file = {stranger_seed:?}"))).await;
    assert!(
        e.contains("refused the NKey seed in") && e.contains("stranger.nk"),
        "{e}"
    );
    let e = refused(&auth(&format!("nkey_seed_file = {garbage_seed:?}"))).await;
    assert!(
        e.contains("nats.auth.nkey_seed_file")
            && e.contains("garbage.nk")
            && e.contains("NKey seed"),
        "{e}"
    );
    let e = refused(&auth("creds_file = \"/nonexistent/batchd.creds\"")).await;
    assert!(
        e.contains("nats.auth.creds_file") && e.contains("/nonexistent/batchd.creds"),
        "{e}"
    );
    let e = refused(&config(&url, "")).await;
    assert!(e.contains("refused no credentials"), "{e}");

    let token_dir = NatsServer::dir_for_config();
    let token_nats =
        NatsServer::start_with_config(token_dir, r#"authorization { token: "right-token" }"#, &[])
            .await;
    let token = |t: &str| config(&token_nats.url(), &format!("[nats.auth]\ntoken = {t:?}\n"));
    connect(&token("right-token")).await.expect("token");
    let e = refused(&token("wrong-token")).await;
    assert!(e.contains("refused a token"), "{e}");
    assert!(!e.contains("wrong-token"), "{e}");
}

/// The simulated provider and batchd's engine on `nats`, authenticating
/// with `auth` (the lines of `[nats.auth]`).
async fn start_batchd(nats: &NatsServer, auth: &str) -> (SimServer, batchd::app::Running) {
    let sim = SimServer::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
        .await
        .unwrap();
    let config = common::config_with(
        &nats.url(),
        &sim.base_url(),
        &format!("[nats.auth]\n{auth}\n"),
    );
    let providers = batchd::app::http_providers(&config).unwrap();
    let running = batchd::app::start(&config, providers)
        .await
        .unwrap_or_else(|e| panic!("batchd starts with {auth}: {e:#}\n{}", nats.log()));
    (sim, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_mode_credentials_file_runs_batchd_and_wrong_files_fail_fast_naming_the_file() {
    let operator = jwt::operator("batchd-test");
    let system = jwt::system_account(&operator);
    let account = jwt::account(&operator, "batchd");
    let batchd_user = jwt::user(&account, "batchd");
    let producer = jwt::user(&account, "producer");
    // Signed by the operator, but the server does not know its account.
    let stranger = jwt::user(&jwt::account(&operator, "unknown"), "stranger");
    let nats = NatsServer::start_with_config(
        NatsServer::dir_for_config(),
        &jwt::server_config(&operator, &system, &[&account]),
        &[],
    )
    .await;
    let files = tempfile::tempdir().unwrap();
    let creds_file = |name: &str, text: String| {
        let p = files.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let right = creds_file(
        "batchd.creds",
        jwt::creds(&batchd_user.jwt, &batchd_user.key),
    );

    let started = Instant::now();
    let (_sim, running) = start_batchd(&nats, &format!("creds_file = {right:?}")).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let producer =
        async_nats::ConnectOptions::with_credentials(&jwt::creds(&producer.jwt, &producer.key))
            .unwrap()
            .connect(nats.url())
            .await
            .expect("a producer of the same account connects");
    let js = jetstream::new(producer);
    let n = 12;
    let mut tasks = common::tasks(n, "jwt");
    tasks.push((
        "batchd.tasks.p2".into(),
        json!({"task_id": "jwt_bad", "model": "no-such-model", "payload": {"text": "x"}}),
    ));
    common::publish_many(&js, &tasks).await;
    let total = tasks.len() as u64;
    let outcomes =
        common::wait_for_messages(&js, "BATCHD_RESULTS", total, Duration::from_secs(60)).await;
    running.engine.shutdown().await;
    let status = |id: &str| outcomes[&format!("batchd.results.{id}")][0]["status"].clone();
    assert_eq!(status("jwt_bad"), "failed");
    for i in 0..n {
        assert_eq!(status(&format!("jwt{i}")), "succeeded", "jwt{i}");
    }

    let unknown_account = creds_file("stranger.creds", jwt::creds(&stranger.jwt, &stranger.key));
    let wrong_seed = creds_file(
        "wrong-seed.creds",
        jwt::creds(&batchd_user.jwt, &stranger.key),
    );
    let garbage = creds_file("garbage.creds", "not a credentials file\n".into());
    let seeds = [batchd_user.seed(), stranger.seed()];
    for (path, says) in [
        (&unknown_account, "refused the credentials file"),
        (&wrong_seed, "refused the credentials file"),
        (&garbage, "nats.auth.creds_file"),
    ] {
        let e = refused(&config(
            &nats.url(),
            &format!("[nats.auth]\ncreds_file = {path:?}\n"),
        ))
        .await;
        assert!(e.contains(says) && e.contains(path.as_str()), "{e}");
        for seed in &seeds {
            assert!(!e.contains(seed.as_str()), "a seed is never printed: {e}");
        }
    }
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client
/// certificate, as PEM files in `dir`.
fn certificates(dir: &std::path::Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "batchd test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    write("ca.pem", ca.pem());
    for (name, sans, usage) in [
        (
            "server",
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        (
            "client",
            vec!["batchd".to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        write(&format!("{name}.pem"), cert.pem());
        write(&format!("{name}-key.pem"), key.serialize_pem());
    }
    // A CA nobody trusts, for the wrong-CA case.
    let other_key = KeyPair::generate().unwrap();
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    write("other-ca.pem", other.self_signed(&other_key).unwrap().pem());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_custom_ca_and_a_client_certificate() {
    let dir = NatsServer::dir_for_config();
    certificates(dir.path());
    let d = dir.path().display().to_string();
    let conf = r#"tls {
  cert_file: "{dir}/server.pem"
  key_file: "{dir}/server-key.pem"
  ca_file: "{dir}/ca.pem"
  verify: true
}"#;
    let nats = NatsServer::start_with_config(dir, conf, &[]).await;
    let url = format!("tls://127.0.0.1:{}", nats.port());
    let tls = |toml: String| config(&url, &format!("[nats.tls]\n{toml}\n"));
    connect(&tls(format!(
        "ca = \"{d}/ca.pem\"\ncert = \"{d}/client.pem\"\nkey = \"{d}/client-key.pem\""
    )))
    .await
    .expect("CA, client certificate and key");

    let e = refused(&tls(format!(
        "ca = \"{d}/other-ca.pem\"\ncert = \"{d}/client.pem\"\nkey = \"{d}/client-key.pem\""
    )))
    .await;
    assert!(e.contains("TLS"), "an untrusted server certificate: {e}");
    let e = refused(&tls(format!("ca = \"{d}/ca.pem\""))).await;
    assert!(!e.is_empty(), "no client certificate: {e}");
    let e = refused(&tls(format!("ca = \"{d}/missing.pem\""))).await;
    assert!(
        e.contains("nats.tls.ca") && e.contains("missing.pem"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batchd_runs_under_the_shipped_account_config_with_exactly_its_permissions() {
    let dir = NatsServer::dir_for_config();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/nats/batchd-account.conf"
        ),
        dir.path().join("batchd-account.conf"),
    )
    .unwrap();
    let nats = NatsServer::start_with_config(
        dir,
        "include ./batchd-account.conf\n",
        &[
            ("BATCHD_NATS_PASSWORD", "batchd-pw"),
            ("PRODUCER_NATS_PASSWORD", "producer-pw"),
        ],
    )
    .await;
    let (_sim, running) = start_batchd(&nats, "user = \"batchd\"\npassword = \"batchd-pw\"").await;

    let producer =
        async_nats::ConnectOptions::with_user_and_password("producer".into(), "producer-pw".into())
            .connect(nats.url())
            .await
            .expect("the producer connects");
    let mut replies = producer.subscribe("_INBOX.acct.>").await.unwrap();
    let js = jetstream::new(producer.clone());
    let n = 20;
    for i in 0..n {
        let mut t = common::task(&format!("acct{i}"), 2);
        t["reply_to"] = json!(format!("_INBOX.acct.{i}"));
        common::publish(
            &js,
            "batchd.tasks.p2",
            serde_json::to_vec(&t).unwrap(),
            None,
            None,
        )
        .await;
    }
    let bad = json!({"task_id": "acct_bad", "type": "haiku", "reply_to": "_INBOX.acct.bad", "payload": {"text": "x"}});
    common::publish(
        &js,
        "batchd.tasks.p2",
        serde_json::to_vec(&bad).unwrap(),
        None,
        None,
    )
    .await;
    let mut statuses: HashMap<String, String> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while statuses.len() < n + 1 {
        let m = tokio::time::timeout_at(deadline, replies.next())
            .await
            .unwrap_or_else(|_| panic!("replies so far: {statuses:?}\n{}", nats.log()))
            .unwrap();
        let o: Value = serde_json::from_slice(&m.payload).unwrap();
        statuses.insert(
            o["task_id"].as_str().unwrap().into(),
            o["status"].as_str().unwrap().into(),
        );
    }
    assert_eq!(statuses["acct_bad"], "failed");
    assert_eq!(statuses.values().filter(|s| *s == "succeeded").count(), n);
    // The producer cannot forge an outcome.
    producer
        .publish("batchd.results.acct0", "forged".into())
        .await
        .unwrap();
    producer.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.engine.shutdown().await;

    let log = nats.log();
    let batchd_violations: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Violation") && l.contains("\"batchd\""))
        .collect();
    assert!(
        batchd_violations.is_empty(),
        "batchd needed more than the account grants:\n{}",
        batchd_violations.join("\n")
    );
    assert!(
        log.lines()
            .any(|l| l.contains("Publish Violation") && l.contains("batchd.results.acct0")),
        "the forged outcome was refused:\n{log}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_secrets_never_appear_in_logs_outcomes_dead_letters_or_metrics() {
    const NATS_PASSWORD: &str = "nats-pass-CANARY1";
    const BASIC_PASSWORD: &str = "basic-CANARY2";
    const QUERY_KEY: &str = "query-CANARY3";
    const API_KEY: &str = "sk-CANARY4-0123456789abcdef";
    let canaries = [NATS_PASSWORD, BASIC_PASSWORD, QUERY_KEY, API_KEY];

    let nats = NatsServer::start_with_config(
        NatsServer::dir_for_config(),
        &format!(
            r#"authorization {{ users = [ {{user: canary, password: "{NATS_PASSWORD}"}} ] }}"#
        ),
        &[],
    )
    .await;
    // Some transient failures, so failure messages are written too.
    let sim = SimServer::start(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig {
            error_rate: 0.4,
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let nats_url = format!("nats://canary:{NATS_PASSWORD}@127.0.0.1:{}", nats.port());
    let base_url = format!(
        "http://sim-user:{BASIC_PASSWORD}@{}/v1?api-version={QUERY_KEY}",
        sim.addr()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = common::config_file(
        dir.path(),
        &nats_url,
        &base_url,
        "[providers.openai]\napi_key_env = \"BATCHD_CANARY_KEY\"\n[retry]\nmax_attempts = 2\n",
    );
    let config = Config::load(&path).unwrap();
    let client = batchd::nats::connect(&config.nats).await.expect("connect");
    batchd::nats::ensure_topology(&client, &config)
        .await
        .unwrap();
    let js = jetstream::new(client);
    let mut tasks = common::tasks(40, "canary");
    for i in 0..5 {
        tasks.push((
            "batchd.tasks.p2".into(),
            json!({"task_id": format!("canary_bad{i}"), "model": "no-such-model", "payload": {"text": "x"}}),
        ));
    }
    common::publish_many(&js, &tasks).await;

    let batchd = LoggedBatchd::start(&path, &[("BATCHD_CANARY_KEY", API_KEY)]);
    let outcomes = common::wait_for_messages(
        &js,
        "BATCHD_RESULTS",
        tasks.len() as u64,
        Duration::from_secs(90),
    )
    .await;
    let dead = common::read_all(&js, "BATCHD_DLQ").await;
    let metrics = batchd.metrics().await;
    let logs = batchd.stop();

    assert!(
        outcomes.values().any(|o| o[0]["status"] == "failed"),
        "some outcomes carry error messages"
    );
    assert!(!dead.is_empty(), "dead letters were written");
    assert!(
        logs.contains("nats://***@127.0.0.1"),
        "the NATS URL is logged, redacted:\n{logs}"
    );
    let texts = [
        ("logs", logs.clone()),
        ("outcomes", serde_json::to_string(&outcomes).unwrap()),
        ("dead letters", serde_json::to_string(&dead).unwrap()),
        ("metrics", metrics),
    ];
    for (what, text) in &texts {
        for canary in canaries {
            if let Some(at) = text.find(canary) {
                let start = text[..at]
                    .char_indices()
                    .rev()
                    .nth(200)
                    .map_or(0, |(i, _)| i);
                panic!(
                    "{canary} in the {what}: …{}…",
                    &text[start..(at + 100).min(text.len())]
                );
            }
        }
    }

    // The "unreachable" error names the URL, redacted.
    let out = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["run", "--metrics-addr", "127.0.0.1:0", "--nats-url"])
        .arg(format!(
            "nats://canary:{NATS_PASSWORD}@127.0.0.1:{}",
            free_port()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach NATS at nats://***@127.0.0.1"),
        "{err}"
    );
    assert!(!err.contains(NATS_PASSWORD), "{err}");
}

/// Distinct values of `label` in a Prometheus text exposition.
fn label_values(text: &str, label: &str) -> BTreeSet<String> {
    let key = format!("{label}=\"");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let start = l.find(&key)? + key.len();
            let end = start + l[start..].find('"')?;
            Some(l[start..end].to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_bogus_models_and_tenants_add_a_bounded_number_of_series() {
    let (addr, metrics) =
        batchd::telemetry::serve_metrics("127.0.0.1:0".parse().unwrap(), Default::default())
            .await
            .unwrap();
    let common::Stack {
        running,
        js,
        nats: _nats,
        sim: _sim,
    } = common::stack(SimConfig::default(), "[intake]\nmax_ack_pending = 1000\n").await;
    let n = 10_000;
    let tasks: Vec<(String, Value)> = (0..n)
        .map(|i| {
            let p = [2u8, 3][i % 2];
            let mut t = common::task(&format!("label{i}"), p);
            t["tenant"] = json!(format!("tenant-{i}"));
            if i % 4 < 2 {
                t["model"] = json!(format!("bogus-model-{i}"));
            }
            (format!("batchd.tasks.p{p}"), t)
        })
        .collect();
    common::publish_many(&js, &tasks).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let have = common::stream_len(&js, "BATCHD_RESULTS").await;
        if have >= n as u64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{have} of {n} outcomes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics.abort();
    running.engine.shutdown().await;

    // Other tests in this process serve their own models; none of them is bogus.
    let models = label_values(&text, "model");
    assert!(
        !models.iter().any(|m| m.starts_with("bogus-model")),
        "a producer's model name became a label: {:?}",
        models
            .iter()
            .filter(|m| m.starts_with("bogus"))
            .take(5)
            .collect::<Vec<_>>()
    );
    assert!(models.len() < 50, "{} model labels", models.len());
    let tenants = label_values(&text, "tenant");
    let max_tenants = batchd::config::Config::defaults()
        .expect("default config")
        .metrics
        .max_tenants;
    assert!(
        tenants.len() <= max_tenants + 1,
        "{} tenant labels",
        tenants.len()
    );
    assert!(tenants.contains("other"), "{tenants:?}");
    let series = text.lines().filter(|l| !l.starts_with('#')).count();
    // The configured routes (OpenAI's and Anthropic's default models) are
    // registered up front (with their prompt cache and flex fallback
    // series); the bound is theirs plus the tenant cap's.
    assert!(series < 3_600, "{series} series for {n} tasks");
}
