//! End-to-end delivery: broadcast, targeted, hooks, deduplication, hand-dropped files and
//! delivery order, through a real hub and real agents.

mod support;

use serde_json::{Value, json};
use std::fs;
use std::os::unix::fs::MetadataExt;
use support::*;

/// Checks the fields a receiver must see for a message sent with `mesync send`.
fn assert_received(msg: &Value, id: &str, ty: &str, source: &str, target: Value, payload: &Value) {
    assert_eq!(msg["id"], id, "id in {msg}");
    assert_eq!(msg["type"], ty, "type in {msg}");
    assert_eq!(msg["source"], source, "source in {msg}");
    assert_eq!(msg["target"], target, "target in {msg}");
    assert_eq!(&msg["payload"], payload, "payload in {msg}");
    assert_eq!(msg["priority"], "normal", "priority in {msg}");
    let created = msg["created_at"].as_str().expect("created_at is a string");
    chrono::DateTime::parse_from_rfc3339(created)
        .unwrap_or_else(|e| panic!("created_at {created:?} is not RFC 3339: {e}"));
}

#[test]
fn broadcast_reaches_every_other_host_and_not_the_sender() {
    let hub = Hub::start();
    let [alpha, beta, gamma] = start_agents(&hub, ["alpha", "beta", "gamma"]);

    let payload = json!({"n": 1, "text": "to everyone"});
    let id = alpha.send("test.broadcast", &payload.to_string(), &[]);
    wait_until(TIMEOUT, "beta and gamma receive the broadcast", || {
        beta.has(&id) && gamma.has(&id)
    });
    for rx in [&beta, &gamma] {
        assert_eq!(rx.inbox_count(&id), 1, "{} has one copy", rx.host_id);
        let (_, msg) = rx.inbox_entry(&id).expect("inbox entry");
        assert_received(&msg, &id, "test.broadcast", "alpha", Value::Null, &payload);
    }

    // Barrier: a message for the sender queued after the broadcast. Had the broadcast been
    // queued for the sender too, it would have come first.
    let barrier = beta.send("test.barrier", "{}", &["--target", "alpha"]);
    wait_until(TIMEOUT, "alpha receives the barrier message", || {
        alpha.has(&barrier)
    });
    assert!(
        !alpha.has(&id),
        "the sender received its own broadcast: {:?}",
        alpha.inbox()
    );
    assert!(!hub.queue_ids("alpha").contains(&id));
    assert_eq!(alpha.inbox().len(), 1, "alpha's inbox: {:?}", alpha.inbox());
}

#[test]
fn targeted_message_reaches_only_its_target() {
    let hub = Hub::start();
    let [alpha, beta, gamma] = start_agents(&hub, ["alpha", "beta", "gamma"]);

    let payload = json!({"for": "gamma"});
    let id = alpha.send(
        "test.targeted",
        &payload.to_string(),
        &["--target", "gamma"],
    );
    wait_until(TIMEOUT, "gamma receives the targeted message", || {
        gamma.has(&id)
    });
    let (_, msg) = gamma.inbox_entry(&id).expect("inbox entry");
    assert_received(
        &msg,
        &id,
        "test.targeted",
        "alpha",
        json!("gamma"),
        &payload,
    );

    // Barrier: a broadcast from gamma, queued for alpha and beta after the targeted one.
    let barrier = gamma.send("test.barrier", "{}", &[]);
    wait_until(
        TIMEOUT,
        "alpha and beta receive the barrier broadcast",
        || alpha.has(&barrier) && beta.has(&barrier),
    );
    assert!(!alpha.has(&id), "the sender received its targeted message");
    assert!(!beta.has(&id), "beta received a message targeted at gamma");
    assert_eq!(gamma.inbox_count(&id), 1);
    assert!(!gamma.has(&barrier), "gamma received its own broadcast");
}

