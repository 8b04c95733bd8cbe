//! Network partitions between agents and the hub, through a fault-injecting proxy
//! (`support/proxy.rs`): a link that goes silent (a half-open partition), a link that
//! resets, a slow link, and a hub killed with SIGKILL while a long-poll is live or a batch
//! is pulled but not acknowledged. In every case nothing is given up (no `failed/`), the
//! hub keeps what it holds, and once the link is back every message reaches its inbox and
//! its hook exactly once, without restarting anything.
//!
//! Agents run with `MESYNC_HTTP_TIMEOUT=1` (a long-poll waits 3 s, a silent connection is
//! given up after 4 s) and `MESYNC_POLL_INTERVAL=1`; partitions last a few seconds, so the
//! agents' backoff (0.5 s doubling) stays short.

#[path = "support/proxy.rs"]
mod proxy;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use proxy::{Mode, Proxy};
use serde_json::json;
use support::*;

/// The type of every test message; receivers record its hook runs.
const TYPE: &str = "part.test";

/// How long a healed link may take to deliver a backlog when the agent's pull was cut
/// silently: 4 s to give up the silent connection, plus a short backoff, with a margin
/// for a loaded machine.
const HEAL_DEADLINE: Duration = Duration::from_secs(20);

/// An agent with short HTTP timeouts and scans, so partitions are noticed quickly.
fn agent(url: &str, host: &str) -> Agent {
    Agent::new(url, host)
        .with_env("MESYNC_HTTP_TIMEOUT", "1")
        .with_env("MESYNC_POLL_INTERVAL", "1")
}

/// A receiving agent whose hook records every run of a [`TYPE`] message.
fn receiver(url: &str, host: &str) -> Agent {
    let rx = agent(url, host);
    rx.install_recorder(TYPE);
    rx
}

/// The log lines of `agent` from line `from` on.
fn lines_since(agent: &Agent, from: usize) -> Vec<String> {
    agent.logs.lines().into_iter().skip(from).collect()
}

/// Whether a log line says the hub could not be reached or did not answer in time.
fn says_unreachable(line: &str) -> bool {
    let l = line.to_lowercase();
    ["unreachable", "no answer", "timed out", "timeout"]
        .iter()
        .any(|w| l.contains(w))
}

/// The lines from `from` on where the agent reports a failed send that keeps the messages
/// in `outbox/` because the hub is unreachable.
fn send_failures(agent: &Agent, from: usize) -> Vec<String> {
    lines_since(agent, from)
        .into_iter()
        .filter(|l| l.contains("outbox") && says_unreachable(l))
        .collect()
}

/// The lines from `from` on where the agent reports a failed pull.
fn pull_failures(agent: &Agent, from: usize) -> Vec<String> {
    lines_since(agent, from)
        .into_iter()
        .filter(|l| l.to_lowercase().contains("pull") && says_unreachable(l))
        .collect()
}

