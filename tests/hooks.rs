//! Hook outcomes: temporary failure and retry, failure, timeout, loose files, and expired
//! messages that must not be hooked at all.

mod support;

use serde_json::{Value, json};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use support::*;

/// The `hook` outcome `mesync list inbox --json` shows for `id`, if listed.
fn outcome(agent: &Agent, id: &str) -> Option<String> {
    agent
        .list_json("inbox")
        .into_iter()
        .find(|e| e["id"] == id)
        .and_then(|e| e["hook"].as_str().map(str::to_string))
}

/// A receiver "beta" for `hub`, already registered, with the recorder on `barrier.type`.
fn receiver(hub: &Hub) -> Agent {
    let beta = Agent::new(&hub.url(), "beta");
    beta.install_recorder("barrier.type");
    beta
}

fn post_to_beta(hub: &Hub, ty: &str, payload: Value) -> String {
    let msg = message(ty, "tester", Some("beta"), "normal", payload);
    hub.post_message(&msg);
    id_of(&msg)
}

#[test]
fn exit_75_retries_the_hook_with_a_higher_attempt() {
    let hub = Hub::start();
    let mut beta = receiver(&hub);
    let log = beta.base().join("attempts.log");
    beta.install_hook(
        "flaky.type",
        &format!(
            "#!/bin/sh\necho \"$MESYNC_MESSAGE_ID $MESYNC_ATTEMPT\" >> '{}'\n\
             [ \"$MESYNC_ATTEMPT\" -lt 3 ] && exit 75\nexit 0\n",
            log.display()
        ),
    );
    beta.start();
    let id = post_to_beta(&hub, "flaky.type", json!({}));
    wait_until(TIMEOUT, "the hook succeeds on its third attempt", || {
        outcome(&beta, &id).as_deref() == Some("ok")
    });
    let attempts = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        attempts,
        format!("{id} 1\n{id} 2\n{id} 3\n"),
        "attempts the hook saw"
    );
}

#[test]
fn failing_hook_is_recorded_and_does_not_block_the_next_one() {
    let hub = Hub::start();
    let mut beta = receiver(&hub);
    beta.install_hook("broken.type", "#!/bin/sh\ncat > /dev/null\nexit 3\n");
    beta.start();
    let broken = post_to_beta(&hub, "broken.type", json!({}));
    let next = post_to_beta(&hub, "barrier.type", json!({}));
    wait_until(TIMEOUT, "the next message's hook runs", || {
        beta.hook_stdin(&next, 1).is_some()
    });
    wait_until(TIMEOUT, "the failure is recorded", || {
        outcome(&beta, &broken).is_some_and(|o| o.starts_with("failed"))
    });
    assert!(beta.has(&broken), "the message stays delivered");
    let status = beta.cmd(&["status"]).ok("mesync status");
    assert!(
        status.stdout.contains(&broken) || status.stdout.to_lowercase().contains("fail"),
        "mesync status shows recent hook failures:\n{}",
        status.stdout
    );
}

#[test]
fn hook_is_killed_with_its_process_group_after_hook_timeout() {
    let hub = Hub::start();
    let mut beta = receiver(&hub).with_env("MESYNC_HOOK_TIMEOUT", "1");
    // A duration no other process on the machine is likely to sleep for.
    let nap = format!("{}.{}", 40 + std::process::id() % 10, std::process::id());
    let _cleanup = KillByCmdline(vec!["sleep".into(), nap.clone()]);
    // The look-up itself works: it sees a sleep of ours.
    let own = ChildGuard(
        std::process::Command::new("sleep")
            .arg(&nap)
            .spawn()
            .unwrap(),
    );
    wait_until(TIMEOUT, "the look-up sees our own sleep", || {
        !pids_with_cmdline(&["sleep", &nap]).is_empty()
    });
    drop(own);
    assert!(pids_with_cmdline(&["sleep", &nap]).is_empty());

    let marker = beta.base().join("slow-started");
    beta.install_hook(
        "slow.type",
        &format!("#!/bin/sh\ntouch '{}'\nsleep {nap}\n", marker.display()),
    );
    beta.start();
    let slow = post_to_beta(&hub, "slow.type", json!({}));
    wait_until(TIMEOUT, "the slow hook starts", || marker.exists());
    wait_until(TIMEOUT, "the timeout is recorded", || {
        outcome(&beta, &slow).is_some_and(|o| o != "ok" && o != "pending")
    });
    wait_until(TIMEOUT, "the hook's child (sleep) is killed too", || {
        pids_with_cmdline(&["sleep", &nap]).is_empty()
    });
    let next = post_to_beta(&hub, "barrier.type", json!({}));
    wait_until(TIMEOUT, "the next hook runs", || {
        beta.hook_stdin(&next, 1).is_some()
    });
}