#[test]
fn hook_gets_the_message_on_stdin_and_its_env_and_runs_once() {
    let hub = Hub::start();
    let mut alpha = Agent::new(&hub.url(), "alpha");
    // A variable of the agent's own environment that must not reach the hook.
    let mut beta = Agent::new(&hub.url(), "beta").with_env("CANARY_SECRET", "must-not-leak");
    beta.install_recorder("job.run");
    alpha.start();
    beta.start();
    hub.wait_registered(&["alpha", "beta"]);

    let payload = json!({"k": "v", "nested": [1, 2, {"x": null}], "text": "h\u{e9}llo \"quoted\""});
    let id = alpha.send(
        "job.run",
        &payload.to_string(),
        &["--target", "beta", "--priority", "high"],
    );
    wait_until(TIMEOUT, "the hook runs for the message", || {
        beta.hook_stdin(&id, 1).is_some()
    });

    // stdin: the whole message, the same as the inbox file.
    let stdin = beta.hook_stdin(&id, 1).unwrap();
    let (inbox_name, inbox_msg) = beta.inbox_entry(&id).expect("message in inbox");
    assert_eq!(stdin, inbox_msg, "hook stdin differs from the inbox file");
    assert_eq!(stdin["id"], id);
    assert_eq!(stdin["type"], "job.run");
    assert_eq!(stdin["source"], "alpha");
    assert_eq!(stdin["target"], "beta");
    assert_eq!(stdin["priority"], "high");
    assert_eq!(stdin["payload"], payload);

    // Environment.
    let env = beta.hook_env(&id, 1).expect("hook env recorded");
    let var = |k: &str| env.get(k).map(String::as_str);
    assert_eq!(var("MESYNC_MESSAGE_ID"), Some(id.as_str()), "env: {env:?}");
    assert_eq!(var("MESYNC_MESSAGE_TYPE"), Some("job.run"), "env: {env:?}");
    assert_eq!(var("MESYNC_SOURCE"), Some("alpha"), "env: {env:?}");
    assert_eq!(var("MESYNC_PRIORITY"), Some("high"), "env: {env:?}");
    assert_eq!(var("MESYNC_ATTEMPT"), Some("1"), "env: {env:?}");
    assert!(
        var("PATH").is_some(),
        "PATH missing from the hook env: {env:?}"
    );
    assert!(
        var("HOME").is_some(),
        "HOME missing from the hook env: {env:?}"
    );
    let inbox_file = var("MESYNC_INBOX_FILE").expect("MESYNC_INBOX_FILE set");
    assert_eq!(
        std::path::Path::new(inbox_file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned()),
        Some(inbox_name.clone()),
        "MESYNC_INBOX_FILE names the inbox file"
    );
    if std::path::Path::new(inbox_file).is_absolute() {
        let text = std::fs::read(inbox_file).expect("MESYNC_INBOX_FILE readable");
        let on_disk: Value = serde_json::from_slice(&text).expect("inbox file is JSON");
        assert_eq!(on_disk, inbox_msg);
    }
    assert!(
        !env.contains_key("CANARY_SECRET"),
        "the agent's environment leaked into the hook: {env:?}"
    );
    // What the shell itself adds (PWD, SHLVL, OLDPWD, _) is not the agent's doing.
    let allowed = [
        "PATH", "HOME", "USER", "LOGNAME", "PWD", "SHLVL", "OLDPWD", "_",
    ];
    for key in env.keys() {
        assert!(
            key.starts_with("MESYNC_") || allowed.contains(&key.as_str()),
            "unexpected variable {key} in the hook environment: {env:?}"
        );
    }

    // Exactly once: a later message's hook is the barrier (hooks run one at a time, in order).
    let second = alpha.send("job.run", r#"{"second": true}"#, &["--target", "beta"]);
    wait_until(TIMEOUT, "the hook runs for the second message", || {
        beta.hook_stdin(&second, 1).is_some()
    });
    assert_eq!(
        beta.hook_runs(),
        vec![id.clone(), second.clone()],
        "hook runs (ids in order)"
    );
    assert!(
        beta.hook_stdin(&id, 2).is_none(),
        "the hook ran a second time"
    );
    assert_eq!(beta.inbox_count(&id), 1);

    // The outcome is recorded and shown by `mesync list inbox`.
    wait_until(
        TIMEOUT,
        "`mesync list inbox` shows hook \"ok\" for both",
        || {
            let entries = beta.list_json("inbox");
            [&id, &second].iter().all(|want| {
                entries
                    .iter()
                    .any(|e| e["id"] == want.as_str() && e["hook"] == "ok")
            })
        },
    );
}

#[test]
fn same_id_sent_twice_is_delivered_and_hooked_once() {
    let hub = Hub::start();
    let mut alpha = Agent::new(&hub.url(), "alpha");
    let mut beta = Agent::new(&hub.url(), "beta");
    beta.install_recorder("dup.test");
    alpha.start();
    beta.start();
    hub.wait_registered(&["alpha", "beta"]);

    let msg = message("dup.test", "alpha", Some("beta"), "normal", json!({"n": 1}));
    let id = id_of(&msg);
    let name = file_name_for(&msg);
    let bytes = serde_json::to_vec_pretty(&msg).unwrap();

    write_atomic(&alpha.dir("outbox"), &name, &bytes);
    wait_until(TIMEOUT, "the first copy is sent and archived", || {
        alpha.ids("sent").contains(&id) && !alpha.ids("outbox").contains(&id)
    });
    wait_until(TIMEOUT, "beta runs the hook for it", || {
        beta.hook_stdin(&id, 1).is_some()
    });
    let (inbox_name, _) = beta.inbox_entry(&id).expect("in beta's inbox");
    let inode = || {
        fs::metadata(beta.dir("inbox").join(&inbox_name))
            .map(|m| m.ino())
            .ok()
    };
    let first_inode = inode();

    // The very same message again.
    write_atomic(&alpha.dir("outbox"), &name, &bytes);
    wait_until(TIMEOUT, "the second copy leaves the outbox", || {
        !alpha.ids("outbox").contains(&id)
    });
    assert!(
        !alpha.ids("failed").contains(&id),
        "a duplicate is not a failure: {:?}",
        alpha.files("failed")
    );
    assert!(alpha.ids("sent").contains(&id));

    // Barrier: a later message to beta, hooked after anything the duplicate could cause.
    let barrier = alpha.send("dup.test", r#"{"barrier": true}"#, &["--target", "beta"]);
    wait_until(TIMEOUT, "beta runs the hook for the barrier", || {
        beta.hook_stdin(&barrier, 1).is_some()
    });
    assert_eq!(beta.inbox_count(&id), 1, "inbox: {:?}", beta.files("inbox"));
    assert_eq!(
        inode(),
        first_inode,
        "the inbox file was written a second time"
    );
    assert_eq!(
        beta.hook_runs(),
        vec![id.clone(), barrier.clone()],
        "hook runs"
    );
}

#[test]
fn receiver_ignores_a_redelivered_id_even_after_flush_inbox() {
    // A second hub offers an id the receiver already delivered: only the receiver's own
    // record of delivered ids can keep it out of the inbox and the hook.
    let first_hub = Hub::start();
    let mut beta = Agent::new(&first_hub.url(), "beta");
    beta.install_recorder("ledger.test");
    beta.start();
    let msg = message(
        "ledger.test",
        "tester",
        Some("beta"),
        "normal",
        json!({"n": 1}),
    );
    let id = id_of(&msg);
    first_hub.post_message(&msg);
    wait_until(TIMEOUT, "beta runs the hook for the message", || {
        beta.hook_stdin(&id, 1).is_some()
    });
    wait_until(TIMEOUT, "beta acknowledges it", || {
        first_hub.queue_ids("beta").is_empty()
    });
    beta.stop();
    beta.cmd(&["flush", "inbox"]).ok("mesync flush inbox");
    assert!(
        beta.inbox().is_empty(),
        "inbox after flush: {:?}",
        beta.files("inbox")
    );

    let second_hub = Hub::start();
    second_hub.post_message(&msg);
    let barrier = message(
        "ledger.test",
        "tester",
        Some("beta"),
        "low",
        json!({"n": 2}),
    );
    second_hub.post_message(&barrier);
    beta.set_hub_url(&second_hub.url());
    beta.start();
    wait_until(TIMEOUT, "beta runs the hook for the barrier", || {
        beta.hook_stdin(&id_of(&barrier), 1).is_some()
    });
    wait_until(TIMEOUT, "beta acknowledges both to the second hub", || {
        second_hub.queue_ids("beta").is_empty()
    });
    assert!(
        !beta.has(&id),
        "a redelivered id was written to the inbox again"
    );
    assert_eq!(
        beta.hook_runs(),
        vec![id.clone(), id_of(&barrier)],
        "hook runs"
    );
}

#[test]
fn hand_dropped_file_is_completed_and_delivered() {
    let hub = Hub::start();
    let [alpha, beta] = start_agents(&hub, ["alpha", "beta"]);

    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    write_atomic(
        &alpha.dir("outbox"),
        "job.json",
        br#"{"type": "hand.drop", "payload": {"job": 1}}"#,
    );
    wait_until(TIMEOUT, "beta receives the hand-dropped message", || {
        beta.inbox().iter().any(|m| m["type"] == "hand.drop")
    });
    let (name, msg) = read_messages(&beta.dir("inbox"))
        .into_iter()
        .find(|(_, m)| m["type"] == "hand.drop")
        .unwrap();
    let id = msg["id"].as_str().expect("id filled in");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "id {id:?} is a UUID");
    assert_eq!(msg["source"], "alpha", "source filled in: {msg}");
    assert_eq!(msg["priority"], "normal", "priority filled in: {msg}");
    assert_eq!(msg["target"], Value::Null, "target: {msg}");
    assert_eq!(msg["payload"], json!({"job": 1}));
    let created = msg["created_at"].as_str().expect("created_at filled in");
    let created = chrono::DateTime::parse_from_rfc3339(created)
        .unwrap_or_else(|e| panic!("created_at {created:?}: {e}"));
    let age = chrono::Utc::now().signed_duration_since(created);
    assert!(
        created >= before && age < chrono::Duration::minutes(5),
        "created_at {created} is not about now"
    );
    assert_eq!(name, file_name_for(&msg), "inbox file name");

    wait_until(
        TIMEOUT,
        "the hand-dropped file leaves alpha's outbox",
        || alpha.files("outbox").is_empty(),
    );
    wait_until(TIMEOUT, "alpha archives it in sent/", || {
        alpha.ids("sent").iter().any(|s| s == id)
    });
}

/// Labels and priorities, in the order they are sent.
const MIXED: [(&str, &str); 9] = [
    ("low-1", "low"),
    ("normal-1", "normal"),
    ("high-1", "high"),
    ("low-2", "low"),
    ("normal-2", "normal"),
    ("high-2", "high"),
    ("normal-3", "normal"),
    ("high-3", "high"),
    ("low-3", "low"),
];

/// The labels of `MIXED` in the order a host must receive them.
const MIXED_DELIVERY: [&str; 9] = [
    "high-1", "high-2", "high-3", "normal-1", "normal-2", "normal-3", "low-1", "low-2", "low-3",
];

fn labels(ids: &[String], by_label: &[(String, String)]) -> Vec<String> {
    ids.iter()
        .map(|id| {
            by_label
                .iter()
                .find(|(_, i)| i == id)
                .map(|(l, _)| l.clone())
                .unwrap_or_else(|| format!("unknown id {id}"))
        })
        .collect()
}

#[test]
fn offline_host_gets_high_priority_first_and_fifo_within_a_priority() {
    let hub = Hub::start();
    let mut beta = Agent::new(&hub.url(), "beta");
    beta.install_recorder("prio.test");

    // Queued at the hub while beta has never been seen.
    let t0 = chrono::Utc::now() - chrono::Duration::seconds(60);
    let mut by_label = Vec::new();
    for (i, (label, priority)) in MIXED.iter().enumerate() {
        let at = t0 + chrono::Duration::milliseconds(i as i64);
        let msg = message_at(
            "prio.test",
            "sender",
            Some("beta"),
            priority,
            json!({"label": label}),
            at,
        );
        hub.post_message(&msg);
        by_label.push((label.to_string(), id_of(&msg)));
    }
    let expected: Vec<String> = MIXED_DELIVERY.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        labels(&hub.queue_ids("beta"), &by_label),
        expected,
        "`ls queues/beta` lists the pending messages in delivery order"
    );

    beta.start();
    wait_until(TIMEOUT, "the hook runs for all nine messages", || {
        beta.hook_runs().len() >= MIXED.len()
    });
    assert_eq!(
        labels(&beta.hook_runs(), &by_label),
        expected,
        "order the hooks ran in"
    );
    assert_eq!(beta.inbox().len(), MIXED.len());
}

