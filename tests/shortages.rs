//! Scarce resources at every hop, made real: small tmpfs mounts (`size=`, `nr_inodes=`), a
//! bind mount remounted read-only, a FUSE file system that answers EDQUOT past a quota, and
//! `prlimit --nofile` on running processes. Each test
//! shows that progress is made while the resource is short (what fits arrives before the
//! resource returns), that the shortage is visible (`mesync status`, `/healthz`,
//! `/metrics`, a log line naming the directory and the resource), and that once the
//! resource returns every message arrives exactly once, without a restart.
//!
//! Mounts need root; without it a test says why it skips, unless `MESYNC_REQUIRE_TOOLS=1`.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use support::mounts::{Bind, QuotaFs, Tmpfs};
use support::*;

/// A payload that makes a message of about `bytes` bytes.
fn payload_of(bytes: usize, i: usize) -> Value {
    json!({"i": i, "pad": "x".repeat(bytes.saturating_sub(250))})
}

/// Posts complete messages for `target` straight to the hub, as one batch; returns their
/// ids in order.
fn post_batch(hub: &Hub, target: &str, sizes: &[usize], priority: &str) -> Vec<String> {
    let messages: Vec<Value> = sizes
        .iter()
        .enumerate()
        .map(|(i, size)| {
            message(
                "short.test",
                "tx",
                Some(target),
                priority,
                payload_of(*size, i),
            )
        })
        .collect();
    let ids: Vec<String> = messages.iter().map(id_of).collect();
    let answer = hub.post("/v1/messages", &json!({ "messages": messages }));
    assert_eq!(answer.status, 200, "{}", answer.text());
    ids
}

/// Drops `n` complete messages of about `size` bytes for `target` into `tx`'s outbox, as
/// files; returns their ids.
fn drop_complete(tx: &Agent, target: &str, n: usize, size: usize) -> Vec<String> {
    let outbox = tx.dir("outbox");
    (0..n)
        .map(|i| {
            let msg = message(
                "short.test",
                "tx",
                Some(target),
                "normal",
                payload_of(size, i),
            );
            write_atomic(&outbox, &file_name_for(&msg), msg.to_string().as_bytes());
            id_of(&msg)
        })
        .collect()
}

/// `mesync status --json` of an agent.
fn status(agent: &Agent) -> Value {
    let out = agent.cmd(&["status", "--json"]);
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("status JSON: {e}: {}", out.stdout))
}

