//! The conformance suite: the delivery rules of the store's module doc, written once,
//! generic over [`Store`], and run against every implementation (`conformance!` at the
//! bottom instantiates it; a new store adds one line there).
//!
//! The end-to-end suites (`tests/`) check the same rules through real processes; these
//! check them at the trait, where a store's own mistakes show without the HTTP layer.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use super::{Enqueued, FileStore, Refused, Store};
use crate::message::{Message, Timestamp};

/// Opens one implementation's store in `dir`. Opening the same `dir` again, once the first
/// store is dropped, must find everything it made durable.
pub(crate) trait Harness {
    type S: Store;
    fn open(&self, dir: &Path, max_pending: usize) -> Self::S;
}

/// The file store.
struct Files;

impl Harness for Files {
    type S = FileStore;
    fn open(&self, dir: &Path, max_pending: usize) -> FileStore {
        let liveness = crate::service::Liveness::default();
        FileStore::open(dir, max_pending, liveness.heartbeat("commit thread"))
            .expect("open the file store")
    }
}

const CAP: usize = 100;

fn message(source: &str, target: Option<&str>, priority: &str, n: u32) -> Message {
    let value = json!({
        "type": "conformance.test",
        "target": target,
        "priority": priority,
        "payload": {"n": n},
    });
    Message::complete(value, source).expect("a valid message")
}

/// The `payload.n` of each fetched message, in the order fetched.
async fn fetch_ns(store: &impl Store, host: &str) -> Vec<u64> {
    let fetched = store.fetch(host, 1000).await.expect("fetch");
    fetched
        .iter()
        .map(|bytes| {
            let value: Value = serde_json::from_slice(bytes).expect("stored JSON");
            value["payload"]["n"].as_u64().expect("payload.n")
        })
        .collect()
}

fn ids_of(fetched: &[bytes::Bytes]) -> Vec<Uuid> {
    fetched
        .iter()
        .map(|b| Message::parse(b).expect("a stored message").id)
        .collect()
}

async fn targeted_messages_are_fetched_then_acked_away(h: &impl Harness) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = h.open(dir.path(), CAP);
    let m = message("tx", Some("rx"), "normal", 1);
    let id = m.id;
    assert_eq!(store.enqueue(vec![m]).await, vec![Enqueued::Accepted(1)]);
    // Not registered yet: kept until it comes.
    assert_eq!(fetch_ns(&store, "rx").await, vec![1]);
    assert_eq!(
        fetch_ns(&store, "rx").await,
        vec![1],
        "a fetch is not an ack"
    );
    assert_eq!(store.ack("rx", vec![id]).await.expect("ack"), 1);
    assert!(fetch_ns(&store, "rx").await.is_empty());
    assert_eq!(
        store.ack("rx", vec![id]).await.expect("ack again"),
        0,
        "an ack of what is gone counts nothing"
    );
}

async fn an_id_is_accepted_once(h: &impl Harness) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = h.open(dir.path(), CAP);
    let m = message("tx", Some("rx"), "normal", 1);
    let again = m.clone();
    let twice = vec![message("tx", Some("rx"), "normal", 2); 2];
    assert_eq!(store.enqueue(vec![m]).await, vec![Enqueued::Accepted(1)]);
    assert_eq!(store.enqueue(vec![again]).await, vec![Enqueued::Duplicate]);
    assert_eq!(
        store.enqueue(twice).await,
        vec![Enqueued::Accepted(1), Enqueued::Duplicate],
        "in one batch too"
    );
    assert_eq!(
        fetch_ns(&store, "rx").await,
        vec![1, 2],
        "no second fan-out"
    );
}

async fn a_broadcast_goes_to_the_hosts_registered_when_accepted_but_its_source(h: &impl Harness) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = h.open(dir.path(), CAP);
    for host in ["a", "b", "tx"] {
        store.register(host).await.expect("register");
    }
    let m = message("tx", None, "normal", 7);
    assert_eq!(
        store.enqueue(vec![m.clone()]).await,
        vec![Enqueued::Accepted(2)]
    );
    store.register("late").await.expect("register late");
    assert_eq!(fetch_ns(&store, "a").await, vec![7]);
    assert_eq!(fetch_ns(&store, "b").await, vec![7]);
    assert!(fetch_ns(&store, "tx").await.is_empty(), "not to its source");
    assert!(
        fetch_ns(&store, "late").await.is_empty(),
        "not to a host registered later"
    );
    // An ack is one host's: the other keeps its copy.
    store.ack("a", vec![m.id]).await.expect("ack");
    assert!(fetch_ns(&store, "a").await.is_empty());
    assert_eq!(fetch_ns(&store, "b").await, vec![7]);
    let mut hosts: Vec<(String, usize)> = store
        .hosts()
        .into_iter()
        .map(|h| (h.host, h.pending))
        .collect();
    hosts.sort();
    let expected = [("a", 0), ("b", 1), ("late", 0), ("tx", 0)];
    let expected: Vec<(String, usize)> =
        expected.iter().map(|(h, n)| (h.to_string(), *n)).collect();
    assert_eq!(hosts, expected);
}