#[test]
fn agent_sends_its_outbox_by_priority_then_age() {
    let hub = Hub::start();
    let mut alpha = Agent::new(&hub.url(), "alpha");
    let mut beta = Agent::new(&hub.url(), "beta");
    beta.install_recorder("prio.test");

    // Written while alpha's agent is not running; many share a second, so only created_at
    // to the microsecond orders them.
    let mut by_label = Vec::new();
    for (label, priority) in MIXED {
        let payload = json!({ "label": label }).to_string();
        let id = alpha.send(
            "prio.test",
            &payload,
            &["--priority", priority, "--target", "beta"],
        );
        by_label.push((label.to_string(), id));
    }
    assert_eq!(alpha.files("outbox").len(), MIXED.len());

    alpha.start();
    wait_until(TIMEOUT, "alpha sends its whole outbox", || {
        alpha.files("outbox").is_empty() && alpha.ids("sent").len() == MIXED.len()
    });
    beta.start();
    wait_until(TIMEOUT, "the hook runs for all nine messages", || {
        beta.hook_runs().len() >= MIXED.len()
    });
    let expected: Vec<String> = MIXED_DELIVERY.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        labels(&beta.hook_runs(), &by_label),
        expected,
        "order the hooks ran in"
    );
}

#[test]
fn sender_and_receiver_keep_working_across_an_agent_restart() {
    // A receiver that was down catches up without a duplicate.
    let hub = Hub::start();
    let [alpha, mut beta] = start_agents(&hub, ["alpha", "beta"]);

    let first = alpha.send("restart.test", "1", &["--target", "beta"]);
    wait_until(TIMEOUT, "beta receives the first message", || {
        beta.has(&first)
    });
    beta.stop();
    let second = alpha.send("restart.test", "2", &["--target", "beta"]);
    wait_until(TIMEOUT, "the hub holds the second message for beta", || {
        hub.queue_ids("beta").contains(&second)
    });
    beta.start();
    wait_until(TIMEOUT, "beta receives the second message", || {
        beta.has(&second)
    });
    wait_until(TIMEOUT, "beta acknowledges it", || {
        hub.queue_ids("beta").is_empty()
    });
    assert_eq!(beta.inbox_count(&first), 1);
    assert_eq!(beta.inbox_count(&second), 1);
    assert_eq!(beta.inbox().len(), 2);
}
