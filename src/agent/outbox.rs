//! Outbox → hub: every file in `outbox/` is sent, highest priority first and oldest first,
//! in batches; the hub's answer moves each to `sent/` or, for a permanent refusal, to
//! `failed/` with the reason beside it. While the hub cannot take messages (unreachable,
//! 5xx, 429, 507) they stay in `outbox/` and the loop backs off; nothing needs a manual retry.
//!
//! A file dropped by hand may hold only `type` and `payload`. Before it is sent, it is
//! completed (id, source, time...) and rewritten in place atomically, so a retry after a
//! crash sends the same id and the hub recognises it.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use notify::{EventKind, RecursiveMode, Watcher};
use serde_json::Value;
use tokio::sync::Notify;

use super::Agent;
use super::backoff::Backoff;
use crate::client::{HubError, is_transient_status};
use crate::config::Config;
use crate::error::{IoContext, Result};
use crate::message::Message;
use crate::spool;

/// Most messages per POST.
const MAX_BATCH: usize = 256;
/// Most bytes of messages per POST (the hub takes at least 8 MiB).
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// An unparsable file younger than this may still be being written: look again later
/// instead of failing it.
const WRITE_GRACE: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The suffix of the file beside a failed message that says why it failed.
pub const REASON_SUFFIX: &str = ".reason";

/// A message ready to send, and the outbox file it came from.
struct Ready {
    file: String,
    message: Message,
}

/// How a pass over the outbox ended.
enum Pass {
    /// Everything was handled.
    Done,
    /// Some files may still be being written; look again soon.
    Soon,
    /// The hub could not take messages; they wait in the outbox.
    Transient(HubError),
}

/// Writes a message into `outbox/` atomically and durably (what `mesync send` does).
pub fn put(config: &Config, message: &Message) -> Result<()> {
    let outbox = config.outbox_dir();
    spool::ensure_dir(&outbox)?;
    spool::write_atomic(&outbox, &message.file_name(), &message.to_json())
}

/// Watches `outbox/` and wakes the sender on every new file. Returns the watcher, which
/// must be kept alive; `None` (with a warning) where no watcher can be set up, leaving the
/// periodic scan alone.
pub fn watch(dir: &Path, wake: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    let handler = move |event: notify::Result<notify::Event>| match event {
        Ok(event) if matches!(event.kind, EventKind::Remove(_) | EventKind::Access(_)) => {}
        // Anything else, errors and queue overflows included, is worth a look.
        _ => wake.notify_one(),
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(err) => {
            tracing::warn!(%err, "no file watcher; new outbox files wait for the periodic scan");
            return None;
        }
    };
    if let Err(err) = watcher.watch(dir, RecursiveMode::NonRecursive) {
        tracing::warn!(%err, dir = %dir.display(), "cannot watch outbox/; relying on the periodic scan");
        return None;
    }
    Some(watcher)
}

/// The sender loop.
pub async fn run(agent: Arc<Agent>) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        let pass = send_pass(&agent).await;
        let (wait, wake_early) = match pass {
            Pass::Done => {
                backoff.reset();
                (agent.config.poll_interval, true)
            }
            Pass::Soon => (WRITE_GRACE.min(agent.config.poll_interval), true),
            Pass::Transient(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(%err, retry_in = ?delay, "hub cannot take messages now; they stay in outbox/");
                agent.hub_result(Err(err.to_string()));
                (delay, false)
            }
        };
        if agent.shutdown.is_cancelled() {
            return;
        }
        tokio::select! {
            _ = agent.outbox_wake.notified(), if wake_early => {}
            _ = tokio::time::sleep(wait) => {}
            _ = agent.shutdown.cancelled() => return,
        }
    }
}

/// Sends everything in the outbox now, batch by batch.
async fn send_pass(agent: &Arc<Agent>) -> Pass {
    let config = agent.config.clone();
    let scanned = tokio::task::spawn_blocking(move || scan(&config)).await;
    let (mut ready, soon) = match scanned {
        Ok(Ok(scanned)) => scanned,
        Ok(Err(err)) => {
            tracing::error!(%err, "cannot read outbox/");
            return Pass::Soon;
        }
        Err(err) => {
            tracing::error!(%err, "outbox scan failed");
            return Pass::Soon;
        }
    };
    ready.sort_by(|a, b| a.message.send_order(&b.message));
    let mut rest = ready.as_slice();
    while !rest.is_empty() {
        if agent.shutdown.is_cancelled() {
            return Pass::Done;
        }
        let take = batch_len(rest);
        let (batch, tail) = rest.split_at(take);
        rest = tail;
        if let Err(err) = send_batch(agent, batch).await {
            return Pass::Transient(err);
        }
    }
    if soon { Pass::Soon } else { Pass::Done }
}

/// How many of `ready` go into the next batch: up to [`MAX_BATCH`] messages and
/// [`MAX_BATCH_BYTES`], at least one.
fn batch_len(ready: &[Ready]) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for item in ready.iter().take(MAX_BATCH) {
        bytes += item.message.to_json().len();
        if n > 0 && bytes > MAX_BATCH_BYTES {
            break;
        }
        n += 1;
    }
    n.max(1)
}

