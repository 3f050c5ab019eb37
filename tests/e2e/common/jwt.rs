//! NATS operator mode (decentralized JWT auth) without `nsc`: an operator,
//! its accounts and their users minted in the test as NKey-signed JWTs,
//! the server config that trusts them, and a user's credentials file.
//!
//! A NATS JWT is `header.claims.signature`, each part base64url without
//! padding; the header is `{"typ":"JWT","alg":"ed25519-nkey"}` and the
//! signature is the issuer's NKey signing `header.claims`. `jti` is only an
//! id to nats-server (`nsc` puts a hash of the claims there; the server
//! does not check it), so a random one does.
#![allow(dead_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use nkeys::KeyPair;
use serde_json::{json, Value};

const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// An operator, account or user: its key pair and the JWT that vouches
/// for it.
pub struct Identity {
    pub key: KeyPair,
    pub jwt: String,
}

impl Identity {
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// The user's seed, the secret in its credentials file.
    pub fn seed(&self) -> String {
        self.key.seed().expect("a generated key pair has a seed")
    }
}

/// A self-signed operator.
pub fn operator(name: &str) -> Identity {
    let key = KeyPair::new_operator();
    let jwt = sign(&key, &key.public_key(), name, json!({"type": "operator"}));
    Identity { key, jwt }
}

/// An account signed by `operator`, without limits and with JetStream
/// (storage, streams and consumers unlimited).
pub fn account(operator: &Identity, name: &str) -> Identity {
    account_with(
        operator,
        name,
        json!({"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}),
    )
}

/// The system account, signed by `operator`: no JetStream (the server
/// refuses to start if it has any).
pub fn system_account(operator: &Identity) -> Identity {
    account_with(operator, "SYS", json!({}))
}

fn account_with(operator: &Identity, name: &str, jetstream: Value) -> Identity {
    let key = KeyPair::new_account();
    let mut limits = json!({
        "subs": -1, "data": -1, "payload": -1,
        "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
    });
    if let (Some(limits), Some(jetstream)) = (limits.as_object_mut(), jetstream.as_object()) {
        limits.extend(jetstream.clone());
    }
    let jwt = sign(
        &operator.key,
        &key.public_key(),
        name,
        json!({"type": "account", "limits": limits}),
    );
    Identity { key, jwt }
}

/// A user signed by `account`, allowed everything the account allows.
pub fn user(account: &Identity, name: &str) -> Identity {
    let key = KeyPair::new_user();
    let claims = json!({
        "type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
    });
    let jwt = sign(&account.key, &key.public_key(), name, claims);
    Identity { key, jwt }
}

/// A credentials file as `nsc` writes it: `jwt` and the seed of `key`
/// (normally the same user's; another's makes a file the server refuses).
pub fn creds(jwt: &str, key: &KeyPair) -> String {
    let seed = key.seed().expect("a generated key pair has a seed");
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// The nats-server config of operator mode: trust `operator`, use `system`
/// as the system account and know exactly `system` and `accounts` (a memory
/// resolver, preloaded). Users of any other account are refused.
pub fn server_config(operator: &Identity, system: &Identity, accounts: &[&Identity]) -> String {
    let preload: String = std::iter::once(system)
        .chain(accounts.iter().copied())
        .map(|a| format!("  {}: \"{}\"\n", a.public_key(), a.jwt))
        .collect();
    format!(
        "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n{preload}}}\n",
        operator.jwt,
        system.public_key()
    )
}

/// The JWT of `subject` named `name`, issued and signed by `issuer`; `nats`
/// gets the claims' version.
fn sign(issuer: &KeyPair, subject: &str, name: &str, mut nats: Value) -> String {
    nats["version"] = json!(2);
    let claims = json!({
        "jti": ulid::Ulid::new().to_string(),
        "iat": chrono::Utc::now().timestamp(),
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = issuer
        .sign(signed.as_bytes())
        .expect("a generated key pair signs");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}