#[test]
fn a_process_left_holding_a_hooks_stdin_does_not_hold_up_the_next_hook() {
    let hub = Hub::start();
    let mut beta = receiver(&hub);
    // A duration no other process on the machine is likely to sleep for.
    let nap = format!("{}.{}", 50 + std::process::id() % 10, std::process::id());
    let _cleanup = KillByCmdline(vec!["sleep".into(), nap.clone()]);
    // The hook exits at once, leaving behind a process that holds its stdin without ever
    // reading it (through fd 3: a background command's own stdin is /dev/null).
    beta.install_hook(
        "holds.stdin",
        &format!("#!/bin/sh\nexec 3<&0\nsleep {nap} <&3 &\nexit 0\n"),
    );
    beta.start();
    // Larger than a pipe's buffer (64 KiB): writing it all waits for a reader.
    let held = post_to_beta(&hub, "holds.stdin", json!({"pad": "x".repeat(200_000)}));
    let next = post_to_beta(&hub, "barrier.type", json!({}));
    wait_until(TIMEOUT, "the next message's hook runs", || {
        beta.hook_stdin(&next, 1).is_some()
    });
    assert_eq!(outcome(&beta, &held).as_deref(), Some("ok"));
    assert!(
        !pids_with_cmdline(&["sleep", &nap]).is_empty(),
        "the process the hook left behind was still holding its stdin"
    );
}

#[test]
fn loose_hook_file_is_refused() {
    let hub = Hub::start();
    let mut beta = receiver(&hub);
    let ran = beta.base().join("loose-ran");
    beta.install_hook(
        "loose.type",
        &format!("#!/bin/sh\ntouch '{}'\n", ran.display()),
    );
    let hook = beta.dir("hooks").join("loose.type");
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o777)).unwrap();
    beta.start();
    let loose = post_to_beta(&hub, "loose.type", json!({}));
    let next = post_to_beta(&hub, "barrier.type", json!({}));
    wait_until(TIMEOUT, "the next message's hook runs", || {
        beta.hook_stdin(&next, 1).is_some()
    });
    assert!(beta.has(&loose), "the message is delivered");
    assert!(!ran.exists(), "a world-writable hook was run");
    wait_until(TIMEOUT, "the refusal is recorded", || {
        outcome(&beta, &loose).is_some_and(|o| o != "ok" && o != "pending" && o != "none")
    });
}

#[test]
fn expired_message_is_neither_delivered_nor_hooked() {
    let hub = Hub::start();
    let mut beta = receiver(&hub);
    beta.install_recorder("expiring.type");

    let now = chrono::Utc::now();
    let mut expired = message("expiring.type", "tester", Some("beta"), "high", json!(1));
    expired["expires_at"] = json!(rfc3339(now - chrono::Duration::minutes(1)));
    // Accepted or refused, it must not come out the other end.
    let _ = hub.post("/v1/messages", &expired);
    let mut soon = message("expiring.type", "tester", Some("beta"), "high", json!(2));
    soon["expires_at"] = json!(rfc3339(now + chrono::Duration::seconds(2)));
    hub.post_message(&soon);

    // Negative observation: let `soon` expire while beta is offline.
    std::thread::sleep(Duration::from_secs(3));
    beta.start();
    let next = post_to_beta(&hub, "barrier.type", json!({}));
    wait_until(TIMEOUT, "the barrier's hook runs", || {
        beta.hook_stdin(&next, 1).is_some()
    });
    assert!(
        !beta.has(&id_of(&expired)),
        "an expired message was delivered"
    );
    assert!(!beta.has(&id_of(&soon)), "an expired message was delivered");
    assert_eq!(beta.hook_runs(), vec![next], "only the barrier was hooked");
}

#[test]
fn hook_interrupted_by_an_agent_crash_runs_again_with_a_higher_attempt() {
    let hub = Hub::start();
    let mut beta = receiver(&hub);
    let log = beta.base().join("attempts.log");
    let nap = format!("{}.{}", 50 + std::process::id() % 10, std::process::id());
    let _cleanup = KillByCmdline(vec!["sleep".into(), nap.clone()]);
    beta.install_hook(
        "crash.type",
        &format!(
            "#!/bin/sh\necho \"$MESYNC_ATTEMPT\" >> '{}'\n\
             if [ \"$MESYNC_ATTEMPT\" = 1 ]; then sleep {nap}; fi\nexit 0\n",
            log.display()
        ),
    );
    beta.start();
    let id = post_to_beta(&hub, "crash.type", json!({}));
    wait_until(TIMEOUT, "the first attempt is running", || {
        fs::read_to_string(&log).is_ok_and(|l| l == "1\n")
            && !pids_with_cmdline(&["sleep", &nap]).is_empty()
    });
    beta.kill9();
    // The hook ran in its own process group: it outlives the agent. End it.
    kill_processes_with_cmdline(&["sleep", &nap]);

    beta.start();
    wait_until(TIMEOUT, "the hook runs again and succeeds", || {
        outcome(&beta, &id).as_deref() == Some("ok")
    });
    let attempts = fs::read_to_string(&log).unwrap_or_default();
    let attempts: Vec<u32> = attempts.lines().filter_map(|l| l.parse().ok()).collect();
    assert_eq!(attempts.len(), 2, "attempts: {attempts:?}");
    assert_eq!(attempts[0], 1);
    assert!(
        attempts[1] > 1,
        "MESYNC_ATTEMPT after the crash: {attempts:?}"
    );
    assert_eq!(beta.inbox_count(&id), 1);
}
