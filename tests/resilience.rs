//! Failures: bad files, a hub that is down or killed, and the cleanup of sent/.

mod support;

use serde_json::json;
use std::collections::BTreeSet;
use std::fs;
use std::thread;
use std::time::Duration;
use support::*;

/// `failed/` entries: (message file name, its content, its reason) for every file that is
/// not a `.reason` file.
fn failed_entries(agent: &Agent) -> Vec<(String, String, Option<String>)> {
    let dir = agent.dir("failed");
    agent
        .files("failed")
        .into_iter()
        .filter(|n| !n.ends_with(".reason"))
        .map(|n| {
            let content = fs::read_to_string(dir.join(&n)).unwrap_or_default();
            let reason = fs::read_to_string(dir.join(format!("{n}.reason"))).ok();
            (n, content, reason)
        })
        .collect()
}

#[test]
fn bad_outbox_files_go_to_failed_with_a_reason_and_retry_requeues_them() {
    let hub = Hub::start();
    let [alpha, beta] = start_agents(&hub, ["alpha", "beta"]);

    write_atomic(&alpha.dir("outbox"), "garbage.json", b"{this is not json");
    write_atomic(
        &alpha.dir("outbox"),
        "badtype.json",
        br#"{"type": "../etc", "payload": {}}"#,
    );
    let good = alpha.send("after.bad", "{}", &["--target", "beta"]);
    wait_until(TIMEOUT, "a valid message still flows", || beta.has(&good));

    wait_until(
        TIMEOUT,
        "both bad files in failed/, each with a non-empty .reason",
        || {
            let entries = failed_entries(&alpha);
            entries.len() == 2
                && entries
                    .iter()
                    .all(|(_, _, r)| r.as_deref().is_some_and(|r| !r.trim().is_empty()))
        },
    );
    assert!(
        alpha.files("outbox").is_empty(),
        "outbox: {:?}",
        alpha.files("outbox")
    );
    let entries = failed_entries(&alpha);
    let garbage = entries
        .iter()
        .find(|(_, c, _)| c.contains("this is not json"))
        .expect("the unparsable file is in failed/ unchanged");
    let badtype = entries
        .iter()
        .find(|(_, c, _)| c.contains("../etc"))
        .expect("the file with the invalid type is in failed/");
    let badtype_reason = badtype.2.clone().unwrap();
    assert!(
        badtype_reason.to_lowercase().contains("type"),
        "the reason should say the type is invalid: {badtype_reason:?}"
    );

    // `mesync list failed` shows them with their reasons.
    let listed = alpha.list_json("failed");
    assert_eq!(listed.len(), 2, "list failed --json: {listed:?}");
    for (name, _, reason) in &entries {
        let reason = reason.as_deref().unwrap().trim();
        let entry = listed
            .iter()
            .find(|e| {
                e["file"]
                    .as_str()
                    .is_some_and(|f| f == name || f.ends_with(&format!("/{name}")))
            })
            .unwrap_or_else(|| panic!("{name} missing from list failed --json: {listed:?}"));
        let shown = entry["reason"].as_str().unwrap_or_default().trim();
        assert!(
            !shown.is_empty() && (reason.contains(shown) || shown.contains(reason)),
            "list failed --json reason {shown:?} vs {name}.reason {reason:?}"
        );
    }
    let plain = alpha.cmd(&["list", "failed"]).ok("mesync list failed");
    for (name, _, reason) in &entries {
        let first_line = reason.as_deref().unwrap().trim().lines().next().unwrap();
        let head: String = first_line.chars().take(15).collect();
        assert!(
            plain.stdout.contains(&head),
            "`mesync list failed` should show why {name} failed ({first_line:?}):\n{}",
            plain.stdout
        );
    }

    // Fix the unparsable file in place, then retry everything: the fixed one is delivered,
    // the one with the invalid type fails again.
    let fixed = json!({"type": "retry.fixed", "target": "beta", "payload": {"fixed": true}});
    write_atomic(
        &alpha.dir("failed"),
        &garbage.0,
        fixed.to_string().as_bytes(),
    );
    alpha.cmd(&["retry"]).ok("mesync retry");
    wait_until(TIMEOUT, "the fixed message reaches beta", || {
        beta.inbox()
            .iter()
            .any(|m| m["type"] == "retry.fixed" && m["payload"] == json!({"fixed": true}))
    });
    wait_until(
        TIMEOUT,
        "failed/ holds only the invalid-type file (the fixed one's reason gone)",
        || {
            let entries = failed_entries(&alpha);
            entries.len() == 1
                && entries[0].1.contains("../etc")
                && alpha.files("failed").len() <= 2
                && alpha.files("outbox").is_empty()
        },
    );
    let name = failed_entries(&alpha)[0].0.clone();
    wait_until(
        TIMEOUT,
        &format!("failed/{name} has its .reason again after failing a second time"),
        || {
            fs::read_to_string(alpha.dir("failed").join(format!("{name}.reason")))
                .is_ok_and(|r| !r.trim().is_empty())
        },
    );
}

