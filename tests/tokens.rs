//! Bearer tokens: once any exists, the hub knows who calls and lets each host act only as
//! itself.

mod support;

use std::fs;

use serde_json::json;
use support::*;

#[test]
fn tokens_identify_callers_and_confine_them_to_their_own_queue() {
    let hub = Hub::start();
    // Open mode before any token: anyone may pull anyone's queue.
    assert_eq!(hub.get("/v1/messages?host=alpha&wait=0").status, 200);

    let alpha = hub.issue_token("alpha");
    let beta = hub.issue_token("beta");
    let stored = fs::read_to_string(hub.data_dir().join("tokens.json")).expect("tokens.json");
    assert!(
        !stored.contains(&alpha) && !stored.contains(&beta),
        "only hashes are stored"
    );
    let listed = hub.token_cmd(&["list"]);
    assert!(listed.stdout.contains("alpha") && listed.stdout.contains("beta"));

    // 401 without a token, and with a wrong one; the running hub picked the file up.
    let r = hub.get("/v1/messages?host=alpha&wait=0");
    r.assert_error(401, "no token");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    hub.request_as("msy_wrong", "GET", "/v1/messages?host=alpha&wait=0", None)
        .assert_error(401, "a wrong token");
    hub.get("/v1/hosts")
        .assert_error(401, "the registry without a token");
    assert_eq!(hub.get("/healthz").status, 200, "health stays open");
    assert_eq!(
        hub.get("/metrics").status,
        200,
        "metrics stay open on loopback"
    );

    // 403 for another host's queue.
    hub.request_as(&alpha, "GET", "/v1/messages?host=beta&wait=0", None)
        .assert_error(403, "pulling beta's queue with alpha's token");
    let ack = json!({"host": "beta", "ids": [uuid::Uuid::new_v4()]});
    hub.request_as(&alpha, "POST", "/v1/ack", Some(&ack))
        .assert_error(403, "acking beta's queue with alpha's token");

    // A spoofed source is rewritten to the token's host.
    let msg = message("tok.test", "beta", Some("beta"), "normal", json!({"x": 1}));
    let r = hub.request_as(&alpha, "POST", "/v1/messages", Some(&msg));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = hub.request_as(&beta, "GET", "/v1/messages?host=beta&wait=0", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let pulled = r.json();
    assert_eq!(pulled["messages"][0]["id"], msg["id"]);
    assert_eq!(
        pulled["messages"][0]["source"], "alpha",
        "source comes from the token"
    );

    // Revoking takes effect at once.
    let out = hub.token_cmd(&["revoke", "beta"]);
    assert!(out.success(), "{}", out.stderr);
    hub.request_as(&beta, "GET", "/v1/messages?host=beta&wait=0", None)
        .assert_error(401, "a revoked token");
    let out = hub.token_cmd(&["revoke", "beta"]);
    assert_eq!(
        out.code(),
        Some(1),
        "revoking twice is an error: {}",
        out.stderr
    );

    // Revoking the last token does not reopen the hub: it refuses everyone, and says so.
    let out = hub.token_cmd(&["revoke", "alpha"]);
    assert!(
        out.success() && out.stderr.contains("no tokens left"),
        "{}",
        out.stderr
    );
    hub.get("/v1/messages?host=alpha&wait=0")
        .assert_error(401, "no credentials once the last token is revoked");
    hub.request_as(&alpha, "GET", "/v1/messages?host=alpha&wait=0", None)
        .assert_error(401, "the last, revoked token");
    let msg = message("tok.test", "anyone", None, "normal", json!({}));
    hub.post("/v1/messages", &msg)
        .assert_error(401, "a send once the last token is revoked");
}

#[test]
fn agents_with_tokens_deliver_end_to_end_and_a_wrong_token_is_refused() {
    let hub = Hub::start();
    let tx_token = hub.issue_token("tx");
    let rx_token = hub.issue_token("rx");
    let mut tx = Agent::new(&hub.url(), "tx").with_env("MESYNC_TOKEN", &tx_token);
    // The receiver reads its token from a file, as `token_file` in its config.
    let mut rx = Agent::new(&hub.url(), "rx");
    let token_file = rx.base().join("token");
    fs::write(&token_file, format!("{rx_token}\n")).expect("write token file");
    fs::write(
        rx.base().join("config.toml"),
        format!("token_file = {:?}\n", token_file.display().to_string()),
    )
    .expect("write config");
    rx.start();
    tx.start();
    let id = tx.send("tok.e2e", r#"{"n": 1}"#, &["--target", "rx"]);
    wait_until(TIMEOUT, "delivery with tokens", || rx.has(&id));
    let broadcast = tx.send("tok.e2e", r#"{"n": 2}"#, &[]);
    wait_until(TIMEOUT, "a broadcast with tokens", || rx.has(&broadcast));

    // An agent with a wrong token delivers nothing, and keeps its message: a credential
    // is fixed and reloaded, the message is not at fault.
    let mut bad = Agent::new(&hub.url(), "bad");
    fs::write(
        bad.base().join("config.toml"),
        "token = \"msy_not_a_token\"\n",
    )
    .expect("write config");
    bad.start();
    bad.send("tok.e2e", r#"{"n": 3}"#, &["--target", "rx"]);
    wait_until(TIMEOUT, "the agent reports the refused token", || {
        bad.logs.contains("hub answered 401")
    });
    assert_eq!(bad.files("outbox").len(), 1, "the message waits in outbox/");
    assert!(bad.files("failed").is_empty(), "{:?}", bad.files("failed"));
    assert_eq!(
        rx.inbox().len(),
        2,
        "nothing from the agent with a wrong token"
    );
    let good = hub.issue_token("bad");
    fs::write(
        bad.base().join("config.toml"),
        format!("token = {good:?}\n"),
    )
    .expect("fix config");
    hangup(bad.pid().expect("agent pid"));
    wait_until(
        LONG_TIMEOUT,
        "the message goes once the token is fixed",
        || rx.inbox().len() == 3,
    );
}