/// The resources `mesync status` says the agent is short of now.
fn short_of(agent: &Agent) -> Vec<String> {
    status(agent)["shortages"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|s| s["resource"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A consumer that takes files out of an inbox, as a script would, counting each id.
#[derive(Default)]
struct Consumer {
    seen: BTreeMap<String, usize>,
}

impl Consumer {
    /// Takes every file now in `inbox`; returns how many it took.
    fn take_all(&mut self, inbox: &Path) -> usize {
        let mut taken = 0;
        for name in list_dir(inbox) {
            let path = inbox.join(&name);
            let Ok(bytes) = fs::read(&path) else { continue };
            let value: Value = serde_json::from_slice(&bytes).expect("inbox file is JSON");
            *self.seen.entry(id_of(&value)).or_default() += 1;
            fs::remove_file(&path).expect("consume an inbox file");
            taken += 1;
        }
        taken
    }

    fn assert_once_each(&self, ids: &[String]) {
        for id in ids {
            assert_eq!(self.seen.get(id), Some(&1), "message {id} consumed once");
        }
        assert_eq!(self.seen.len(), ids.len(), "nothing else was consumed");
    }
}

/// Posts a batch of messages of `sizes` for `rx`, whose inbox is short of `resource`
/// (logged with `said`): some arrive at once, `mesync status` names the resource, and a
/// consumer moving files out of the inbox gets every message once.
fn takes_what_fits_then_the_rest_as_consumed(
    hub: &Hub,
    rx: &Agent,
    sizes: &[usize],
    resource: &str,
    said: &str,
) {
    let ids = post_batch(hub, "rx", sizes, "normal");
    wait_until(TIMEOUT, "the messages that fit arrive", || {
        !rx.files("inbox").is_empty() && rx.logs.contains(said)
    });
    let arrived = rx.files("inbox").len();
    assert!(
        (1..ids.len()).contains(&arrived),
        "{arrived} of {} fit",
        ids.len()
    );
    wait_until(TIMEOUT, "mesync status says which resource", || {
        short_of(rx) == [resource]
    });
    let mut consumer = Consumer::default();
    wait_until(LONG_TIMEOUT, "every message reaches the consumer", || {
        consumer.take_all(&rx.dir("inbox"));
        consumer.seen.len() == ids.len()
    });
    consumer.assert_once_each(&ids);
    wait_until(TIMEOUT, "the shortage is over", || short_of(rx).is_empty());
}

/// The value of a `/metrics` line that starts with `prefix` (name and labels).
fn metric(hub: &Hub, prefix: &str) -> Option<f64> {
    hub.get("/metrics")
        .text()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Sets the soft open-file limit of a running process; the hard limit stays (raising it
/// again would need CAP_SYS_RESOURCE, which a container may not grant even to root).
fn prlimit_nofile(pid: u32, soft: usize) {
    let hard = hard_nofile(pid);
    let soft = soft.min(hard);
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit --nofile={soft}:{hard} on {pid}");
}

/// The hard open-file limit of a process, from `/proc/PID/limits`.
fn hard_nofile(pid: u32) -> usize {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .expect("a hard open-file limit")
}

/// Descriptors a process has open now.
fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn have_prlimit(test: &str) -> bool {
    let ok = on_path("prlimit") && nix_is_root();
    if !ok {
        unavailable(
            test,
            "prlimit (util-linux) as root, to lower a running process's open-file limit",
        );
    }
    ok
}

fn nix_is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    })
}

#[test]
fn a_small_inbox_takes_what_fits_and_the_rest_follows_as_a_consumer_moves_files_out() {
    let hub = Hub::start();
    let mut rx = Agent::new(&hub.url(), "rx");
    let Some(_tmpfs) = Tmpfs::mount("shortages", &rx.dir("inbox"), "size=256k") else {
        return;
    };
    rx.start();
    hub.wait_registered(&["rx"]);
    // 40 messages of 20 KB, about 12 of which fit: one batch far bigger than the inbox.
    let ids = post_batch(&hub, "rx", &[20_000; 40], "normal");

    wait_until(TIMEOUT, "the messages that fit arrive", || {
        !rx.files("inbox").is_empty() && rx.logs.contains("wrote the messages that fit")
    });
    let arrived = rx.files("inbox").len();
    assert!(
        (5..40).contains(&arrived),
        "{arrived} of 40 in a 256 KiB inbox"
    );
    wait_until(TIMEOUT, "what was written is acknowledged", || {
        hub.queue_files("rx").len() == 40 - arrived
    });
    wait_until(TIMEOUT, "mesync status shows the shortage", || {
        short_of(&rx) == ["space"]
    });
    assert!(
        rx.logs.contains("no free disk space") && rx.logs.contains("inbox"),
        "the log names the resource and the directory"
    );

    let mut consumer = Consumer::default();
    wait_until(LONG_TIMEOUT, "every message reaches the consumer", || {
        consumer.take_all(&rx.dir("inbox"));
        consumer.seen.len() == ids.len()
    });
    consumer.assert_once_each(&ids);
    wait_until(TIMEOUT, "the hub's queue drains", || {
        hub.queue_files("rx").is_empty()
    });
    wait_until(TIMEOUT, "the shortage is over", || short_of(&rx).is_empty());
    assert!(rx.is_running());
    assert!(rx.files("failed").is_empty());
}

#[test]
fn a_message_too_big_for_the_inbox_waits_without_blocking_a_higher_priority_one() {
    let hub = Hub::start();
    let mut rx = Agent::new(&hub.url(), "rx");
    let Some(tmpfs) = Tmpfs::mount("shortages", &rx.dir("inbox"), "size=64k") else {
        return;
    };
    rx.start();
    hub.wait_registered(&["rx"]);
    let big = post_batch(&hub, "rx", &[100_000], "normal");
    wait_until(TIMEOUT, "the big message is said not to fit", || {
        rx.logs.contains(&format!("message {} (", big[0]))
    });
    let said = rx
        .logs
        .lines()
        .iter()
        .find(|l| l.contains("does not fit"))
        .cloned();
    let said = said.expect("a does-not-fit line");
    assert!(
        said.contains("bytes") && said.contains("free_bytes"),
        "the line gives the size and the free space: {said}"
    );

    // Sent later, but more urgent: the hub hands it out first, and it fits.
    let urgent = post_batch(&hub, "rx", &[500], "high");
    wait_until(
        TIMEOUT,
        "the urgent message arrives past the big one",
        || rx.has(&urgent[0]),
    );
    let later = post_batch(&hub, "rx", &[500], "normal");
    // The urgent message's pull retried the big one too: still one line for it.
    let lines = rx
        .logs
        .lines()
        .iter()
        .filter(|l| l.contains("does not fit"))
        .count();
    assert_eq!(lines, 1, "the message that does not fit is logged once");
    assert!(!rx.has(&big[0]));

    tmpfs.remount("size=1m");
    wait_until(
        LONG_TIMEOUT,
        "everything arrives once the inbox grows",
        || rx.has(&big[0]) && rx.has(&later[0]),
    );
    for id in big.iter().chain(&urgent).chain(&later) {
        assert_eq!(rx.inbox_count(id), 1, "{id} once");
    }
    wait_until(TIMEOUT, "the hub's queue drains", || {
        hub.queue_files("rx").is_empty()
    });
}

#[test]
fn an_inbox_without_free_inodes_takes_what_fits_and_recovers() {
    let hub = Hub::start();
    let mut rx = Agent::new(&hub.url(), "rx");
    // Room for bytes, not for files: the root directory takes one inode of the eight.
    let Some(_tmpfs) = Tmpfs::mount("shortages", &rx.dir("inbox"), "size=8m,nr_inodes=8") else {
        return;
    };
    rx.start();
    hub.wait_registered(&["rx"]);
    takes_what_fits_then_the_rest_as_consumed(&hub, &rx, &[400; 30], "inodes", "no free inodes");
}

#[test]
fn a_read_only_inbox_holds_everything_at_the_hub_until_it_is_writable_again() {
    let hub = Hub::start();
    let mut rx = Agent::new(&hub.url(), "rx");
    let Some(bind) = Bind::mount("shortages", &rx.dir("inbox")) else {
        return;
    };
    rx.start();
    hub.wait_registered(&["rx"]);
    let first = post_batch(&hub, "rx", &[300], "normal");
    wait_until(TIMEOUT, "a message before", || rx.has(&first[0]));

    bind.read_only();
    let ids = post_batch(&hub, "rx", &[300; 5], "normal");
    wait_until(TIMEOUT, "the receiver reports the read-only inbox", || {
        short_of(&rx) == ["read_only"]
    });
    assert!(rx.logs.contains("read-only"), "logged");
    assert_eq!(hub.queue_files("rx").len(), 5, "nothing acknowledged");

    bind.read_write();
    wait_until(LONG_TIMEOUT, "everything arrives once writable", || {
        ids.iter().all(|id| rx.has(id))
    });
    for id in first.iter().chain(&ids) {
        assert_eq!(rx.inbox_count(id), 1, "{id} once");
    }
    wait_until(TIMEOUT, "the shortage is over", || short_of(&rx).is_empty());
    drop(rx);
}

#[test]
fn a_sender_batch_bigger_than_the_hub_free_space_is_stored_in_part() {
    let mut hub = Hub::start();
    // The hub's data dir becomes a 2 MiB tmpfs: stop it, mount, start it again.
    hub.kill9();
    let Some(tmpfs) = Tmpfs::mount("shortages", hub.data_dir(), "size=2m") else {
        return;
    };
    hub.restart();
    let mut tx = Agent::new(&hub.url(), "tx").with_env("MESYNC_HTTP_TIMEOUT", "2");
    tx.start();
    hub.wait_registered(&["tx"]);

    // Leave about 150 KiB free, then drop 30 messages of 20 KB for a host that is not
    // running (so they stay at the hub): one batch, about five times the free space.
    let filler = tmpfs.fill();
    let room = 150 * 1024;
    let len = fs::metadata(&filler).expect("filler").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .and_then(|f| f.set_len(len.saturating_sub(room)))
        .expect("free some room");
    let outbox = tx.dir("outbox");
    let mut ids = Vec::new();
    for i in 0..30 {
        let msg = message(
            "short.test",
            "tx",
            Some("late"),
            "normal",
            payload_of(20_000, i),
        );
        ids.push(id_of(&msg));
        write_atomic(&outbox, &file_name_for(&msg), msg.to_string().as_bytes());
    }
    wait_until(
        TIMEOUT,
        "the hub stores what fits and refuses the rest",
        || tx.logs.contains("507") && !hub.queue_files("late").is_empty(),
    );
    let stored = hub.queue_files("late").len();
    assert!(stored < 30, "{stored} of 30 stored with 150 KiB free");
    assert_eq!(
        hub.queue_files("late").len() + tx.files("outbox").len(),
        30,
        "each message is stored at the hub or waiting in the outbox"
    );
    let health = hub.get("/healthz");
    assert_eq!(health.status, 503, "healthz when short: {}", health.text());
    assert!(health.text().contains("full"), "{}", health.text());
    assert_eq!(
        metric(&hub, "mesync_store_short{resource=\"space\"}"),
        Some(1.0)
    );
    assert!(
        metric(
            &hub,
            "mesync_messages_refused_total{reason=\"storage_full\"}"
        ) > Some(0.0)
    );
    assert!(
        hub.logs.contains("no free disk space"),
        "logged once, naming it"
    );
    assert!(
        tx.files("failed").is_empty(),
        "a full disk is not a permanent refusal"
    );

    fs::remove_file(&filler).expect("free the space");
    wait_until(LONG_TIMEOUT, "the outbox drains once space returns", || {
        tx.files("outbox").is_empty()
    });
    let mut late = Agent::new(&hub.url(), "late");
    late.start();
    wait_until(LONG_TIMEOUT, "everything arrives", || {
        ids.iter().all(|id| late.has(id))
    });
    for id in &ids {
        assert_eq!(late.inbox_count(id), 1, "{id} once");
    }
    wait_until(TIMEOUT, "healthz recovers", || {
        hub.get("/healthz").status == 200
    });
    assert_eq!(
        metric(&hub, "mesync_store_short{resource=\"space\"}"),
        Some(0.0)
    );
    drop((tx, late, hub));
}

#[test]
fn a_read_only_hub_data_dir_refuses_with_503_and_recovers_when_writable() {
    let mut hub = Hub::start();
    hub.kill9();
    let Some(bind) = Bind::mount("shortages", hub.data_dir()) else {
        return;
    };
    hub.restart();
    let mut rx = Agent::new(&hub.url(), "rx");
    let mut tx = Agent::new(&hub.url(), "tx").with_env("MESYNC_HTTP_TIMEOUT", "2");
    rx.start();
    tx.start();
    hub.wait_registered(&["rx", "tx"]);

    bind.read_only();
    let ids: Vec<String> = (0..3)
        .map(|i| {
            tx.send(
                "short.test",
                &json!({"i": i}).to_string(),
                &["--target", "rx"],
            )
        })
        .collect();
    wait_until(TIMEOUT, "the hub refuses with 503", || {
        tx.logs.contains("503")
    });
    let health = hub.get("/healthz");
    assert_eq!(health.status, 503, "{}", health.text());
    assert!(health.text().contains("read-only"), "{}", health.text());
    assert_eq!(
        metric(&hub, "mesync_store_short{resource=\"read_only\"}"),
        Some(1.0)
    );
    assert_eq!(
        tx.files("outbox").len(),
        3,
        "the messages wait in the outbox"
    );
    assert!(tx.files("failed").is_empty());

    bind.read_write();
    wait_until(LONG_TIMEOUT, "everything arrives once writable", || {
        ids.iter().all(|id| rx.has(id))
    });
    for id in &ids {
        assert_eq!(rx.inbox_count(id), 1, "{id} once");
    }
    wait_until(TIMEOUT, "healthz recovers", || {
        hub.get("/healthz").status == 200
    });
    assert_eq!(
        metric(&hub, "mesync_store_short{resource=\"read_only\"}"),
        Some(0.0)
    );
    drop((rx, tx, hub));
}

#[test]
fn a_hub_short_of_file_descriptors_stores_big_batches_and_recovers() {
    if !have_prlimit("shortages") {
        return;
    }
    let hub = Hub::start();
    let mut rx = Agent::new(&hub.url(), "rx");
    let mut tx = Agent::new(&hub.url(), "tx").with_env("MESYNC_HTTP_TIMEOUT", "2");
    rx.start();
    tx.start();
    hub.wait_registered(&["rx", "tx"]);
    let first = tx.send("short.test", "{}", &["--target", "rx"]);
    wait_until(TIMEOUT, "a message before", || rx.has(&first));
    let pid = hub.pid().expect("hub runs");

    // A few descriptors to spare: a commit of hundreds of messages must fit in them.
    prlimit_nofile(pid, open_fds(pid) + 6);
    let ids = drop_complete(&tx, "rx", 300, 300);
    wait_until(
        LONG_TIMEOUT,
        "a big batch passes with few descriptors",
        || ids.iter().all(|id| rx.has(id)),
    );

    // None to spare: refused for now, kept in the outbox, logged.
    prlimit_nofile(pid, open_fds(pid));
    let late: Vec<String> = (0..3)
        .map(|i| {
            tx.send(
                "short.test",
                &json!({"late": i}).to_string(),
                &["--target", "rx"],
            )
        })
        .collect();
    wait_until(TIMEOUT, "the hub says it is out of descriptors", || {
        hub.logs.contains("too many open files")
    });
    assert!(tx.files("failed").is_empty());
    prlimit_nofile(pid, usize::MAX);
    wait_until(
        LONG_TIMEOUT,
        "everything arrives once the limit is raised",
        || late.iter().all(|id| rx.has(id)),
    );
    for id in ids.iter().chain(&late).chain(std::iter::once(&first)) {
        assert_eq!(rx.inbox_count(id), 1, "{id} once");
    }
}

#[test]
fn a_receiver_short_of_file_descriptors_writes_big_batches_and_recovers() {
    if !have_prlimit("shortages") {
        return;
    }
    let hub = Hub::start();
    let mut rx = Agent::new(&hub.url(), "rx");
    rx.start();
    hub.wait_registered(&["rx"]);
    let pid = rx.pid().expect("rx runs");
    wait_until(TIMEOUT, "the receiver is polling", || {
        metric(&hub, "mesync_long_polls_open") == Some(1.0)
    });

    // A few descriptors to spare: a pull of hundreds of messages must be written with them.
    prlimit_nofile(pid, open_fds(pid) + 6);
    let ids = post_batch(&hub, "rx", &[300; 300], "normal");
    wait_until(
        LONG_TIMEOUT,
        "a big batch is written with few descriptors",
        || ids.iter().all(|id| rx.has(id)),
    );

    prlimit_nofile(pid, open_fds(pid));
    let late = post_batch(&hub, "rx", &[300; 3], "normal");
    wait_until(
        TIMEOUT,
        "mesync status says the receiver is out of descriptors",
        || short_of(&rx) == ["open_files"],
    );
    assert_eq!(hub.queue_files("rx").len(), 3, "nothing acknowledged");
    prlimit_nofile(pid, usize::MAX);
    wait_until(
        LONG_TIMEOUT,
        "everything arrives once the limit is raised",
        || late.iter().all(|id| rx.has(id)),
    );
    for id in ids.iter().chain(&late) {
        assert_eq!(rx.inbox_count(id), 1, "{id} once");
    }
    wait_until(TIMEOUT, "the shortage is over", || short_of(&rx).is_empty());
}

#[test]
fn a_sender_with_a_full_disk_sends_what_it_can_and_the_rest_once_space_returns() {
    let hub = Hub::start();
    let mut rx = Agent::new(&hub.url(), "rx");
    let mut tx = Agent::new(&hub.url(), "tx");
    // The sender's whole base dir on a small tmpfs.
    let Some(tmpfs) = Tmpfs::mount("shortages", tx.base(), "size=1m") else {
        return;
    };
    for dir in AGENT_DIRS {
        fs::create_dir_all(tx.dir(dir)).expect("agent dir");
    }
    rx.start();
    let outbox = tx.dir("outbox");
    let complete: Vec<String> = (0..3)
        .map(|i| {
            let msg = message("short.test", "tx", Some("rx"), "normal", json!({"i": i}));
            write_atomic(&outbox, &file_name_for(&msg), msg.to_string().as_bytes());
            id_of(&msg)
        })
        .collect();
    // One to complete (it needs its id written to disk before it may go), one invalid
    // (it needs a reason written into failed/).
    write_atomic(
        &outbox,
        "by-hand.json",
        br#"{"type":"short.test","target":"rx","payload":{"hand":1}}"#,
    );
    write_atomic(&outbox, "broken.json", b"{not json");
    let filler = tmpfs.fill();
    tx.start();

    wait_until(TIMEOUT, "the complete messages go out", || {
        complete.iter().all(|id| rx.has(id))
    });
    wait_until(TIMEOUT, "mesync status shows the shortage", || {
        short_of(&tx).contains(&"space".to_string())
    });
    let waiting = tx.files("outbox");
    assert!(
        waiting.contains(&"by-hand.json".to_string())
            && waiting.contains(&"broken.json".to_string()),
        "the files that need a write wait: {waiting:?}"
    );
    assert!(
        tx.files("failed").is_empty(),
        "nothing goes to failed/ for lack of space"
    );

    fs::remove_file(&filler).expect("free the space");
    wait_until(LONG_TIMEOUT, "the rest goes once space returns", || {
        tx.files("outbox").is_empty() && rx.files("inbox").len() == 4
    });
    assert_eq!(
        tx.files("failed").len(),
        2,
        "the broken file and its reason"
    );
    for id in &complete {
        assert_eq!(rx.inbox_count(id), 1, "{id} once");
    }
    wait_until(TIMEOUT, "the shortage is over", || short_of(&tx).is_empty());
    drop((tx, tmpfs));
}

#[test]
fn a_hook_that_cannot_start_for_want_of_descriptors_runs_once_they_return() {
    if !have_prlimit("shortages") {
        return;
    }
    let hub = Hub::start();
    let mut rx = Agent::new(&hub.url(), "rx");
    rx.install_recorder("short.test");
    rx.start();
    hub.wait_registered(&["rx"]);
    let pid = rx.pid().expect("rx runs");
    wait_until(TIMEOUT, "the receiver is polling", || {
        metric(&hub, "mesync_long_polls_open") == Some(1.0)
    });
    // Enough to write the inbox (a file, the ledger), not to start a hook (three pipes).
    prlimit_nofile(pid, open_fds(pid) + 3);
    let ids = post_batch(&hub, "rx", &[300], "normal");
    wait_until(TIMEOUT, "delivered, but the hook cannot start", || {
        rx.has(&ids[0]) && short_of(&rx) == ["open_files"]
    });
    assert!(rx.hook_runs().is_empty(), "not run yet");
    prlimit_nofile(pid, usize::MAX);
    wait_until(
        LONG_TIMEOUT,
        "the hook runs once descriptors return",
        || rx.hook_runs() == ids,
    );
    let listed = rx.list_json("inbox");
    assert!(
        listed
            .iter()
            .all(|m| !m.to_string().contains("not started")),
        "a shortage is not recorded as the hook's outcome: {listed:?}"
    );
    wait_until(TIMEOUT, "the shortage is over", || short_of(&rx).is_empty());
}

#[test]
fn an_inbox_over_its_quota_takes_what_fits_and_the_rest_as_it_is_consumed() {
    let hub = Hub::start();
    let mut rx = Agent::new(&hub.url(), "rx");
    let Some(_quota) = QuotaFs::mount("shortages", &rx.dir("inbox"), 60_000) else {
        return;
    };
    rx.start();
    hub.wait_registered(&["rx"]);
    takes_what_fits_then_the_rest_as_consumed(&hub, &rx, &[5_000; 20], "quota", "quota");
}

#[test]
fn a_hub_over_its_quota_stores_what_fits_and_recovers() {
    let mut hub = Hub::start();
    hub.kill9();
    let Some(_quota) = QuotaFs::mount("shortages", hub.data_dir(), 200_000) else {
        return;
    };
    hub.restart();
    let mut tx = Agent::new(&hub.url(), "tx").with_env("MESYNC_HTTP_TIMEOUT", "2");
    tx.start();
    hub.wait_registered(&["tx"]);
    let outbox = tx.dir("outbox");
    let mut ids = Vec::new();
    for i in 0..30 {
        let msg = message(
            "short.test",
            "tx",
            Some("late"),
            "normal",
            payload_of(20_000, i),
        );
        ids.push(id_of(&msg));
        write_atomic(&outbox, &file_name_for(&msg), msg.to_string().as_bytes());
    }
    wait_until(TIMEOUT, "the hub stores what fits in its quota", || {
        tx.logs.contains("507") && !hub.queue_files("late").is_empty()
    });
    assert!(hub.queue_files("late").len() < 30);
    assert_eq!(
        metric(&hub, "mesync_store_short{resource=\"quota\"}"),
        Some(1.0)
    );
    assert!(hub.logs.contains("quota"), "logged");

    // The receiver takes what is stored; acked files make room for the rest.
    let mut late = Agent::new(&hub.url(), "late");
    late.start();
    wait_until(LONG_TIMEOUT, "everything arrives", || {
        ids.iter().all(|id| late.has(id))
    });
    for id in &ids {
        assert_eq!(late.inbox_count(id), 1, "{id} once");
    }
    assert!(tx.files("failed").is_empty());
    drop((tx, late, hub));
}
