//! Hub → inbox: a long-poll brings this host's next messages as soon as the hub has them.
//! Each pulled batch is written with one group commit (inbox files and their ledger records
//! made durable together), then acknowledged with one ack. An id the ledger already knows is
//! acknowledged without being written again; an expired message is acknowledged and
//! dropped. When the inbox cannot be written (a full disk), nothing is acknowledged and the
//! hub offers the batch again later.

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
use crate::error::{IoContext, Result};
use crate::message::Message;
use crate::service::Heartbeat;
use crate::service::liveness::DISK_BOUND;
use crate::spool::Commit;

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
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The puller loop.
pub async fn run(agent: Arc<Agent>, heartbeat: Heartbeat) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let host = agent.config().host_id.clone();
    loop {
        let wait = long_poll(agent.config().http_timeout);
        let client = agent.client();
        // The hub holds the poll up to `wait`; the client gives up one timeout later.
        heartbeat.busy_for(wait.saturating_add(client.timeout()));
        let pulled = tokio::select! {
            pulled = client.pull(&host, wait, MAX_PULL) => pulled,
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
        let ack_ids = match delivered {
            Ok(Ok(ids)) => ids,
            Ok(Err(err)) => {
                let delay = backoff.next_delay();
                tracing::error!(%err, retry_in = ?delay, "cannot write the inbox; not acknowledging, the hub keeps the messages");
                if sleep_or_shutdown(&agent, &heartbeat, delay).await {
                    return;
                }
                continue;
            }
            Err(err) => {
                tracing::error!(%err, "inbox write task failed");
                continue;
            }
        };
        backoff.reset();
        agent.hooks_wake.notify_one();
        let started = std::time::Instant::now();
        let client = agent.client();
        heartbeat.busy_for(client.timeout());
        let acked = client.ack(&host, &ack_ids).await;
        tracing::debug!(took = ?started.elapsed(), "ack");
        if let Err(err) = acked {
            // The messages are durable here; the hub will offer them again and the ledger
            // recognises them.
            tracing::warn!(%err, "ack failed; the hub will offer these messages again");
        }
    }
}

/// Sleeps; true when shutdown came first.
async fn sleep_or_shutdown(agent: &Agent, heartbeat: &Heartbeat, delay: Duration) -> bool {
    heartbeat.busy_for(delay);
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = agent.shutdown.cancelled() => true,
    }
}

/// Writes a pulled batch into the inbox; returns every id to acknowledge.
fn deliver(agent: &Agent, values: Vec<Value>) -> Result<Vec<Uuid>> {
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
            ack.push(message.id);
            if ledger.is_delivered(&message.id) || !seen.insert(message.id) {
                tracing::debug!(id = %message.id, "already delivered; acknowledging again");
            } else if message.is_expired(now) {
                tracing::info!(id = %message.id, "expired before delivery; dropped");
            } else {
                fresh.push(message);
            }
        }
    }
    if !fresh.is_empty() {
        write_batch(agent, &fresh)?;
    }
    Ok(ack)
}

/// One group commit: inbox files written and flushed, renamed into place, ledger records
/// appended, then renames and records flushed together.
fn write_batch(agent: &Agent, messages: &[Message]) -> Result<()> {
    let inbox = agent.config().inbox_dir();
    let mut commit = Commit::new();
    commit.touch_dir(&inbox);
    let mut temps: Vec<PathBuf> = Vec::with_capacity(messages.len());
    let result = (|| -> Result<()> {
        for message in messages {
            temps.push(commit.write_temp(&inbox, &message.file_name(), &message.to_json())?);
        }
        commit.sync_data()?;
        for (message, temp) in messages.iter().zip(&temps) {
            let target = inbox.join(message.file_name());
            fs::rename(temp, &target).ctx("rename into place", &target)?;
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
        commit.add_file(ledger.path())?;
        drop(ledger);
        commit.sync()
    })();
    if let Err(err) = result {
        for temp in &temps {
            let _ = fs::remove_file(temp);
        }
        return Err(err);
    }
    for message in messages {
        tracing::info!(id = %message.id, r#type = %message.kind, source = %message.source, "delivered to inbox");
    }
    Ok(())
}