/// `mesync send` of `count` messages for `target`, of every priority; their ids.
fn send_batch(from: &Agent, target: &str, count: usize, tag: &str) -> Vec<String> {
    (0..count)
        .map(|i| {
            let priority = ["high", "normal", "low"][i % 3];
            let payload = json!({ "tag": tag, "i": i }).to_string();
            from.send(
                TYPE,
                &payload,
                &["--target", target, "--priority", priority],
            )
        })
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Checks that `sender` kept `ids` in `outbox/`: none sent, none failed, none at the hub.
fn assert_kept_in_outbox(sender: &Agent, hub: &Hub, target: &str, ids: &[String]) {
    let outbox: BTreeSet<String> = sender.ids("outbox").into_iter().collect();
    let missing: Vec<&String> = ids.iter().filter(|id| !outbox.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "messages left {}'s outbox/ during the partition: {missing:?}; outbox: {:?}, sent: {:?}",
        sender.host_id,
        sender.files("outbox"),
        sender.files("sent")
    );
    assert!(
        sender.files("failed").is_empty(),
        "an unreachable hub is not a failure, yet failed/ holds {:?}",
        sender.files("failed")
    );
    let queued: BTreeSet<String> = hub.queue_ids(target).into_iter().collect();
    assert!(
        ids.iter().all(|id| !queued.contains(id)),
        "the hub queued messages it cannot have received: {queued:?}"
    );
}

/// Waits until `rx` has every id of `ids` in its inbox and the hub's queue for it is empty;
/// then sends a low-priority barrier through the hub (it is delivered after anything
/// offered again) and checks that the inbox holds no id twice and that the hook ran exactly
/// once for each of `ids`. `deadline` bounds the first wait.
fn assert_delivered_once(hub: &Hub, rx: &Agent, ids: &[String], deadline: Duration) {
    wait_until(
        deadline,
        &format!("all {} messages in {}'s inbox", ids.len(), rx.host_id),
        || {
            let have: BTreeSet<String> = rx.ids("inbox").into_iter().collect();
            ids.iter().all(|id| have.contains(id))
        },
    );
    wait_until(
        TIMEOUT,
        "the hub's queue for the receiver is drained",
        || hub.queue_files(&rx.host_id).is_empty(),
    );
    let barrier = message(TYPE, "tester", Some(&rx.host_id), "low", json!("barrier"));
    let barrier_id = id_of(&barrier);
    hub.post_message(&barrier);
    wait_until(TIMEOUT, "the barrier's hook has run", || {
        rx.hook_runs().contains(&barrier_id)
    });

    let inbox = rx.ids("inbox");
    let unique: BTreeSet<&String> = inbox.iter().collect();
    assert_eq!(
        unique.len(),
        inbox.len(),
        "an id is in the inbox twice: {inbox:?}"
    );
    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    for id in rx.hook_runs() {
        *runs.entry(id).or_default() += 1;
    }
    for id in ids.iter().chain(std::iter::once(&barrier_id)) {
        assert_eq!(
            runs.get(id).copied().unwrap_or(0),
            1,
            "the hook of {id} must run exactly once; runs: {runs:?}"
        );
    }
    assert!(
        runs.values().all(|&n| n == 1),
        "a hook ran more than once: {runs:?}"
    );
}

/// Waits until the sender has moved every id of `ids` to `sent/`, with nothing failed.
fn assert_all_sent(sender: &Agent, ids: &[String]) {
    wait_until(TIMEOUT, "the sender's outbox is empty", || {
        sender.files("outbox").is_empty()
    });
    let sent: BTreeSet<String> = sender.ids("sent").into_iter().collect();
    assert!(
        ids.iter().all(|id| sent.contains(id)),
        "sent/ lacks messages: {:?}",
        sender.ids("sent")
    );
    assert!(
        sender.files("failed").is_empty(),
        "failed/: {:?}",
        sender.files("failed")
    );
}

/// Sends one message from `from` to `to` and waits for it: the path works end to end.
fn warm_up(from: &Agent, to: &Agent) -> String {
    let id = from.send(TYPE, r#"{"warm": true}"#, &["--target", &to.host_id]);
    wait_until(TIMEOUT, "the warm-up message arrives", || to.has(&id));
    wait_until(
        TIMEOUT,
        "the warm-up message is in the sender's sent/",
        || from.ids("sent").contains(&id),
    );
    id
}

// ---------------------------------------------------------------------------------------
// The proxy itself
// ---------------------------------------------------------------------------------------

/// Writes one `GET /healthz` on `stream` (kept alive) and reads the answer's status line.
fn healthz_on(stream: &mut TcpStream, timeout: Duration) -> std::io::Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: proxy-test\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "connection closed (FIN)",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Ok(text.lines().next().unwrap_or_default().to_string());
            }
        }
    }
}

