//! Faults of the machine rather than of the network: wall-clock steps and a file watcher
//! that overflows. (Full disks and other shortages: `tests/shortages.rs`.)
//!
//! Clock steps use libfaketime (Debian's `faketime`). Without it a test says why it skips,
//! unless `MESYNC_REQUIRE_TOOLS=1`, under which it fails.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use serde_json::json;
use support::*;

/// Sends `n` messages from `tx` to `target`; returns their ids in order.
fn send_n(tx: &Agent, target: &str, n: usize, tag: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            tx.send(
                "fault.test",
                &json!({"tag": tag, "i": i}).to_string(),
                &["--target", target],
            )
        })
        .collect()
}

fn assert_once_each(rx: &Agent, ids: &[String]) {
    for id in ids {
        assert_eq!(
            rx.inbox_count(id),
            1,
            "message {id} in {}'s inbox",
            rx.host_id
        );
    }
}

/// libfaketime, set up so the wall clock of a process can be stepped by writing an offset
/// into a file, while its monotonic clock runs true.
struct FakeClock {
    file: PathBuf,
    library: PathBuf,
}

impl FakeClock {
    fn new(dir: &Path) -> Option<FakeClock> {
        let library = [
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/faketime/libfaketime.so.1",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
        let Some(library) = library else {
            unavailable("faults", "libfaketime (Debian package faketime)");
            return None;
        };
        let file = dir.join("faketime.offset");
        fs::write(&file, "+0\n").expect("write offset");
        Some(FakeClock { file, library })
    }

    fn apply(&self, agent: Agent) -> Agent {
        agent
            .with_env("LD_PRELOAD", &self.library.to_string_lossy())
            .with_env("FAKETIME_TIMESTAMP_FILE", &self.file.to_string_lossy())
            .with_env("FAKETIME_NO_CACHE", "1")
            .with_env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
    }

    fn step(&self, offset: &str) {
        write_atomic(
            self.file.parent().expect("offset file has a dir"),
            "faketime.offset",
            format!("{offset}\n").as_bytes(),
        );
    }
}

/// Waits until `state/status.json` has been rewritten (a housekeeping tick) `ticks` times.
fn wait_ticks(agent: &Agent, ticks: usize) {
    let status = agent.dir("state").join("status.json");
    let mtime = || fs::metadata(&status).and_then(|m| m.modified()).ok();
    for _ in 0..ticks {
        let before: Option<SystemTime> = mtime();
        wait_until(TIMEOUT, "a housekeeping tick", || mtime() != before);
    }
}

#[test]
fn clock_steps_keep_delivery_in_order_and_do_not_purge_sent_early() {
    let hub = Hub::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(clock) = FakeClock::new(dir.path()) else {
        return;
    };
    // sent_ttl is 30 minutes: a forward step of an hour must not purge what was just sent.
    let mut tx = clock.apply(Agent::new(&hub.url(), "tx").with_env("MESYNC_SENT_TTL", "1800"));
    let mut rx = clock.apply(Agent::new(&hub.url(), "rx"));
    rx.install_recorder("fault.test");
    tx.start();
    rx.start();
    hub.wait_registered(&["rx", "tx"]);

    let mut ids = send_n(&tx, "rx", 3, "before");
    wait_until(TIMEOUT, "the first messages", || {
        ids.iter().all(|id| rx.has(id))
    });

    clock.step("+1h");
    wait_until(TIMEOUT, "the agents notice the step", || {
        tx.logs.contains("jumped forward") && rx.logs.contains("jumped forward")
    });
    ids.extend(send_n(&tx, "rx", 3, "after-forward"));
    wait_until(TIMEOUT, "messages after a forward step", || {
        ids.iter().all(|id| rx.has(id))
    });
    wait_ticks(&tx, 2);
    assert_eq!(
        tx.files("sent").len(),
        6,
        "a forward step of an hour does not purge files sent seconds ago (sent_ttl 30 min)"
    );

    clock.step("-1h");
    wait_until(TIMEOUT, "the agents notice the backward step", || {
        tx.logs.contains("jumped backward")
    });
    ids.extend(send_n(&tx, "rx", 3, "after-backward"));
    wait_until(TIMEOUT, "messages after a backward step", || {
        ids.iter().all(|id| rx.has(id))
    });
    assert_once_each(&rx, &ids);
    wait_until(TIMEOUT, "every hook ran", || {
        rx.hook_runs().len() == ids.len()
    });
    assert_eq!(
        rx.hook_runs(),
        ids,
        "hooks ran in send order across both steps"
    );
    assert_eq!(tx.files("sent").len(), 9, "nothing purged early");
}

#[test]
fn watcher_overflow_is_caught_by_a_rescan() {
    let hub = Hub::start();
    // No periodic scan during the test: only the watcher and its overflow rescan can find
    // the files.
    let mut tx = Agent::new(&hub.url(), "tx").with_env("MESYNC_POLL_INTERVAL", "3600");
    let mut rx = Agent::new(&hub.url(), "rx");
    tx.start();
    rx.start();
    hub.wait_registered(&["rx", "tx"]);
    let pid = tx.pid().expect("tx runs").to_string();

    // With the agent stopped, its inotify queue (16384 events by default) overflows: each
    // atomic drop is several events.
    let status = Command::new("kill").args(["-STOP", &pid]).status();
    assert!(status.is_ok_and(|s| s.success()), "SIGSTOP the agent");
    let outbox = tx.dir("outbox");
    let count = 5000;
    for i in 0..count {
        let msg = message("overflow.test", "tx", Some("rx"), "normal", json!({"i": i}));
        write_atomic(&outbox, &file_name_for(&msg), msg.to_string().as_bytes());
    }
    let status = Command::new("kill").args(["-CONT", &pid]).status();
    assert!(status.is_ok_and(|s| s.success()), "SIGCONT the agent");

    wait_until(LONG_TIMEOUT, "every dropped file is sent", || {
        tx.files("outbox").is_empty()
    });
    assert!(
        tx.logs.contains("lost track"),
        "the watcher's queue overflowed, so this test proves the rescan"
    );
    wait_until(LONG_TIMEOUT, "every file arrives", || {
        rx.files("inbox").len() == count
    });
    assert_eq!(tx.files("sent").len(), count);
}
