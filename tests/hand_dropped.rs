//! Files dropped into `outbox/` by hand, as the README shows them: minimal files (`type`,
//! `target`, `payload`) that the agent completes before sending.
//!
//! Under kill -9: an agent is started on a big outbox of minimal files
//! (`type`, `target`, `payload`, nothing else), and killed with SIGKILL again and again at
//! chosen moments: while it writes the completed files, right after it renamed them into
//! place, while it sends, and at plain delays after its start. After each kill it is
//! started again on what it left, with more files dropped. In the end every message is in
//! the receiver's inbox exactly once, under the id it was given when it was first
//! completed: a completion that was seen on disk (and so may have been sent) is never
//! replaced by another id, and nothing is delivered twice.
//!
//! What each kill hit is read from the disk afterwards (temporary files of a group commit
//! in progress, completed and raw files side by side, files already in `sent/`), and the
//! test fails unless kills landed both during completion and during sending.
//!
//! Still being written: a file written in place (against the README's advice to rename it
//! into place) is not sent or refused while it is young and unparsable; it is sent once
//! whole, and a file that stays broken goes to `failed/` once it is older than the agent's
//! grace, without waiting for the next full scan of the directory.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

// ---------------------------------------------------------------------------------------
// Kill -9 while completing and sending
// ---------------------------------------------------------------------------------------

/// Hand-dropped files added before each start of the sender.
const PER_ROUND: usize = 500;

/// When a round's kill comes.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// Once this many new temporary files exist in `outbox/`: the group commit of the
    /// completions is writing.
    Temps(usize),
    /// Once the new temporary files were seen and are gone again: the completed files
    /// were renamed into place, and are being flushed or sent.
    Renamed,
    /// Once `sent/` holds this many more files than at the start: sending.
    Sent(usize),
    /// This long after the start.
    Delay(Duration),
}

const ROUNDS: [KillAt; 9] = [
    KillAt::Temps(1),
    KillAt::Temps(PER_ROUND / 2),
    KillAt::Renamed,
    KillAt::Sent(1),
    KillAt::Sent(PER_ROUND),
    KillAt::Delay(Duration::ZERO),
    KillAt::Delay(Duration::from_millis(300)),
    KillAt::Temps(PER_ROUND),
    KillAt::Delay(Duration::from_secs(1)),
];

/// The minimal file the README shows, numbered by its payload.
fn hand_dropped(n: usize) -> String {
    format!(r#"{{"type": "crash.drop", "target": "rx", "payload": {{"n": {n}}}}}"#)
}

fn is_temp(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

fn temps(outbox: &Path) -> BTreeSet<String> {
    list_dir_all(outbox)
        .into_iter()
        .filter(|n| is_temp(n))
        .collect()
}

/// The payload number and id of a message file.
fn numbered(msg: &Value) -> (u64, Option<String>) {
    let n = msg["payload"]["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("a message without its number: {msg}"));
    (n, msg["id"].as_str().map(str::to_string))
}

/// What the disk showed right after a kill.
#[derive(Debug, Default)]
struct Seen {
    /// Files in `outbox/` still as dropped (no id yet).
    raw: usize,
    /// Files in `outbox/` completed: payload number and id.
    completed: Vec<(u64, String)>,
    /// Temporary files of the completion that was cut short.
    new_temps: usize,
    /// Files in `sent/`: payload number and id.
    sent: Vec<(u64, String)>,
}

impl Seen {
    fn read(tx: &Agent, temps_before: &BTreeSet<String>) -> Seen {
        let mut seen = Seen {
            new_temps: temps(&tx.dir("outbox")).difference(temps_before).count(),
            ..Seen::default()
        };
        let outbox = tx.dir("outbox");
        for name in list_dir(&outbox) {
            let bytes = std::fs::read(outbox.join(&name)).expect("read an outbox file");
            // A kill never leaves a visible file half written.
            let msg: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "outbox/{name} is not whole after a kill: {e}: {}",
                    String::from_utf8_lossy(&bytes)
                )
            });
            match numbered(&msg) {
                (n, Some(id)) => seen.completed.push((n, id)),
                (_, None) => seen.raw += 1,
            }
        }
        for (_, msg) in read_messages(&tx.dir("sent")) {
            if let (n, Some(id)) = numbered(&msg) {
                seen.sent.push((n, id));
            }
        }
        seen
    }

    fn during_completion(&self) -> bool {
        self.new_temps > 0 || (self.raw > 0 && !self.completed.is_empty())
    }

    fn during_sending(&self) -> bool {
        !self.sent.is_empty() && !self.completed.is_empty()
    }
}