fn is_silence(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

#[test]
fn proxy_modes_do_what_the_partition_tests_rely_on() {
    let hub = Hub::start();
    let proxy = Proxy::start(hub.addr());
    let running = proxy.running_threads();
    let addr = proxy.addr();
    let get = |timeout| http_request(&addr, "GET", "/healthz", None, timeout);

    // Pass, on a kept-alive connection and on a new one.
    let mut kept = TcpStream::connect(proxy.addr()).expect("connect to the proxy");
    let status = healthz_on(&mut kept, TIMEOUT).expect("healthz through the proxy");
    assert!(status.contains(" 200"), "status line: {status}");
    assert_eq!(get(TIMEOUT).expect("pass").status, 200);

    // Blackhole: the open connection goes silent (no answer, no FIN, no RST), and so does
    // a new one.
    proxy.set_mode(Mode::Blackhole);
    let err = healthz_on(&mut kept, Duration::from_millis(1500))
        .expect_err("a black-holed connection must not answer");
    assert!(is_silence(&err), "expected silence, got {err:?}");
    let err = get(Duration::from_millis(1500)).expect_err("a new connection in a black hole");
    assert!(is_silence(&err), "expected silence, got {err:?}");
    assert!(proxy.dropped_bytes() > 0);

    // Back to Pass: the connection cut by the partition stays dead, new ones work.
    proxy.set_mode(Mode::Pass);
    let err = healthz_on(&mut kept, Duration::from_millis(1500))
        .expect_err("a connection cut by a black hole never comes back");
    assert!(is_silence(&err), "expected silence, got {err:?}");
    assert_eq!(get(TIMEOUT).expect("pass after the hole").status, 200);

    // Reset: the open connection is reset (RST, not FIN), and so is a new one.
    let mut open = TcpStream::connect(proxy.addr()).expect("connect to the proxy");
    healthz_on(&mut open, TIMEOUT).expect("healthz before the reset");
    proxy.set_mode(Mode::Reset);
    let resets_before = proxy.resets();
    let mut byte = [0u8; 1];
    open.set_read_timeout(Some(TIMEOUT)).unwrap();
    let err = open
        .read(&mut byte)
        .expect_err("an open connection must be reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err:?}");
    // Read only: a write racing the RST could take the error and leave the read an EOF.
    let mut fresh = TcpStream::connect(proxy.addr()).expect("connect to the proxy");
    fresh.set_read_timeout(Some(TIMEOUT)).unwrap();
    let err = fresh
        .read(&mut byte)
        .expect_err("a new connection must be reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err:?}");
    assert!(proxy.resets() > resets_before);
    let err = kept
        .read(&mut byte)
        .expect_err("the black-holed one is reset too");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err:?}");

    // Delay: answers come, at least one extra latency each way later.
    proxy.set_mode(Mode::Delay(Duration::from_millis(300)));
    let start = Instant::now();
    assert_eq!(get(TIMEOUT).expect("delayed").status, 200);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(600),
        "round trip took {took:?}"
    );

    assert!(running.load(Ordering::SeqCst) > 0);
    drop(proxy);
    assert_eq!(
        running.load(Ordering::SeqCst),
        0,
        "every thread of the proxy ends when it is dropped"
    );
}

// ---------------------------------------------------------------------------------------
// Partitions
// ---------------------------------------------------------------------------------------