/// Sends one batch and files each message by the hub's answer. A batch refused as a whole
/// for a permanent reason is split, so one bad message cannot block the others.
async fn send_batch(agent: &Arc<Agent>, batch: &[Ready]) -> Result<(), HubError> {
    let body = batch_body(batch);
    match agent.client.send(body).await {
        Ok((status, reply)) => {
            agent.hub_result(Ok(()));
            let mut sent: Vec<(String, String)> = Vec::new();
            let mut failed: Vec<(String, String)> = Vec::new();
            let mut transient = None;
            for item in batch {
                let id = item.message.id;
                if reply.accepted.contains(&id) || reply.duplicates.contains(&id) {
                    tracing::info!(%id, r#type = %item.message.kind, "sent");
                    sent.push((item.file.clone(), item.message.file_name()));
                } else if let Some(r) = reply.rejected.iter().find(|r| r.id == Some(id)) {
                    if is_transient_status(r.status) {
                        transient = Some(HubError::Status {
                            status: r.status,
                            message: r.error.clone(),
                        });
                    } else {
                        failed.push((
                            item.file.clone(),
                            format!("hub refused it ({}): {}", r.status, r.error),
                        ));
                    }
                }
            }
            let config = agent.config.clone();
            let filed =
                tokio::task::spawn_blocking(move || file_results(&config, sent, failed)).await;
            if let Ok(Err(err)) = filed {
                tracing::error!(%err, "cannot move sent messages out of outbox/; they will be sent again and recognised as duplicates");
            }
            match transient {
                Some(err) => Err(err),
                None if status != 200 => Err(HubError::Status {
                    status,
                    message: "batch partly refused".into(),
                }),
                None => Ok(()),
            }
        }
        Err(err) if err.is_transient() => Err(err),
        Err(err) if batch.len() > 1 => {
            tracing::warn!(%err, messages = batch.len(), "batch refused; sending its messages one by one");
            for item in batch {
                Box::pin(send_batch(agent, std::slice::from_ref(item))).await?;
            }
            Ok(())
        }
        Err(err) => {
            agent.hub_result(Ok(()));
            let item = &batch[0];
            let config = agent.config.clone();
            let failed = vec![(item.file.clone(), format!("hub refused it: {err}"))];
            let _ = tokio::task::spawn_blocking(move || file_results(&config, Vec::new(), failed))
                .await;
            Ok(())
        }
    }
}

fn batch_body(batch: &[Ready]) -> Bytes {
    let mut body = Vec::with_capacity(batch.len() * 400 + 16);
    body.extend_from_slice(b"{\"messages\":[");
    for (i, item) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&item.message.to_json());
    }
    body.extend_from_slice(b"]}");
    Bytes::from(body)
}

/// Moves sent files to `sent/` (under their canonical names) and refused ones to `failed/`.
fn file_results(
    config: &Config,
    sent: Vec<(String, String)>,
    failed: Vec<(String, String)>,
) -> Result<()> {
    let outbox = config.outbox_dir();
    let sent_dir = config.sent_dir();
    // Not flushed: if the move is lost in a crash, the file is sent again and the hub
    // answers "duplicate", which files it here again.
    for (file, name) in sent {
        match spool::move_file(&outbox.join(&file), &sent_dir, &name, false) {
            Ok(_) => {}
            Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    for (file, reason) in failed {
        move_to_failed(config, &file, &reason)?;
    }
    Ok(())
}

/// Moves `outbox/<file>` to `failed/` with a `<file>.reason` beside it.
pub fn move_to_failed(config: &Config, file: &str, reason: &str) -> Result<()> {
    let failed = config.failed_dir();
    let mut name = file.to_string();
    let mut n = 1;
    while failed.join(&name).exists() {
        name = format!("{file}.{n}");
        n += 1;
    }
    spool::move_file(&config.outbox_dir().join(file), &failed, &name, true)?;
    spool::write_atomic(
        &failed,
        &format!("{name}{REASON_SUFFIX}"),
        format!("{reason}\n").as_bytes(),
    )?;
    tracing::warn!(file = %name, %reason, "message moved to failed/");
    Ok(())
}

/// Reads the outbox: the messages ready to send, and whether a file is worth another look
/// soon. Invalid files go to `failed/`; hand-dropped ones are completed in place.
fn scan(config: &Config) -> Result<(Vec<Ready>, bool)> {
    let outbox = config.outbox_dir();
    let mut ready = Vec::new();
    let mut soon = false;
    for file in spool::list(&outbox)? {
        let path = outbox.join(&file);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).ctx("read", &path),
        };
        match read_message(&bytes, &config.host_id) {
            Ok((message, completed)) => {
                if completed {
                    spool::write_atomic(&outbox, &file, &message.to_json())?;
                    tracing::info!(id = %message.id, %file, "completed a hand-dropped message");
                }
                ready.push(Ready { file, message });
            }
            Err(reason) if is_young(&path) => {
                tracing::debug!(%file, %reason, "unreadable outbox file may still be being written");
                soon = true;
            }
            Err(reason) => move_to_failed(config, &file, &reason)?,
        }
    }
    Ok((ready, soon))
}

/// Parses an outbox file: a full message, or one to complete (then `true`).
fn read_message(bytes: &[u8], host_id: &str) -> Result<(Message, bool), String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let complete = ["id", "source", "created_at", "priority", "target"]
        .iter()
        .all(|key| value.get(key).is_some());
    let message = Message::complete(value, host_id)?;
    Ok((message, !complete))
}

fn is_young(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| {
            SystemTime::now()
                .duration_since(t)
                .is_ok_and(|age| age < WRITE_GRACE)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_files_are_read_or_refused_with_a_reason() {
        let (m, completed) = read_message(br#"{"type":"t","payload":1}"#, "me").unwrap();
        assert!(completed);
        assert_eq!(m.source, "me");
        let full = m.to_json();
        let (again, completed) = read_message(&full, "other").unwrap();
        assert!(!completed);
        assert_eq!(again, m);
        assert!(
            read_message(b"{nope", "me")
                .unwrap_err()
                .contains("not JSON")
        );
        assert!(
            read_message(br#"{"type":"../x","payload":1}"#, "me")
                .unwrap_err()
                .contains("invalid type")
        );
    }
}
