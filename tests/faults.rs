//! Faults of the machine rather than of the network: a full disk at the hub and at a
//! receiver, wall-clock steps, and a file watcher that overflows.
//!
//! Full disks are small tmpfs mounts, which needs root; clock steps use libfaketime
//! (Debian's `faketime`). Without them a test says why it skips, unless
//! `MESYNC_REQUIRE_TOOLS=1`, under which it fails.

mod support;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use serde_json::json;
use support::*;

/// A small tmpfs mounted over a directory, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs(dir.to_path_buf())),
            _ => {
                unavailable(
                    "faults",
                    "mounting a tmpfs (needs root and the mount command)",
                );
                None
            }
        }
    }

    /// Fills the file system with a file named `.filler` until the disk is full.
    fn fill(&self) -> PathBuf {
        let path = self.0.join(".filler");
        let mut file = fs::File::create(&path).expect("create filler");
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

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

#[test]
fn full_disk_at_the_hub_refuses_with_507_and_everything_flows_once_space_returns() {
    let mut hub = Hub::start();
    // The hub's data dir becomes a 1 MiB tmpfs: stop it, mount, start it again.
    hub.kill9();
    let Some(tmpfs) = Tmpfs::mount(hub.data_dir(), "1m") else {
        return;
    };
    hub.restart();
    let mut rx = Agent::new(&hub.url(), "rx").with_env("MESYNC_HTTP_TIMEOUT", "2");
    let mut tx = Agent::new(&hub.url(), "tx").with_env("MESYNC_HTTP_TIMEOUT", "2");
    rx.start();
    tx.start();
    hub.wait_registered(&["rx", "tx"]);
    let first = send_n(&tx, "rx", 1, "before");
    wait_until(TIMEOUT, "a message before the disk fills", || {
        rx.has(&first[0])
    });

    let filler = tmpfs.fill();
    // For a host that is not running, so the messages stay at the hub: the few that fit in
    // the hub's recycled files are accepted, the rest must be refused.
    let refused = send_n(&tx, "late", 8, "full");
    wait_until(TIMEOUT, "the hub refuses with 507", || {
        tx.logs.contains("507")
    });
    let health = hub.get("/healthz");
    assert_eq!(
        health.status,
        503,
        "healthz on a full disk: {}",
        health.text()
    );
    assert!(health.text().contains("full"), "{}", health.text());
    let metrics = hub.get("/metrics").text();
    let storage_full = metrics
        .lines()
        .find(|l| l.starts_with("mesync_messages_refused_total{reason=\"storage_full\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(storage_full > 0, "refusals are counted:\n{metrics}");
    let waiting = tx.files("outbox").len();
    assert!(waiting > 0, "refused messages wait in outbox/");
    assert_eq!(
        hub.queue_files("late").len() + waiting,
        refused.len(),
        "each message is either stored at the hub or waiting in the outbox"
    );
    assert!(
        tx.files("failed").is_empty(),
        "a full disk is not a permanent refusal"
    );
    assert!(tx.is_running() && hub.is_running());

    fs::remove_file(&filler).expect("free the space");
    wait_until(LONG_TIMEOUT, "the outbox drains once space returns", || {
        tx.files("outbox").is_empty()
    });
    let mut late = Agent::new(&hub.url(), "late");
    late.start();
    wait_until(LONG_TIMEOUT, "everything arrives", || {
        refused.iter().all(|id| late.has(id))
    });
    assert_once_each(&late, &refused);
    assert_once_each(&rx, &first);
    wait_until(TIMEOUT, "healthz recovers", || {
        hub.get("/healthz").status == 200
    });
    drop((rx, tx, late, hub));
}

#[test]
fn full_inbox_disk_is_not_acknowledged_and_delivers_once_space_returns() {
    let hub = Hub::start();
    let mut rx = Agent::new(&hub.url(), "rx").with_env("MESYNC_HTTP_TIMEOUT", "2");
    let mut tx = Agent::new(&hub.url(), "tx");
    let Some(tmpfs) = Tmpfs::mount(&rx.dir("inbox"), "256k") else {
        return;
    };
    rx.start();
    tx.start();
    hub.wait_registered(&["rx", "tx"]);
    let filler = tmpfs.fill();

    let ids = send_n(&tx, "rx", 5, "inbox-full");
    wait_until(TIMEOUT, "the receiver fails to write its inbox", || {
        rx.logs.contains("cannot write the inbox")
    });
    assert_eq!(
        hub.queue_files("rx").len(),
        5,
        "nothing acknowledged: the hub keeps the queue"
    );
    assert!(rx.is_running(), "the receiver keeps running");

    fs::remove_file(&filler).expect("free the space");
    wait_until(
        LONG_TIMEOUT,
        "everything arrives once space returns",
        || ids.iter().all(|id| rx.has(id)),
    );
    assert_once_each(&rx, &ids);
    wait_until(TIMEOUT, "the hub's queue drains", || {
        hub.queue_files("rx").is_empty()
    });
    drop(rx);
    drop(tmpfs);
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