/// Polls as fast as the disk answers (a group commit lasts milliseconds) until `when`
/// comes, or everything has left the outbox (the kill then hits an idle agent).
fn wait_for_moment(tx: &Agent, when: KillAt, temps_before: &BTreeSet<String>, sent_before: usize) {
    let start = Instant::now();
    let deadline = start + TIMEOUT;
    let mut saw_temps = false;
    while Instant::now() < deadline {
        let names = list_dir_all(&tx.dir("outbox"));
        let new_temps = names
            .iter()
            .filter(|n| is_temp(n) && !temps_before.contains(*n))
            .count();
        let waiting = names.iter().filter(|n| !n.starts_with('.')).count();
        saw_temps |= new_temps > 0;
        let reached = match when {
            KillAt::Temps(k) => new_temps >= k,
            KillAt::Renamed => saw_temps && new_temps == 0,
            KillAt::Sent(k) => list_dir(&tx.dir("sent")).len() >= sent_before + k,
            KillAt::Delay(d) => start.elapsed() >= d,
        };
        if reached || waiting == 0 {
            return;
        }
        thread::sleep(Duration::from_micros(200));
    }
}

fn metric(hub: &Hub, name: &str) -> u64 {
    let text = hub.get("/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

#[test]
fn kill9_while_completing_and_sending_hand_dropped_files_delivers_each_once_under_its_first_id() {
    let hub = Hub::start();
    let [rx] = start_agents(&hub, ["rx"]);
    let mut tx = Agent::new(&hub.url(), "tx");
    // Which id each payload number was first seen with on disk.
    let mut first_id: BTreeMap<u64, String> = BTreeMap::new();
    let mut hits = Vec::new();
    let mut dropped = 0;
    for (round, when) in ROUNDS.into_iter().enumerate() {
        for n in dropped..dropped + PER_ROUND {
            write_atomic(
                &tx.dir("outbox"),
                &format!("job-{n:05}.json"),
                hand_dropped(n).as_bytes(),
            );
        }
        dropped += PER_ROUND;
        let temps_before = temps(&tx.dir("outbox"));
        let sent_before = list_dir(&tx.dir("sent")).len();
        tx.start();
        wait_for_moment(&tx, when, &temps_before, sent_before);
        tx.kill9();
        let seen = Seen::read(&tx, &temps_before);
        eprintln!(
            "round {round}, kill at {when:?}: {} raw, {} completed, {} temporary, {} sent",
            seen.raw,
            seen.completed.len(),
            seen.new_temps,
            seen.sent.len()
        );
        for (n, id) in seen.completed.iter().chain(&seen.sent) {
            let first = first_id.entry(*n).or_insert_with(|| id.clone());
            assert_eq!(
                first, id,
                "message {n} was completed as {first}, and is now {id} (round {round})"
            );
        }
        hits.push((when, seen.during_completion(), seen.during_sending()));
    }

    tx.start();
    wait_until(
        LONG_TIMEOUT * 2,
        "every hand-dropped message in the receiver's inbox",
        || list_dir(&rx.dir("inbox")).len() >= dropped,
    );
    wait_until(TIMEOUT, "the sender's outbox to empty", || {
        list_dir(&tx.dir("outbox")).is_empty()
    });
    let mut delivered: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for msg in rx.inbox() {
        let (n, id) = numbered(&msg);
        delivered
            .entry(n)
            .or_default()
            .push(id.expect("an inbox message has an id"));
    }
    let expected: Vec<u64> = (0..dropped as u64).collect();
    assert_eq!(
        delivered.keys().copied().collect::<Vec<_>>(),
        expected,
        "every message reaches the receiver"
    );
    for (n, ids) in &delivered {
        assert_eq!(
            ids.len(),
            1,
            "message {n} is in the inbox more than once: {ids:?}"
        );
        if let Some(first) = first_id.get(n) {
            assert_eq!(
                &ids[0], first,
                "message {n} arrived under another id than it was first completed with"
            );
        }
    }
    // No id was accepted that did not reach the inbox: nothing went out under an id that a
    // crash then replaced.
    assert_eq!(
        metric(&hub, "mesync_messages_accepted_total"),
        dropped as u64,
        "ids the hub accepted"
    );
    assert!(list_dir(&tx.dir("failed")).is_empty(), "nothing failed");
    assert_eq!(list_dir(&tx.dir("sent")).len(), dropped, "all in sent/");
    // And the kills hit what this test is about.
    assert!(
        hits.iter().any(|(_, completing, _)| *completing),
        "no kill landed while hand-dropped files were being completed: {hits:?}"
    );
    assert!(
        hits.iter().any(|(_, _, sending)| *sending),
        "no kill landed while completed files were being sent: {hits:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Files still being written
// ---------------------------------------------------------------------------------------

/// A sender whose full scans of `outbox/` are a minute apart, so that only its watcher and
/// its own second looks at young files can explain what it does within the test's deadline.
fn slow_scanning_sender(hub: &Hub) -> Agent {
    let mut tx = Agent::new(&hub.url(), "tx")
        .with_env("MESYNC_POLL_INTERVAL", "60")
        .with_env("RUST_LOG", "mesync=debug");
    tx.start();
    hub.wait_registered(&["tx"]);
    tx
}

#[test]
fn a_file_written_in_place_is_sent_once_whole() {
    let hub = Hub::start();
    let [rx] = start_agents(&hub, ["rx"]);
    let tx = slow_scanning_sender(&hub);
    let path = tx.dir("outbox").join("slow.json");
    let mut file = File::create(&path).expect("create outbox/slow.json");
    file.write_all(br#"{"type": "slow.write", "target": "rx", "pay"#)
        .expect("write the first half");
    wait_until(
        TIMEOUT,
        "the sender to look at the half-written file",
        || tx.logs.contains("may still be being written"),
    );
    // The second half comes well within the grace the agent gives a young file.
    file.write_all(br#"load": {"n": 1}}"#)
        .expect("write the second half");
    drop(file);
    wait_until(TIMEOUT, "the whole message in the receiver's inbox", || {
        rx.inbox().iter().any(|m| m["type"] == "slow.write")
    });
    let inbox = rx.inbox();
    let msg = inbox
        .iter()
        .find(|m| m["type"] == "slow.write")
        .expect("the message");
    assert_eq!(msg["payload"], serde_json::json!({"n": 1}), "{msg}");
    assert!(
        list_dir(&tx.dir("failed")).is_empty(),
        "a file still being written is not refused: {:?}",
        list_dir(&tx.dir("failed"))
    );
}

#[test]
fn a_file_left_half_written_is_refused_once_past_the_grace() {
    let hub = Hub::start();
    let tx = slow_scanning_sender(&hub);
    let path = tx.dir("outbox").join("broken.json");
    let mut file = File::create(&path).expect("create outbox/broken.json");
    file.write_all(br#"{"type": "broken.write", "pay"#)
        .expect("write half a file");
    drop(file);
    wait_until(TIMEOUT, "the half-written file in failed/", || {
        list_dir(&tx.dir("failed")).contains(&"broken.json".to_string())
    });
    let reason = std::fs::read_to_string(tx.dir("failed").join("broken.json.reason"))
        .expect("a reason beside it");
    assert!(reason.contains("not JSON"), "reason: {reason}");
    assert!(list_dir(&tx.dir("outbox")).is_empty(), "it left outbox/");
}
