//! Proves the `nats-server` test harness that the end-to-end tests build on:
//! it serves JetStream, survives a restart on the same store, isolates
//! servers from each other and cleans up after itself.

use crate::common::nats;

use std::net::TcpStream;

use async_nats::jetstream::{self, stream};
use nats::NatsServer;

const STREAM: &str = "HARNESS";

async fn create_stream(client: async_nats::Client) -> (jetstream::Context, stream::Stream) {
    let js = jetstream::new(client);
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.to_string(),
            subjects: vec!["harness.>".to_string()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("create stream");
    (js, stream)
}

async fn publish(js: &jetstream::Context, payload: &'static str) -> u64 {
    js.publish("harness.task", payload.into())
        .await
        .expect("publish")
        .await
        .expect("publish ack")
        .sequence
}

async fn payload_at(stream: &stream::Stream, sequence: u64) -> String {
    let message = stream.get_raw_message(sequence).await.expect("get message");
    String::from_utf8(message.payload.to_vec()).expect("utf-8 payload")
}

#[tokio::test]
async fn started_server_stores_and_returns_jetstream_messages() {
    let server = NatsServer::start().await;
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));

    let (js, stream) = create_stream(server.client().await).await;
    let sequence = publish(&js, "hello").await;

    assert_eq!(payload_at(&stream, sequence).await, "hello");
}

#[tokio::test]
async fn restart_on_the_same_store_keeps_stream_messages() {
    let mut server = NatsServer::start().await;
    let port = server.port();
    let (js, _) = create_stream(server.client().await).await;
    for payload in ["one", "two", "three"] {
        publish(&js, payload).await;
    }

    server.stop().await;
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "a stopped server still accepts connections"
    );
    server.restart().await;

    assert_eq!(server.port(), port);
    let js = jetstream::new(server.client().await);
    let mut stream = js.get_stream(STREAM).await.expect("stream after restart");
    assert_eq!(stream.info().await.expect("stream info").state.messages, 3);
    for (sequence, payload) in (1..).zip(["one", "two", "three"]) {
        assert_eq!(payload_at(&stream, sequence).await, payload);
    }
}

#[tokio::test]
async fn two_servers_at_once_get_their_own_ports_and_stores() {
    let (first, second) = tokio::join!(NatsServer::start(), NatsServer::start());

    assert_ne!(first.port(), second.port());
    assert_ne!(first.store_dir(), second.store_dir());
    let (_, _) = create_stream(first.client().await).await;
    let names: Vec<String> = {
        use futures::TryStreamExt;
        jetstream::new(second.client().await)
            .stream_names()
            .try_collect()
            .await
            .expect("stream names")
    };
    assert!(names.is_empty(), "second server sees streams: {names:?}");
}

#[tokio::test]
async fn dropping_the_server_removes_its_store_dir() {
    let server = NatsServer::start().await;
    let (js, _) = create_stream(server.client().await).await;
    publish(&js, "kept until drop").await;
    let store = server.store_dir().to_path_buf();
    assert!(store.is_dir(), "no store at {}", store.display());

    drop(server);

    assert!(!store.exists(), "store left at {}", store.display());
}
