//! Group commit under crashes: the hub is killed with SIGKILL again and again while two
//! agents stream messages through it, so kills land in the middle of batch POSTs and of
//! group commits. Every message dropped into an outbox must reach the receiver once: the
//! hub never answered 200 for something it had not made durable, and a retry of a batch
//! whose commit was cut short is neither lost nor delivered twice.

mod support;

use std::collections::HashMap;

use serde_json::json;
use support::*;

const WAVES: usize = 4;
const PER_WAVE: usize = 100;

#[test]
fn hub_kill9_during_group_commits_loses_and_duplicates_nothing() {
    let mut hub = Hub::start();
    let mut rx = Agent::new(&hub.url(), "rx");
    let mut tx_a = Agent::new(&hub.url(), "tx-a");
    let mut tx_b = Agent::new(&hub.url(), "tx-b");
    for agent in [&mut rx, &mut tx_a, &mut tx_b] {
        agent.start();
    }
    hub.wait_registered(&["rx", "tx-a", "tx-b"]);

    let mut ids = Vec::new();
    for wave in 0..WAVES {
        let sent_before = tx_a.files("sent").len() + tx_b.files("sent").len();
        for (agent, source) in [(&tx_a, "tx-a"), (&tx_b, "tx-b")] {
            for i in 0..PER_WAVE {
                let priority = ["high", "normal", "low"][i % 3];
                let msg = message(
                    "gc.test",
                    source,
                    Some("rx"),
                    priority,
                    json!({"wave": wave, "i": i}),
                );
                write_atomic(
                    &agent.dir("outbox"),
                    &file_name_for(&msg),
                    msg.to_string().as_bytes(),
                );
                ids.push(id_of(&msg));
            }
        }
        // Kill the hub as soon as this wave is flowing: the rest of it is on the wire or in
        // a commit at that moment.
        wait_until(TIMEOUT, "the wave starts to flow", || {
            tx_a.files("sent").len() + tx_b.files("sent").len() > sent_before
        });
        hub.kill9();
        hub.restart();
    }

    let total = WAVES * PER_WAVE * 2;
    wait_until(LONG_TIMEOUT, "every message is in rx's inbox", || {
        rx.files("inbox").len() >= total
    });
    wait_until(TIMEOUT, "both outboxes are empty", || {
        tx_a.files("outbox").is_empty() && tx_b.files("outbox").is_empty()
    });

    let mut seen: HashMap<String, usize> = HashMap::new();
    for id in rx.ids("inbox") {
        *seen.entry(id).or_default() += 1;
    }
    let lost: Vec<&String> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
    let twice: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(lost.is_empty(), "lost {} messages: {lost:?}", lost.len());
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(seen.len(), total, "no message the test did not send");
    assert_eq!(tx_a.files("sent").len(), WAVES * PER_WAVE);
    assert_eq!(tx_b.files("sent").len(), WAVES * PER_WAVE);
    assert!(tx_a.files("failed").is_empty() && tx_b.files("failed").is_empty());
    wait_until(TIMEOUT, "the hub's queue for rx drains", || {
        hub.queue_files("rx").is_empty()
    });
}