#[test]
fn a_named_pipe_or_a_socket_in_outbox_goes_to_failed_and_holds_nothing_up() {
    let hub = Hub::start();
    let [mut alpha, beta] = start_agents(&hub, ["alpha", "beta"]);
    let outbox = alpha.dir("outbox");
    // A named pipe nobody writes to: opening it to read it waits for a writer forever.
    nix::unistd::mkfifo(
        &outbox.join("pipe.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .expect("mkfifo");
    // A socket cannot even be opened.
    let _socket = std::os::unix::net::UnixListener::bind(outbox.join("socket.json"))
        .expect("bind a socket in outbox/");
    let good = alpha.send("after.pipe", "{}", &["--target", "beta"]);
    wait_until(TIMEOUT, "a valid message still flows", || beta.has(&good));

    let failed = alpha.dir("failed");
    let reason = |name: &str| fs::read_to_string(failed.join(format!("{name}.reason"))).ok();
    wait_until(
        TIMEOUT,
        "the pipe and the socket in failed/, with reasons",
        || reason("pipe.json").is_some() && reason("socket.json").is_some(),
    );
    let pipe_reason = reason("pipe.json").unwrap_or_default();
    assert!(pipe_reason.contains("named pipe"), "{pipe_reason:?}");
    let socket_reason = reason("socket.json").unwrap_or_default();
    assert!(socket_reason.contains("socket"), "{socket_reason:?}");
    use std::os::unix::fs::FileTypeExt;
    let moved = fs::symlink_metadata(failed.join("pipe.json")).expect("failed/pipe.json");
    assert!(moved.file_type().is_fifo(), "moved as it is, not read");
    assert!(
        alpha.files("outbox").is_empty(),
        "{:?}",
        alpha.files("outbox")
    );

    // `mesync list failed` shows them without opening them (it would hang on the pipe).
    let listed = alpha.cmd(&["list", "failed"]).ok("mesync list failed");
    for (name, why) in [("pipe.json", "named pipe"), ("socket.json", "socket")] {
        assert!(
            listed
                .stdout
                .lines()
                .any(|l| l.starts_with(name) && l.contains(why)),
            "{name} ({why}) in `mesync list failed`:\n{}",
            listed.stdout
        );
    }
    let status = alpha.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent stops at once and exits 0: {status:?}"
    );
}

#[test]
fn retry_by_id_moves_only_that_message_back() {
    // No hub at all: the agent is not running, `retry` is a local file operation.
    let agent = Agent::new("http://127.0.0.1:9", "alpha");
    let failed = agent.dir("failed");
    let one = message("retry.one", "alpha", None, "normal", json!(1));
    let two = message("retry.two", "alpha", None, "normal", json!(2));
    for m in [&one, &two] {
        let name = file_name_for(m);
        write_atomic(&failed, &name, m.to_string().as_bytes());
        write_atomic(&failed, &format!("{name}.reason"), b"HTTP 400: test\n");
    }
    agent
        .cmd(&["retry", one["id"].as_str().unwrap()])
        .ok("mesync retry ID");
    assert_eq!(agent.ids("outbox"), vec![id_of(&one)]);
    assert_eq!(agent.ids("failed"), vec![id_of(&two)]);
    assert!(
        !failed
            .join(format!("{}.reason", file_name_for(&one)))
            .exists(),
        "the retried message's .reason is left behind"
    );
    assert!(
        failed
            .join(format!("{}.reason", file_name_for(&two)))
            .exists()
    );
    let outbox_msg = &agent.messages("outbox")[0];
    assert_eq!(outbox_msg["payload"], json!(1));
}

#[test]
fn hub_down_send_still_works_and_messages_flow_once_it_is_up() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut alpha = Agent::new(&url, "alpha");
    alpha.start();

    let mut ids = Vec::new();
    for (i, priority) in ["normal", "high", "low"].iter().enumerate() {
        let payload = json!({ "i": i }).to_string();
        ids.push(alpha.send(
            "down.test",
            &payload,
            &["--target", "beta", "--priority", priority],
        ));
    }
    let mut in_outbox = alpha.ids("outbox");
    in_outbox.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(in_outbox, want, "mesync send wrote all three into outbox/");

    // Negative observation: give the agent a few poll intervals of failed attempts, then
    // check nothing was given up on.
    thread::sleep(Duration::from_secs(3));
    assert!(
        alpha.is_running(),
        "the agent must survive an unreachable hub"
    );
    assert_eq!(alpha.ids("outbox").len(), 3, "messages stay in outbox/");
    assert!(
        alpha.files("failed").is_empty(),
        "an unreachable hub is not a failure"
    );
    assert!(alpha.files("sent").is_empty());

    let hub = Hub::start_on(port);
    let mut beta = Agent::new(&hub.url(), "beta");
    beta.start();
    wait_until(
        LONG_TIMEOUT,
        "all three reach beta with no manual step",
        || ids.iter().all(|id| beta.has(id)),
    );
    wait_until(
        TIMEOUT,
        "alpha's outbox is empty and sent/ holds all three",
        || alpha.files("outbox").is_empty() && alpha.ids("sent").len() == 3,
    );
    assert!(alpha.files("failed").is_empty());
    for id in &ids {
        assert_eq!(beta.inbox_count(id), 1);
    }
}

