//! Hub → inbox: a long-poll brings this host's next messages as soon as the hub has them.
//! Each pulled batch is written with one group commit (inbox files and their ledger records
//! made durable together), then acknowledged with one ack. An id the ledger already knows is
//! acknowledged without being written again; an expired message is acknowledged and
//! dropped.
//!
//! When the inbox (or `state/`) is short of a resource (space, inodes, quota, a writable
//! file system, descriptors), the longest prefix of the batch that fits is written and
//! acknowledged, in delivery order, and only the rest waits: the puller backs off and pulls
//! again, a few messages at a time, until the resource returns. Pulling again (rather than
//! keeping the batch) lets a message of higher priority that came meanwhile go first, past
//! one that does not fit even alone. Nothing unwritten is acknowledged.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use uuid::Uuid;

use super::Agent;
use super::backoff::Backoff;
use super::ledger::Record;
use crate::error::{Error, IoContext, Result};
use crate::message::Message;
use crate::service::Heartbeat;
use crate::service::liveness::DISK_BOUND;
use crate::spool::{Commit, remove_all};

/// How long one long-poll waits at the hub for a message: three HTTP timeouts (30 s by
/// default), at most the hub's limit. A connection that went silent (a peer gone without
/// a FIN) is given up after this plus one HTTP timeout.
fn long_poll(http_timeout: Duration) -> Duration {
    http_timeout
        .saturating_mul(3)
        .clamp(Duration::from_secs(1), crate::hub::api::MAX_WAIT)
}
/// Most messages per pull.
const MAX_PULL: usize = 1000;
/// Most messages per pull while the inbox is short of a resource: the next try needs only
/// the first of them, and the hub need not send a thousand again every few seconds.
const SHORT_PULL: usize = 16;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Longest wait between tries while short: how soon a freed inbox is noticed.
const SHORT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The puller loop.
pub async fn run(agent: Arc<Agent>, heartbeat: Heartbeat) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut short_backoff = Backoff::new(BACKOFF_MIN, SHORT_BACKOFF_MAX);
    // The directory short of a resource, while the inbox writer finds one.
    let mut short: Option<PathBuf> = None;
    // The message that did not fit even alone, once logged.
    let mut stuck: Option<Uuid> = None;
    let host = agent.config().host_id.clone();
    loop {
        let wait = long_poll(agent.config().http_timeout);
        let client = agent.client();
        // The hub holds the poll up to `wait`; the client gives up one timeout later.
        heartbeat.busy_for(wait.saturating_add(client.timeout()));
        let max = if short.is_some() {
            SHORT_PULL
        } else {
            MAX_PULL
        };
        let pulled = tokio::select! {
            pulled = client.pull(&host, wait, max) => pulled,
            // New connection settings: poll again with them.
            _ = agent.reloaded.notified() => continue,
            _ = agent.shutdown.cancelled() => return,
        };
        let values = match pulled {
            Ok(values) => {
                agent.hub_result(Ok(()));
                values
            }
            Err(err) => {
                agent.hub_result(Err(err.to_string()));
                let delay = backoff.next_delay();
                tracing::warn!(%err, retry_in = ?delay, "cannot pull from the hub");
                if sleep_or_shutdown(&agent, &heartbeat, delay).await {
                    return;
                }
                continue;
            }
        };
        if values.is_empty() {
            backoff.reset();
            continue;
        }
        // Finish the batch in hand even when shutdown comes meanwhile: written and acked.
        let worker = Arc::clone(&agent);
        let started = std::time::Instant::now();
        let count = values.len();
        heartbeat.busy_for(DISK_BOUND);
        let delivered = tokio::task::spawn_blocking(move || deliver(&worker, values)).await;
        tracing::debug!(count, took = ?started.elapsed(), "pulled batch written");
        let batch = match delivered {
            Ok(batch) => batch,
            Err(err) => {
                tracing::error!(%err, "inbox write task failed");
                continue;
            }
        };
        backoff.reset();
        if batch.written > 0 {
            agent.hooks_wake.notify_one();
        }
        if !batch.ack.is_empty() {
            ack(&agent, &heartbeat, &host, &batch.ack).await;
        }
        let Some(err) = &batch.failure else {
            if let Some(dir) = short.take() {
                agent.clear_shortage(&dir);
            }
            stuck = None;
            short_backoff.reset();
            continue;
        };
        short = report_failure(&agent, err, &batch, &mut stuck);
        if batch.written > 0 {
            // Progress: room is being made (a consumer at work); look again soon.
            short_backoff.reset();
        }
        let delay = if short.is_some() {
            short_backoff.next_delay()
        } else {
            backoff.next_delay()
        };
        tracing::debug!(retry_in = ?delay, "the rest of the batch waits at the hub");
        if sleep_or_shutdown(&agent, &heartbeat, delay).await {
            return;
        }
    }
}

/// Acknowledges what is durable in the inbox.
async fn ack(agent: &Agent, heartbeat: &Heartbeat, host: &str, ids: &[Uuid]) {
    let started = std::time::Instant::now();
    let client = agent.client();
    heartbeat.busy_for(client.timeout());
    let acked = client.ack(host, ids).await;
    tracing::debug!(took = ?started.elapsed(), "ack");
    if let Err(err) = acked {
        // The messages are durable here; the hub will offer them again and the ledger
        // recognises them.
        tracing::warn!(%err, "ack failed; the hub will offer these messages again");
    }
}

