//! The hub's store: the [`Store`] operations the HTTP layer needs, with the types they
//! speak, and the rules every implementation keeps. [`FileStore`] (`files/`) keeps
//! everything as files in the data dir; it is the default and needs nothing else.
//!
//! The delivery rules, the same for every store (and checked for each by the conformance
//! suite, `conformance.rs`):
//!
//! - an id accepted once is a duplicate forever after (no time window), in one batch too;
//!   a duplicate fans out nothing;
//! - a targeted message goes to its target, registered or not; a broadcast goes to every
//!   host registered when it is accepted, except its source;
//! - a host's queue is handed out highest priority first, first in first out within one;
//! - a message is refused, not queued, when one of its recipients already holds
//!   `max_pending_per_host` messages, or when the store is short of a resource; what fits of
//!   a batch is stored, and the rest refused;
//! - an accepted message is durable before `enqueue` returns, and a retried commit never
//!   queues a message twice for a host;
//! - an ack removes a message from that host's queue only; an expired message leaves every
//!   queue.

#[cfg(test)]
mod conformance;
mod files;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::error::Result;
use crate::message::Message;
use crate::shortage::Resource;

pub use files::FileStore;

/// What became of one message handed to [`Store::enqueue`].
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    /// Durable in this many recipients' queues.
    Accepted(usize),
    /// This id was accepted before; nothing was fanned out again.
    Duplicate,
    /// Not stored, for now: senders retry these later.
    Refused(Refused),
}

/// Why the store did not take a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    /// A recipient's queue holds `max_pending_per_host` messages already.
    QueueFull { host: String },
    /// The store is short of a resource (space, inodes, quota, a writable disk,
    /// descriptors).
    Short(Resource),
    /// The store failed otherwise; the log says how.
    Failed,
}

impl Refused {
    /// The HTTP status that says it: 429, 507 or 503, 500.
    pub fn status(&self) -> u16 {
        match self {
            Refused::QueueFull { .. } => 429,
            Refused::Short(resource) => resource.status(),
            Refused::Failed => 500,
        }
    }

    /// Why, for the sender.
    pub fn reason(&self) -> String {
        match self {
            Refused::QueueFull { host } => {
                format!("the queue of host {host} is full; try again later")
            }
            Refused::Short(resource) => {
                format!("the hub cannot store it now: {}", resource.describe())
            }
            Refused::Failed => "the hub could not store the message".into(),
        }
    }
}

/// One registered host, as `GET /v1/hosts` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub host: String,
    pub registered_at: Option<String>,
    pub last_seen: Option<String>,
    pub pending: usize,
    pub oldest_pending_secs: Option<u64>,
}

/// The operations the HTTP layer needs from a store. The files ([`FileStore`]) are the
/// default; another implementation (a shared database) must pass the same conformance suite.
pub trait Store: Send + Sync + 'static {
    /// Registers a host on contact (idempotent) and notes when it was last seen.
    fn register(&self, host: &str) -> impl Future<Output = Result<()>> + Send;
    /// Accepts messages: deduplicates by id, decides recipients, and returns once the
    /// accepted ones are durable. One outcome per message, in order.
    fn enqueue(&self, messages: Vec<Message>) -> impl Future<Output = Vec<Enqueued>> + Send;
    /// Up to `max` of a host's pending messages in delivery order, as stored JSON.
    fn fetch(&self, host: &str, max: usize) -> impl Future<Output = Result<Vec<Bytes>>> + Send;
    /// Removes acknowledged messages from a host's queue; returns how many were pending.
    fn ack(&self, host: &str, ids: Vec<Uuid>) -> impl Future<Output = Result<usize>> + Send;
    /// Notified whenever the host's queue gains messages. Take a `notified()` future from it
    /// before fetching, so no wake-up is lost between an empty fetch and the wait.
    fn waiter(&self, host: &str) -> Arc<Notify>;
    /// The registered hosts.
    fn hosts(&self) -> Vec<HostInfo>;
    /// Drops a host from the registry and its queue; returns how many messages it dropped,
    /// or `None` when the host is unknown.
    fn remove_host(&self, host: &str) -> impl Future<Output = Result<Option<usize>>> + Send;
    /// Drops expired messages from every queue; returns how many.
    fn expire(&self) -> impl Future<Output = Result<usize>> + Send;
    /// Whether the store can write; the reason when not.
    fn health(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Prometheus text exposition of the store's counters.
    fn metrics(&self) -> String;
    /// A reload changed `[hub] max_pending_per_host`.
    fn set_max_pending_per_host(&self, max: usize);
}