/// Waits until `rx` holds every id of `ids` and the hub's queue for it is empty, then
/// checks with a barrier message that no id is in the inbox twice.
fn assert_all_delivered_once(hub: &Hub, rx: &Agent, ids: &[String]) {
    wait_until(
        LONG_TIMEOUT,
        &format!("all {} messages reach {}", ids.len(), rx.host_id),
        || {
            let have: BTreeSet<String> = rx.ids("inbox").into_iter().collect();
            ids.iter().all(|id| have.contains(id))
        },
    );
    wait_until(TIMEOUT, "the hub's queue is drained", || {
        hub.queue_files(&rx.host_id).is_empty()
    });
    let barrier = message(
        "crash.barrier",
        "tester",
        Some(&rx.host_id),
        "low",
        json!({}),
    );
    hub.post_message(&barrier);
    wait_until(TIMEOUT, "the barrier arrives", || rx.has(&id_of(&barrier)));

    let inbox = rx.ids("inbox");
    let unique: BTreeSet<&String> = inbox.iter().collect();
    assert_eq!(
        unique.len(),
        inbox.len(),
        "duplicate ids in the inbox: {inbox:?}"
    );
    assert_eq!(inbox.len(), ids.len() + 1, "inbox: {inbox:?}");
}

#[test]
fn hub_kill9_loses_no_accepted_message() {
    let mut hub = Hub::start();
    let mut ids = Vec::new();
    for i in 0..50 {
        let priority = ["high", "normal", "low"][i % 3];
        let msg = message(
            "crash.test",
            "sender",
            Some("offline"),
            priority,
            json!({ "i": i }),
        );
        hub.post_message(&msg);
        ids.push(id_of(&msg));
    }
    assert_eq!(
        hub.queue_files("offline").len(),
        50,
        "every accepted message is a file in queues/offline/"
    );

    hub.kill9();
    hub.restart();
    assert_eq!(
        hub.queue_files("offline").len(),
        50,
        "queues/offline/ after the restart"
    );

    let mut rx = Agent::new(&hub.url(), "offline");
    rx.start();
    assert_all_delivered_once(&hub, &rx, &ids);

    // A restart of the receiver does not bring anything back.
    rx.stop();
    rx.start();
    let again = message("crash.barrier", "tester", Some("offline"), "low", json!({}));
    hub.post_message(&again);
    wait_until(TIMEOUT, "the receiver is back", || rx.has(&id_of(&again)));
    assert_eq!(rx.ids("inbox").len(), ids.len() + 2);
}