async fn a_queue_is_handed_out_by_priority_then_in_order(h: &impl Harness) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = h.open(dir.path(), CAP);
    let order = [
        ("low", 1),
        ("normal", 2),
        ("high", 3),
        ("normal", 4),
        ("high", 5),
    ];
    for (priority, n) in order {
        let m = message("tx", Some("rx"), priority, n);
        assert_eq!(store.enqueue(vec![m]).await, vec![Enqueued::Accepted(1)]);
    }
    assert_eq!(fetch_ns(&store, "rx").await, vec![3, 5, 2, 4, 1]);
    let first_two = store.fetch("rx", 2).await.expect("fetch 2");
    assert_eq!(first_two.len(), 2, "at most `max`");
}

async fn a_full_queue_refuses_without_storing(h: &impl Harness) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = h.open(dir.path(), 2);
    let batch: Vec<Message> = (0..3)
        .map(|n| message("tx", Some("rx"), "normal", n))
        .collect();
    let refused = Enqueued::Refused(Refused::QueueFull { host: "rx".into() });
    assert_eq!(
        store.enqueue(batch).await,
        vec![
            Enqueued::Accepted(1),
            Enqueued::Accepted(1),
            refused.clone()
        ]
    );
    assert_eq!(fetch_ns(&store, "rx").await, vec![0, 1]);
    // Refused is not accepted: the same message is taken once there is room.
    let retry = message("tx", Some("rx"), "normal", 9);
    assert_eq!(store.enqueue(vec![retry.clone()]).await, vec![refused]);
    store.set_max_pending_per_host(3);
    assert_eq!(
        store.enqueue(vec![retry]).await,
        vec![Enqueued::Accepted(1)]
    );
}

async fn a_waiter_is_woken_by_a_message_for_its_host(h: &impl Harness) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = h.open(dir.path(), CAP);
    let notify = store.waiter("rx");
    let notified = notify.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    assert!(fetch_ns(&store, "rx").await.is_empty());
    store
        .enqueue(vec![message("tx", Some("rx"), "normal", 1)])
        .await;
    tokio::time::timeout(Duration::from_secs(10), notified)
        .await
        .expect("woken by the enqueue");
}

async fn expired_messages_leave_every_queue(h: &impl Harness) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = h.open(dir.path(), CAP);
    let mut old = message("tx", Some("rx"), "normal", 1);
    old.expires_at = Some(Timestamp::from(
        chrono::Utc::now() - chrono::Duration::seconds(1),
    ));
    let mut soon = message("tx", Some("other"), "normal", 2);
    soon.expires_at = Some(Timestamp::from(
        chrono::Utc::now() - chrono::Duration::seconds(1),
    ));
    let fresh = message("tx", Some("rx"), "normal", 3);
    store.enqueue(vec![old, soon, fresh]).await;
    assert_eq!(
        fetch_ns(&store, "rx").await,
        vec![3],
        "an expired message is not handed out"
    );
    assert_eq!(
        store.expire().await.expect("expire"),
        1,
        "the other queue's"
    );
    assert!(fetch_ns(&store, "other").await.is_empty());
    assert_eq!(store.expire().await.expect("expire again"), 0);
}

async fn a_removed_host_loses_its_queue(h: &impl Harness) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = h.open(dir.path(), CAP);
    store.register("rx").await.expect("register");
    let batch: Vec<Message> = (0..3)
        .map(|n| message("tx", Some("rx"), "normal", n))
        .collect();
    store.enqueue(batch).await;
    assert_eq!(store.remove_host("rx").await.expect("remove"), Some(3));
    assert_eq!(store.remove_host("rx").await.expect("remove again"), None);
    assert!(fetch_ns(&store, "rx").await.is_empty());
    assert!(store.hosts().iter().all(|h| h.host != "rx"));
}

async fn what_was_accepted_survives_a_restart(h: &impl Harness) {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = message("tx", Some("rx"), "normal", 1);
    let acked = message("tx", Some("rx"), "high", 2);
    let broadcast = message("tx", None, "low", 3);
    {
        let store = h.open(dir.path(), CAP);
        store.register("rx").await.expect("register");
        store
            .enqueue(vec![first.clone(), acked.clone(), broadcast.clone()])
            .await;
        store.ack("rx", vec![acked.id]).await.expect("ack");
    }
    let store = h.open(dir.path(), CAP);
    let fetched = store.fetch("rx", 1000).await.expect("fetch");
    assert_eq!(
        ids_of(&fetched),
        vec![first.id, broadcast.id],
        "pending, in order"
    );
    assert!(
        store.hosts().iter().any(|h| h.host == "rx"),
        "the registry survives"
    );
    assert_eq!(
        store.enqueue(vec![first, acked, broadcast]).await,
        vec![Enqueued::Duplicate; 3],
        "and so does deduplication, of acked messages too"
    );
    assert!(store.health().await.is_ok());
}

/// The suite, as `#[tokio::test]`s for one implementation.
macro_rules! conformance {
    ($module:ident, $harness:expr) => {
        mod $module {
            use super::*;
            conformance!(@tests $harness;
                targeted_messages_are_fetched_then_acked_away,
                an_id_is_accepted_once,
                a_broadcast_goes_to_the_hosts_registered_when_accepted_but_its_source,
                a_queue_is_handed_out_by_priority_then_in_order,
                a_full_queue_refuses_without_storing,
                a_waiter_is_woken_by_a_message_for_its_host,
                expired_messages_leave_every_queue,
                a_removed_host_loses_its_queue,
                what_was_accepted_survives_a_restart,
            );
        }
    };
    (@tests $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                super::$name(&$harness).await;
            }
        )*
    };
}

conformance!(files, Files);
