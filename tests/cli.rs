//! The command line: `send` validation, `list`, `flush`, `status`, `hosts`.

mod support;

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::fs;
use support::*;

#[test]
fn send_refuses_bad_input_and_writes_nothing() {
    let agent = Agent::new("http://127.0.0.1:9", "alpha");
    let long_type = "a".repeat(129);
    let cases: Vec<(&str, Vec<&str>, &[i32])> = vec![
        (
            "type with a slash",
            vec!["send", "../etc", "--payload", "{}"],
            &[1],
        ),
        (
            "type starting with a dot",
            vec!["send", ".hidden", "--payload", "{}"],
            &[1],
        ),
        (
            "type with a space",
            vec!["send", "a b", "--payload", "{}"],
            &[1],
        ),
        ("empty type", vec!["send", "", "--payload", "{}"], &[1, 2]),
        (
            "type of 129 chars",
            vec!["send", &long_type, "--payload", "{}"],
            &[1],
        ),
        (
            "payload not JSON",
            vec!["send", "ok.type", "--payload", "{not json"],
            &[1],
        ),
        (
            "payload cut short",
            vec!["send", "ok.type", "--payload", "{\"a\": 1"],
            &[1],
        ),
        (
            "bad priority",
            vec!["send", "ok.type", "--payload", "{}", "--priority", "urgent"],
            &[1, 2],
        ),
        (
            "bad target",
            vec!["send", "ok.type", "--payload", "{}", "--target", "../x"],
            &[1],
        ),
        (
            "missing payload file",
            vec![
                "send",
                "ok.type",
                "--payload-file",
                "/nonexistent/payload.json",
            ],
            &[1],
        ),
    ];
    for (what, args, codes) in &cases {
        let out = agent.cmd(args);
        let code = out.code().unwrap_or(-1);
        assert!(
            codes.contains(&code),
            "{what}: exit {code}, expected one of {codes:?}: {out:?}"
        );
        assert!(
            out.stdout.trim().is_empty(),
            "{what}: stdout {:?}",
            out.stdout
        );
        assert!(!out.stderr.trim().is_empty(), "{what}: no error message");
        if code == 1 {
            assert_eq!(
                out.stderr.trim().lines().count(),
                1,
                "{what}: the error is one line: {:?}",
                out.stderr
            );
            assert!(
                out.stderr.starts_with("mesync"),
                "{what}: the error starts with `mesync`: {:?}",
                out.stderr
            );
        }
        assert!(
            list_dir_all(&agent.dir("outbox")).is_empty(),
            "{what}: something was written to outbox/: {:?}",
            list_dir_all(&agent.dir("outbox"))
        );
    }

    // Control: a valid send writes exactly one file.
    let id = agent.send("ok.type", r#"{"a": 1}"#, &["--priority", "low"]);
    let files = agent.files("outbox");
    assert_eq!(files.len(), 1);
    let msg = &agent.messages("outbox")[0];
    assert_eq!(msg["id"], id.as_str());
    assert_eq!(msg["priority"], "low");
    assert_eq!(files[0], file_name_for(msg), "outbox file name");
}

#[test]
fn send_reads_the_payload_from_stdin_or_a_file() {
    let agent = Agent::new("http://127.0.0.1:9", "alpha");
    let out = agent
        .cmd_stdin(
            &["send", "stdin.test", "--payload", "-"],
            br#"{"big": "payload"}"#,
        )
        .ok("send --payload -");
    let id_stdin = out.stdout.trim().to_string();

    let file = agent.base().join("job.json");
    fs::write(&file, r#"{"from": ["a", "file"]}"#).unwrap();
    let out = agent
        .cmd(&[
            "send",
            "file.test",
            "--payload-file",
            file.to_str().unwrap(),
        ])
        .ok("send --payload-file");
    let id_file = out.stdout.trim().to_string();

    let outbox = agent.messages("outbox");
    let find = |id: &str| -> &Value {
        outbox
            .iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in outbox"))
    };
    assert_eq!(find(&id_stdin)["payload"], json!({"big": "payload"}));
    assert_eq!(find(&id_file)["payload"], json!({"from": ["a", "file"]}));
    assert_eq!(find(&id_file)["type"], "file.test");
    assert_eq!(find(&id_file)["source"], "alpha");
}

fn ids_of(entries: &[Value]) -> BTreeSet<String> {
    entries
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn list_flush_and_status() {
    let hub = Hub::start();
    let mut alpha = Agent::new(&hub.url(), "alpha");
    let mut beta = Agent::new(&hub.url(), "beta");
    beta.start();
    hub.wait_registered(&["beta"]);

    // alpha is not running yet: its messages wait in outbox/.
    let one = alpha.send("list.one", r#"{"a": 1}"#, &["--target", "beta"]);
    let two = alpha.send(
        "list.two",
        r#"{"b": 2}"#,
        &["--target", "beta", "--priority", "high"],
    );
    let both: BTreeSet<String> = [one.clone(), two.clone()].into_iter().collect();

    let plain = alpha.cmd(&["list", "outbox"]).ok("list outbox");
    assert!(
        plain.stdout.contains(&one) && plain.stdout.contains(&two),
        "list outbox names both ids:\n{}",
        plain.stdout
    );
    assert!(
        plain
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
            >= 2
    );
    let listed = alpha.list_json("outbox");
    assert_eq!(ids_of(&listed), both, "list outbox --json: {listed:?}");
    let files = alpha.files("outbox");
    for e in &listed {
        assert!(
            e["type"].is_string() && e["priority"].is_string(),
            "entry {e}"
        );
        let file = e["file"].as_str().expect("entry has a file");
        assert!(
            files
                .iter()
                .any(|f| file == f || file.ends_with(&format!("/{f}"))),
            "file {file} of {e} is not in outbox/ {files:?}"
        );
    }
    let high = listed.iter().find(|e| e["id"] == two.as_str()).unwrap();
    assert_eq!(high["priority"], "high");

    let status = alpha.cmd(&["status"]);
    assert_eq!(
        status.code(),
        Some(0),
        "status with the agent not running: {status:?}"
    );

    alpha.start();
    wait_until(TIMEOUT, "beta receives both", || {
        beta.has(&one) && beta.has(&two)
    });
    wait_until(TIMEOUT, "alpha moves both to sent/", || {
        alpha.files("outbox").is_empty() && alpha.ids("sent").len() == 2
    });
    assert!(alpha.list_json("outbox").is_empty());
    assert_eq!(ids_of(&alpha.list_json("sent")), both);
    let plain = alpha.cmd(&["list", "sent"]).ok("list sent");
    assert!(plain.stdout.contains(&one) && plain.stdout.contains(&two));

    // No hook installed: the outcome says so.
    wait_until(TIMEOUT, "list inbox shows both with hook \"none\"", || {
        let entries = beta.list_json("inbox");
        ids_of(&entries) == both
            && entries
                .iter()
                .all(|e| e["hook"] == "none" && e["file"].is_string())
    });

    let failed = alpha.cmd(&["list", "failed"]).ok("list failed");
    assert!(!failed.stdout.contains(&one));
    assert!(alpha.list_json("failed").is_empty());

    alpha.cmd(&["flush", "sent"]).ok("flush sent");
    assert!(
        alpha.files("sent").is_empty(),
        "sent/: {:?}",
        alpha.files("sent")
    );
    assert!(alpha.list_json("sent").is_empty());

    for agent in [&alpha, &beta] {
        agent.cmd(&["status"]).ok("status");
        let out = agent.cmd(&["status", "--json"]).ok("status --json");
        let _: Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {:?}", out.stdout));
    }

    let bad = alpha.cmd(&["list", "bogus"]);
    assert_eq!(
        bad.code(),
        Some(2),
        "list of an unknown queue is a usage error"
    );
}

#[test]
fn hosts_lists_and_removes_through_the_hub() {
    let hub = Hub::start();
    let mut beta = Agent::new(&hub.url(), "beta");
    beta.start();
    // "gone" registers by its first contact, then has one message pending.
    let r = hub.get("/v1/messages?host=gone&wait=0");
    assert_eq!(r.status, 200, "first contact of gone: {}", r.text());
    hub.wait_registered(&["beta", "gone"]);
    let msg = message("hosts.test", "tester", Some("gone"), "normal", json!({}));
    hub.post_message(&msg);

    let out = beta.cmd(&["hosts"]).ok("mesync hosts");
    assert!(
        out.stdout.contains("beta") && out.stdout.contains("gone"),
        "mesync hosts:\n{}",
        out.stdout
    );
    let out = beta.cmd(&["hosts", "--json"]).ok("mesync hosts --json");
    let text = out.stdout.trim();
    // One document ({"hosts": [...]} as the API, or an array), or JSON Lines.
    let hosts: Vec<Value> = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => o
            .get("hosts")
            .and_then(|h| h.as_array().cloned())
            .unwrap_or_default(),
        Ok(Value::Array(a)) => a,
        _ => out.json_lines(),
    };
    let gone = hosts
        .iter()
        .find(|h| h["host"] == "gone")
        .unwrap_or_else(|| panic!("hosts --json lists gone: {text}"));
    assert_eq!(gone["pending"], 1, "gone has one message pending: {gone}");
    assert!(hosts.iter().any(|h| h["host"] == "beta"), "{text}");

    beta.cmd(&["hosts", "remove", "gone"])
        .ok("hosts remove gone");
    assert!(!hub.is_registered("gone"), "gone is still registered");
    assert!(
        hub.queue_files("gone").is_empty(),
        "gone's queue is still there: {:?}",
        hub.queue_files("gone")
    );
    assert!(hub.is_registered("beta"));
}