#[test]
fn hub_kill9_in_the_middle_of_a_stream_loses_and_duplicates_nothing() {
    let mut hub = Hub::start();
    let mut alpha = Agent::new(&hub.url(), "alpha");
    alpha.start();
    hub.wait_registered(&["alpha"]);

    let mut ids = Vec::new();
    for i in 0..50 {
        let payload = json!({ "i": i }).to_string();
        ids.push(alpha.send("stream.test", &payload, &["--target", "receiver"]));
        if i == 24 {
            hub.kill9();
            hub.restart();
        }
    }
    wait_until(LONG_TIMEOUT, "alpha's sent/ holds all 50", || {
        alpha.files("outbox").is_empty() && alpha.ids("sent").len() == 50
    });
    assert!(
        alpha.files("failed").is_empty(),
        "failed: {:?}",
        alpha.files("failed")
    );

    let mut rx = Agent::new(&hub.url(), "receiver");
    rx.start();
    assert_all_delivered_once(&hub, &rx, &ids);
}

#[test]
fn sent_files_are_purged_after_sent_ttl() {
    let hub = Hub::start();
    let mut alpha = Agent::new(&hub.url(), "alpha").with_env("MESYNC_SENT_TTL", "1");
    // Control: the default TTL (a day) keeps sent/ files.
    let mut gamma = Agent::new(&hub.url(), "gamma");
    let mut beta = Agent::new(&hub.url(), "beta");
    alpha.start();
    gamma.start();
    beta.start();
    hub.wait_registered(&["alpha", "beta", "gamma"]);

    let short = alpha.send("ttl.test", "{}", &["--target", "beta"]);
    let kept = gamma.send("ttl.test", "{}", &["--target", "beta"]);
    wait_until(TIMEOUT, "beta receives both", || {
        beta.has(&short) && beta.has(&kept)
    });
    wait_until(TIMEOUT, "gamma archives its message in sent/", || {
        gamma.ids("sent").contains(&kept)
    });
    wait_until(TIMEOUT, "alpha's sent/ is purged (sent_ttl = 1 s)", || {
        alpha.files("outbox").is_empty() && alpha.files("sent").is_empty()
    });
    assert!(alpha.files("failed").is_empty());
    assert!(
        gamma.ids("sent").contains(&kept),
        "with the default sent_ttl the file stays"
    );
}

#[test]
fn sigterm_stops_agent_and_hub_with_exit_0() {
    let mut hub = Hub::start();
    let mut alpha = Agent::new(&hub.url(), "alpha");
    alpha.start();
    hub.wait_registered(&["alpha"]);
    let status = alpha.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "agent on SIGTERM: {status:?} (None: still running after 10 s)"
    );
    let status = hub.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "hub on SIGTERM: {status:?} (None: still running after 10 s)"
    );
    assert!(
        list_dir_all(&alpha.dir("outbox")).is_empty(),
        "no partial file left"
    );
}