#[test]
fn partitioned_sender_keeps_its_outbox_and_delivers_once_after_heal() {
    let hub = Hub::start();
    let proxy = Proxy::start(hub.addr());
    let mut alpha = agent(&proxy.url(), "alpha");
    let mut beta = receiver(&hub.url(), "beta");
    let mut gamma = agent(&hub.url(), "gamma");
    alpha.start();
    beta.start();
    gamma.start();
    hub.wait_registered(&["alpha", "beta", "gamma"]);
    let warm = warm_up(&alpha, &beta);

    let mark = alpha.logs.len();
    proxy.set_mode(Mode::Blackhole);
    let ids = send_batch(&alpha, "beta", 12, "partitioned");

    // The hub keeps working for the others meanwhile.
    let other = gamma.send(TYPE, r#"{"from": "gamma"}"#, &["--target", "beta"]);
    wait_until(
        TIMEOUT,
        "gamma's message reaches beta during the partition",
        || beta.has(&other),
    );

    // Two sends given up on a timeout: the messages went through at least one retry.
    wait_until(
        TIMEOUT,
        "alpha logs two failed sends, the hub unreachable (no answer in time)",
        || send_failures(&alpha, mark).len() >= 2 || !alpha.files("failed").is_empty(),
    );
    assert!(alpha.is_running(), "the agent must survive a partition");
    assert_kept_in_outbox(&alpha, &hub, "beta", &ids);
    assert!(ids.iter().all(|id| !beta.has(id)));
    assert!(
        proxy.dropped_bytes() > 0,
        "nothing went into the black hole"
    );

    proxy.set_mode(Mode::Pass);
    let mut all = ids.clone();
    all.extend([warm, other]);
    assert_delivered_once(&hub, &beta, &all, LONG_TIMEOUT);
    assert_all_sent(&alpha, &ids);
}

#[test]
fn partitioned_receiver_hub_keeps_its_queue_and_delivers_once_after_heal() {
    let hub = Hub::start();
    let proxy = Proxy::start(hub.addr());
    let mut alpha = agent(&hub.url(), "alpha");
    let mut beta = receiver(&proxy.url(), "beta");
    alpha.start();
    beta.start();
    hub.wait_registered(&["alpha", "beta"]);
    let warm = warm_up(&alpha, &beta);

    // Cut the link under beta's long-poll in flight.
    let mark = beta.logs.len();
    proxy.set_mode(Mode::Blackhole);
    let ids = send_batch(&alpha, "beta", 12, "partitioned");
    assert_all_sent(&alpha, &ids);
    wait_until(TIMEOUT, "the hub queues every message for beta", || {
        let queued: BTreeSet<String> = hub.queue_ids("beta").into_iter().collect();
        ids.iter().all(|id| queued.contains(id))
    });

    // The silent long-poll is given up on a timeout, and the hub keeps the messages.
    wait_until(
        TIMEOUT,
        "beta logs a pull given up (hub unreachable, no answer in time)",
        || !pull_failures(&beta, mark).is_empty(),
    );
    assert!(beta.is_running(), "the agent must survive a partition");
    let queued: BTreeSet<String> = hub.queue_ids("beta").into_iter().collect();
    assert!(
        ids.iter().all(|id| queued.contains(id)),
        "the hub must keep beta's queue while beta is cut off: {queued:?}"
    );
    assert!(
        ids.iter().all(|id| !beta.has(id)),
        "nothing can have reached beta through the black hole"
    );

    proxy.set_mode(Mode::Pass);
    let mut all = ids.clone();
    all.push(warm);
    assert_delivered_once(&hub, &beta, &all, HEAL_DEADLINE);
    assert!(beta.is_running());
}

#[test]
fn a_long_poll_cut_silently_is_given_up_on_a_timeout_without_restart() {
    let hub = Hub::start();
    let proxy = Proxy::start(hub.addr());
    let mut alpha = agent(&hub.url(), "alpha");
    let mut beta = receiver(&proxy.url(), "beta");
    alpha.start();
    beta.start();
    hub.wait_registered(&["alpha", "beta"]);
    let warm = warm_up(&alpha, &beta);
    // Acknowledged: beta is back in a long-poll (or about to be).
    wait_until(TIMEOUT, "beta acknowledges the warm-up", || {
        hub.queue_files("beta").is_empty()
    });

    // A short partition: the hub's answer to the long-poll in flight (empty, once its wait
    // is over) falls into the hole, and the connection stays open and silent for good.
    proxy.set_mode(Mode::Blackhole);
    wait_until(
        TIMEOUT,
        "the hub's answer to beta's long-poll falls into the hole",
        || proxy.dropped_bytes() > 0,
    );
    proxy.set_mode(Mode::Pass);

    // Only the agent's own timeout can get it out of the dead connection.
    let healed = Instant::now();
    let ids = send_batch(&alpha, "beta", 3, "after-heal");
    let mut all = ids.clone();
    all.push(warm);
    assert_delivered_once(&hub, &beta, &all, HEAL_DEADLINE);
    eprintln!("delivered {:?} after the heal", healed.elapsed());
    assert!(beta.is_running(), "the agent was not restarted");
}

#[test]
fn reset_connections_are_retried_with_backoff_and_deliver_once() {
    let hub = Hub::start();
    let proxy = Proxy::start(hub.addr());
    // Both ends behind the proxy.
    let mut alpha = agent(&proxy.url(), "alpha");
    let mut beta = receiver(&proxy.url(), "beta");
    alpha.start();
    beta.start();
    hub.wait_registered(&["alpha", "beta"]);
    let warm = warm_up(&alpha, &beta);

    let mark = alpha.logs.len();
    let resets_before = proxy.resets();
    proxy.set_mode(Mode::Reset);
    let ids = send_batch(&alpha, "beta", 12, "reset");
    wait_until(
        TIMEOUT,
        "alpha logs four failed sends (connection reset, hub unreachable)",
        || send_failures(&alpha, mark).len() >= 4 || !alpha.files("failed").is_empty(),
    );
    assert!(alpha.is_running() && beta.is_running());
    assert_kept_in_outbox(&alpha, &hub, "beta", &ids);
    assert!(proxy.resets() > resets_before, "no connection was reset");

    // Backoff: the attempts space out (0.5 s, 1 s, 2 s, each ±20 %), rather than spin.
    let times: Vec<chrono::DateTime<chrono::FixedOffset>> = send_failures(&alpha, mark)
        .iter()
        .filter_map(|l| chrono::DateTime::parse_from_rfc3339(l.split_whitespace().next()?).ok())
        .collect();
    assert!(
        times.len() >= 4,
        "cannot read the times of the failed sends: {:?}",
        send_failures(&alpha, mark)
    );
    let first_gap = times[1] - times[0];
    let third_gap = times[3] - times[2];
    assert!(
        third_gap > first_gap,
        "retries must back off: gaps {first_gap} then {third_gap}; {:?}",
        send_failures(&alpha, mark)
    );

    proxy.set_mode(Mode::Pass);
    let mut all = ids.clone();
    all.push(warm);
    assert_delivered_once(&hub, &beta, &all, LONG_TIMEOUT);
    assert_all_sent(&alpha, &ids);
}

#[test]
fn a_slow_link_still_delivers_once() {
    let hub = Hub::start();
    let proxy = Proxy::start(hub.addr());
    let latency = Duration::from_millis(200);
    proxy.set_mode(Mode::Delay(latency));
    let mut alpha = agent(&proxy.url(), "alpha");
    let mut beta = receiver(&proxy.url(), "beta");
    alpha.start();
    beta.start();
    hub.wait_registered(&["alpha", "beta"]);

    // One at a time: each crosses the slow link twice (to the hub, then to beta).
    let mut ids = Vec::new();
    for i in 0..3 {
        let payload = json!({ "one": i }).to_string();
        let id = alpha.send(TYPE, &payload, &["--target", "beta"]);
        let sent = Instant::now();
        wait_until(TIMEOUT, "a message crosses the slow link", || beta.has(&id));
        let took = sent.elapsed();
        assert!(
            took >= latency + latency / 2,
            "delivered in {took:?}: the messages do not go through the delayed proxy"
        );
        ids.push(id);
    }
    // Then a burst.
    ids.extend(send_batch(&alpha, "beta", 30, "burst"));
    assert_delivered_once(&hub, &beta, &ids, LONG_TIMEOUT);
    assert_all_sent(&alpha, &ids);
}

// ---------------------------------------------------------------------------------------
// Hub restarts
// ---------------------------------------------------------------------------------------

#[test]
fn a_batch_pulled_but_not_acknowledged_survives_a_hub_kill9() {
    let mut hub = Hub::start();
    let mut ids = Vec::new();
    for i in 0..20 {
        let priority = ["high", "normal", "low"][i % 3];
        let msg = message(TYPE, "tester", Some("late"), priority, json!({ "i": i }));
        hub.post_message(&msg);
        ids.push(id_of(&msg));
    }

    // Someone pulls the batch for the offline host and never acknowledges it.
    let pulled = hub.get("/v1/messages?host=late&wait=0");
    assert_eq!(pulled.status, 200, "pull: {}", pulled.text());
    let pulled_ids: Vec<String> = pulled.json()["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(sorted(pulled_ids), sorted(ids.clone()), "the pulled batch");
    assert_eq!(
        sorted(hub.queue_ids("late")),
        sorted(ids.clone()),
        "a pulled, unacknowledged batch stays queued"
    );

    hub.kill9();
    hub.restart();
    assert_eq!(
        sorted(hub.queue_ids("late")),
        sorted(ids.clone()),
        "queues/late/ after the restart"
    );

    let mut late = receiver(&hub.url(), "late");
    late.start();
    assert_delivered_once(&hub, &late, &ids, LONG_TIMEOUT);
}

#[test]
fn a_live_long_poll_survives_a_hub_kill9_and_restart() {
    let mut hub = Hub::start();
    let mut alpha = agent(&hub.url(), "alpha");
    let mut beta = receiver(&hub.url(), "beta");
    alpha.start();
    beta.start();
    hub.wait_registered(&["alpha", "beta"]);
    let before = send_batch(&alpha, "beta", 5, "before");
    for id in &before {
        wait_until(TIMEOUT, "a message before the restart arrives", || {
            beta.has(id)
        });
    }
    // Everything acknowledged: beta is in its next long-poll when the hub dies.
    wait_until(TIMEOUT, "beta acknowledges what it has", || {
        hub.queue_files("beta").is_empty()
    });

    hub.kill9();
    hub.restart();
    let after = send_batch(&alpha, "beta", 10, "after");
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    assert_delivered_once(&hub, &beta, &all, LONG_TIMEOUT);
    assert_all_sent(&alpha, &all);
    assert!(
        beta.is_running() && alpha.is_running(),
        "the agents were not restarted"
    );
}

#[test]
fn an_ack_lost_to_a_hub_kill9_brings_the_batch_again_and_it_is_not_written_twice() {
    let mut hub = Hub::start();
    // The slow link holds beta's ack long enough for the hub to die before it arrives.
    let proxy = Proxy::start(hub.addr());
    proxy.set_mode(Mode::Delay(Duration::from_millis(400)));
    let mut beta = receiver(&proxy.url(), "beta");
    beta.start();
    hub.wait_registered(&["beta"]);

    // Kill the hub as soon as beta has written a message: its ack is still on the wire.
    // Whether it got there is read from the queue of the dead hub; on a loaded machine the
    // ack may win the race, then try again with the next message.
    let mut ids = Vec::new();
    let mut lost = None;
    for round in 0..8 {
        let msg = message(
            TYPE,
            "tester",
            Some("beta"),
            "normal",
            json!({ "round": round }),
        );
        let id = id_of(&msg);
        hub.post_message(&msg);
        ids.push(id.clone());
        wait_until(TIMEOUT, "beta writes the message", || beta.has(&id));
        hub.kill9();
        if hub.queue_ids("beta").contains(&id) {
            eprintln!("beta's ack was lost to the kill in round {round}");
            lost = Some(id);
            break;
        }
        hub.restart();
    }
    let lost = lost.expect("in 8 rounds the hub never died before beta's ack reached it");

    // While the hub is down: the hooks run, then the inbox is emptied. The agent remembers
    // what it delivered (state/ survives `mesync flush inbox`), so the batch the hub offers
    // again must not come back into the inbox, nor run its hook again.
    wait_until(TIMEOUT, "beta's hooks have run for every message", || {
        let runs = beta.hook_runs();
        ids.iter().all(|id| runs.contains(id))
    });
    beta.cmd(&["flush", "inbox"]).ok("mesync flush inbox");
    assert!(beta.inbox().is_empty());
    // The restarted hub still holds `lost` (it was queued when the hub died): an empty
    // queue means it was offered again and acknowledged.
    hub.restart();
    wait_until(
        LONG_TIMEOUT,
        &format!("beta acknowledges {lost}, offered again"),
        || hub.queue_files("beta").is_empty(),
    );

    let barrier = message(TYPE, "tester", Some("beta"), "low", json!("barrier"));
    let barrier_id = id_of(&barrier);
    hub.post_message(&barrier);
    wait_until(TIMEOUT, "the barrier's hook has run", || {
        beta.hook_runs().contains(&barrier_id)
    });
    assert_eq!(
        beta.ids("inbox"),
        vec![barrier_id.clone()],
        "a message delivered before the crash was written into the inbox again"
    );
    let mut want = ids.clone();
    want.push(barrier_id);
    assert_eq!(
        beta.hook_runs(),
        want,
        "each hook runs once, in delivery order"
    );
}