/// Says why the rest of a batch was not written: a shortage once per episode (and the
/// message that does not fit even alone once), any other failure every time. Returns the
/// directory short of a resource, if that was why.
fn report_failure(
    agent: &Agent,
    err: &Error,
    batch: &Batch,
    stuck: &mut Option<Uuid>,
) -> Option<PathBuf> {
    let Some(resource) = err.shortage() else {
        tracing::error!(%err, written = batch.written, "cannot write the inbox; not acknowledging the rest, the hub keeps them");
        return None;
    };
    let dir = err.dir().unwrap_or_else(|| agent.config().inbox_dir());
    agent.note_shortage(&dir, resource, "cannot write the inbox");
    if batch.written > 0 {
        tracing::info!(
            written = batch.written,
            waiting = batch.unwritten,
            resource = resource.name(),
            "wrote the messages that fit; the rest wait at the hub"
        );
    } else if let Some((id, size)) = batch.head
        && *stuck != Some(id)
    {
        *stuck = Some(id);
        tracing::warn!(
            %id,
            size,
            free_bytes = crate::shortage::free_bytes(&dir),
            dir = %dir.display(),
            "message {id} ({size} bytes) does not fit in {}: {}; it waits at the hub, and \
             messages queued behind it wait too",
            dir.display(),
            resource.describe()
        );
    }
    Some(dir)
}

/// Sleeps; true when shutdown came first.
async fn sleep_or_shutdown(agent: &Agent, heartbeat: &Heartbeat, delay: Duration) -> bool {
    heartbeat.busy_for(delay);
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = agent.shutdown.cancelled() => true,
    }
}

/// What became of a pulled batch.
struct Batch {
    /// The ids to acknowledge: written now, known already, expired or invalid.
    ack: Vec<Uuid>,
    /// New messages written into the inbox.
    written: usize,
    /// New messages not written.
    unwritten: usize,
    /// The first new message not written, and its size.
    head: Option<(Uuid, usize)>,
    /// Why they were not.
    failure: Option<Error>,
}

/// Writes a pulled batch into the inbox, as much of it as fits.
fn deliver(agent: &Agent, values: Vec<Value>) -> Batch {
    let now = Utc::now();
    let mut ack = Vec::with_capacity(values.len());
    let mut fresh: Vec<Message> = Vec::new();
    let mut seen = HashSet::new();
    {
        let ledger = agent.ledger();
        for value in values {
            let id = value
                .get("id")
                .and_then(Value::as_str)
                .and_then(|s| Uuid::try_parse(s).ok());
            let message = match serde_json::from_value::<Message>(value)
                .map_err(|e| e.to_string())
                .and_then(|m| m.validate().map(|()| m))
            {
                Ok(message) => message,
                Err(reason) => {
                    // Only a hub bug or an impostor sends this; keeping it would block the queue.
                    tracing::error!(?id, %reason, "dropping an invalid message from the hub");
                    ack.extend(id);
                    continue;
                }
            };
            if ledger.is_delivered(&message.id) || !seen.insert(message.id) {
                tracing::debug!(id = %message.id, "already delivered; acknowledging again");
                ack.push(message.id);
            } else if message.is_expired(now) {
                tracing::info!(id = %message.id, "expired before delivery; dropped");
                ack.push(message.id);
            } else {
                fresh.push(message);
            }
        }
    }
    let (written, failure) =
        crate::shortage::longest_prefix(&fresh, |prefix| write_batch(agent, prefix));
    let rest = &fresh[written..];
    ack.extend(fresh[..written].iter().map(|m| m.id));
    Batch {
        ack,
        written,
        unwritten: rest.len(),
        head: rest.first().map(|m| (m.id, m.to_json().len())),
        failure,
    }
}

/// One group commit: inbox files written and flushed, renamed into place, ledger records
/// appended, then renames and records flushed together. Whole or nothing: on failure the
/// files it wrote are removed (unless the ledger already records them), and the error says
/// how many files were written before it.
fn write_batch(agent: &Agent, messages: &[Message]) -> Result<(), (Error, usize)> {
    let inbox = agent.config().inbox_dir();
    let mut commit = Commit::new();
    commit.touch_dir(&inbox);
    let mut temps: Vec<PathBuf> = Vec::with_capacity(messages.len());
    let mut bytes = 0;
    for message in messages {
        let json = message.to_json();
        bytes += json.len();
        match commit.write_temp(&inbox, &message.file_name(), &json) {
            Ok(temp) => temps.push(temp),
            Err(err) => {
                remove_all(&temps);
                return Err((err, temps.len()));
            }
        }
    }
    let mut placed: Vec<PathBuf> = Vec::with_capacity(messages.len());
    let mut recorded = false;
    let result = (|| -> Result<()> {
        commit.sync_data()?;
        for (message, temp) in messages.iter().zip(&temps) {
            let target = inbox.join(message.file_name());
            fs::rename(temp, &target).ctx("rename into place", &target)?;
            placed.push(target);
        }
        let records: Vec<Record> = messages
            .iter()
            .map(|m| Record::Delivered {
                id: m.id,
                file: m.file_name(),
                kind: m.kind.clone(),
            })
            .collect();
        let mut ledger = agent.ledger();
        ledger.append(&records)?;
        recorded = true;
        commit.add_file(ledger.path())?;
        drop(ledger);
        commit.sync()
    })();
    if let Err(err) = result {
        remove_all(&temps[placed.len()..]);
        // Files the ledger does not know would be written again when the hub offers them
        // again; one a consumer took meanwhile would then arrive twice. Once recorded,
        // they stay: the ledger says they are delivered.
        if !recorded {
            remove_all(&placed);
        }
        return Err((err, messages.len()));
    }
    agent.hand_over(messages, bytes);
    tracing::info!(count = messages.len(), "delivered to inbox");
    for message in messages {
        tracing::debug!(id = %message.id, r#type = %message.kind, source = %message.source, "delivered to inbox");
    }
    Ok(())
}
