//! Outbox → hub: every file in `outbox/` is sent, highest priority first and oldest first,
//! in batches; the hub's answer moves each to `sent/` or, for a permanent refusal, to
//! `failed/` with the reason beside it. While the hub cannot take messages (unreachable,
//! 5xx, 429, 507) they stay in `outbox/` and the loop backs off; nothing needs a manual retry.
//!
//! A file dropped by hand may hold only `type` and `payload`. Before it is sent, it is
//! completed (id, source, created_at, priority, target) and rewritten in place, atomically
//! and durably, so that a retry after a crash sends the same id and the hub recognises it.
//! Every file completed in one scan is rewritten in one group commit ([`spool::publish`]:
//! temporary files, one flush, renames over the hand-dropped files, one flush), up to
//! [`MAX_BATCH`] at a time, and only then is any of them sent: a backlog of hand-dropped
//! files costs two flushes per thousand, not two per file.
//!
//! Why the completion is written down rather than derived from the file as it lies on disk
//! (an id hashed from its name, inode, times and contents would need no write at all): a
//! derived id is only as stable as what it is derived from. A `chmod`, a `touch` or a
//! backup tool's extended attribute changes the times, and a retry would send a new id (a
//! duplicate in the receiver's inbox); a script that drops the same `heartbeat.json` again
//! once the last one was purged from `sent/` can get the same inode, name and contents
//! back, and the hub would drop the new message as a duplicate of the old. A random id,
//! written into the file before it is sent, has neither failure, and the file stays the
//! one truth about the message (`cat` shows what was sent).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

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
use crate::service::Heartbeat;
use crate::service::liveness::DISK_BOUND;
use crate::spool;

/// Most messages per POST.
const MAX_BATCH: usize = 1000;
/// Most bytes of messages per POST (the hub takes at least 8 MiB).
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// An unparsable file younger than this may still be being written: look again later
/// instead of failing it.
const WRITE_GRACE: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The suffix of the file beside a failed message that says why it failed.
pub const REASON_SUFFIX: &str = ".reason";

/// A message ready to send, the outbox file it came from, and its JSON.
struct Ready {
    file: String,
    message: Message,
    json: Vec<u8>,
}

/// The outbox files read so far, by name. Each file is read and parsed once, however often
/// the outbox is scanned while a backlog drains.
type Known = HashMap<String, Arc<Ready>>;

/// What the sender keeps between passes over `outbox/`.
#[derive(Default)]
struct Outbox {
    /// The files read so far, ready to send.
    known: Known,
    /// Files that could not be read as messages yet but may still be being written: read
    /// again at the next pass, without waiting for the watcher to name them again.
    recheck: Vec<String>,
    /// True once every completion renamed into `outbox/` is known to be durable. False at
    /// start, since a previous run may have died between its renames and their flush, and
    /// after a completion that failed half-way; an fsync of the directory (the data was
    /// flushed before the renames) sets it before anything is read and sent.
    renames_durable: bool,
}

/// How a pass over the outbox ended.
enum Pass {
    /// Everything was handled.
    Done,
    /// Some files may still be being written; look again soon.
    Soon,
    /// The hub could not take (some) messages; they wait in the outbox. `progress`: it took
    /// others in this pass (a hub short of space storing what fits), so the next try need
    /// not wait long.
    Transient { err: HubError, progress: bool },
}

/// Writes a message into `outbox/` atomically and durably (what `mesync send` does).
pub fn put(config: &Config, message: &Message) -> Result<()> {
    let outbox = config.outbox_dir();
    spool::ensure_dir(&outbox)?;
    spool::write_atomic(&outbox, &message.file_name(), &message.to_json())
}

/// What the file watcher tells the sender: the names of files that appeared, or that it
/// lost track (a queue overflow) and the whole directory must be read again.
#[derive(Default)]
pub struct OutboxEvents {
    wake: Notify,
    names: Mutex<Vec<String>>,
    rescan: AtomicBool,
    /// False until a watcher runs: without one, every pass reads the whole directory.
    watching: AtomicBool,
}

impl OutboxEvents {
    fn note(&self, event: notify::Result<notify::Event>) {
        match event {
            Ok(event) if event.need_rescan() => {
                tracing::warn!(
                    "the file watcher lost track (queue overflow); reading outbox/ again"
                );
                self.rescan.store(true, Ordering::SeqCst);
            }
            Ok(event) => match event.kind {
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Any | EventKind::Other => {
                    let names = event
                        .paths
                        .iter()
                        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
                        .filter(|n| !n.starts_with('.'));
                    self.names
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(names);
                }
                EventKind::Remove(_) | EventKind::Access(_) => return,
            },
            Err(err) => {
                tracing::warn!(%err, "file watcher error; reading outbox/ again");
                self.rescan.store(true, Ordering::SeqCst);
            }
        }
        self.wake.notify_one();
    }

    fn take_names(&self) -> Vec<String> {
        std::mem::take(&mut *self.names.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Watches `outbox/`, feeding `events`. Returns the watcher, which must be kept alive;
/// `None` (with a warning) where no watcher can be set up, leaving the periodic scan alone.
pub fn watch(dir: &Path, events: Arc<OutboxEvents>) -> Option<notify::RecommendedWatcher> {
    let feed = Arc::clone(&events);
    let mut watcher = match notify::recommended_watcher(move |e| feed.note(e)) {
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
    events.watching.store(true, Ordering::SeqCst);
    Some(watcher)
}

/// The sender loop. A pass reads the files the watcher named; the whole directory is read
/// at the first pass, at least every `poll_interval`, and whenever the watcher lost track
/// (reading a directory of thousands of files on every event would cost more than sending
/// them).
pub async fn run(agent: Arc<Agent>, heartbeat: Heartbeat) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut outbox = Outbox::default();
    let mut last_full_scan: Option<Instant> = None;
    loop {
        let events = &agent.outbox_events;
        let full = !events.watching.load(Ordering::SeqCst)
            || events.rescan.swap(false, Ordering::SeqCst)
            || last_full_scan.is_none_or(|t| t.elapsed() >= agent.config().poll_interval);
        let names = if full {
            last_full_scan = Some(Instant::now());
            events.take_names();
            None
        } else {
            Some(events.take_names())
        };
        let pass = send_pass(&agent, &heartbeat, &mut outbox, names).await;
        let (wait, wake_early) = match pass {
            Pass::Done => {
                backoff.reset();
                (agent.config().poll_interval, true)
            }
            Pass::Soon => (WRITE_GRACE.min(agent.config().poll_interval), true),
            Pass::Transient { err, progress } => {
                if progress {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(%err, retry_in = ?delay, "hub cannot take messages now; they stay in outbox/");
                agent.hub_result(Err(err.to_string()));
                (delay, false)
            }
        };
        if agent.shutdown.is_cancelled() {
            return;
        }
        heartbeat.busy_for(wait);
        tokio::select! {
            _ = agent.outbox_events.wake.notified(), if wake_early => {}
            _ = agent.reloaded.notified(), if wake_early => {}
            _ = tokio::time::sleep(wait) => {}
            _ = agent.shutdown.cancelled() => return,
        }
    }
}

/// Sends everything in the outbox now, batch by batch.
async fn send_pass(
    agent: &Arc<Agent>,
    heartbeat: &Heartbeat,
    outbox: &mut Outbox,
    names: Option<Vec<String>>,
) -> Pass {
    let config = agent.config();
    let mut state = std::mem::take(outbox);
    let scanning = heartbeat.clone();
    let full = names.is_none();
    let scanned = tokio::task::spawn_blocking(move || {
        let soon = scan(&config, &mut state, names, &scanning);
        (state, soon)
    })
    .await;
    let soon = match scanned {
        Ok((state, Ok((soon, deferred)))) => {
            *outbox = state;
            note_deferred(agent, &deferred, full);
            // What was read is sent all the same; the rest is looked at again soon.
            soon || !deferred.is_empty()
        }
        Ok((state, Err(err))) => {
            *outbox = state;
            note_deferred(agent, std::slice::from_ref(&err), false);
            true
        }
        Err(err) => {
            // The state went with the task: start again from the directory.
            tracing::error!(%err, "outbox scan failed");
            return Pass::Soon;
        }
    };
    let known = &mut outbox.known;
    let mut ready: Vec<Arc<Ready>> = known.values().cloned().collect();
    ready.sort_by(|a, b| a.message.send_order(&b.message));
    let mut rest = ready.as_slice();
    let mut result = if soon { Pass::Soon } else { Pass::Done };
    // The files of one batch are moved out of outbox/ while the next batch is on the wire.
    let mut filing: Option<tokio::task::JoinHandle<Filing>> = None;
    let mut progress = false;
    while !rest.is_empty() {
        if agent.shutdown.is_cancelled() {
            break;
        }
        let take = batch_len(rest);
        let (batch, tail) = rest.split_at(take);
        rest = tail;
        let mut answered = Filing::default();
        let sent = send_batch(agent, heartbeat, batch, &mut answered).await;
        progress |= !answered.sent.is_empty();
        if let Some(previous) = filing.take() {
            heartbeat.busy_for(DISK_BOUND);
            forget_filed(known, previous.await);
        }
        let config = agent.config();
        filing = Some(tokio::task::spawn_blocking(move || answered.file(&config)));
        if let Err(err) = sent {
            result = Pass::Transient { err, progress };
            break;
        }
    }
    if let Some(last) = filing {
        heartbeat.busy_for(DISK_BOUND);
        forget_filed(known, last.await);
    }
    result
}

/// Reports what a scan left for later: a shortage once per directory, anything else each
/// time. A full scan that left nothing ends the shortages of `outbox/` and `failed/`.
fn note_deferred(agent: &Agent, deferred: &[crate::error::Error], full: bool) {
    let config = agent.config();
    let mut short = Vec::new();
    for err in deferred {
        match err.shortage() {
            Some(resource) => {
                let dir = err.dir().unwrap_or_else(|| config.outbox_dir());
                agent.note_shortage(&dir, resource, "cannot handle an outbox file");
                short.push(dir);
            }
            None => tracing::error!(%err, "cannot handle an outbox file; trying again soon"),
        }
    }
    if full {
        for dir in [config.outbox_dir(), config.failed_dir()] {
            if !short.contains(&dir) {
                agent.clear_shortage(&dir);
            }
        }
    }
}

/// Forgets the files that left the outbox; what stays is tried again.
fn forget_filed(known: &mut Known, filed: Result<Filing, tokio::task::JoinError>) {
    if let Ok(filed) = filed {
        for name in filed
            .sent
            .iter()
            .map(|(f, _)| f)
            .chain(filed.failed.iter().map(|(f, _)| f))
        {
            known.remove(name);
        }
    }
}

/// Where the hub's answers send outbox files: `sent` (file, name in sent/) and `failed`
/// (file, reason).
#[derive(Default)]
struct Filing {
    sent: Vec<(String, String)>,
    failed: Vec<(String, String)>,
}

impl Filing {
    /// Moves the files; returns what was moved (a file that could not be is left out, so it
    /// stays known and is sent again, and the hub answers "duplicate").
    fn file(mut self, config: &Config) -> Filing {
        let outbox = config.outbox_dir();
        let sent_dir = config.sent_dir();
        // Not flushed: if a move is lost in a crash, the file is sent again and the hub
        // answers "duplicate", which files it here again.
        self.sent.retain(|(file, name)| {
            match spool::move_file(&outbox.join(file), &sent_dir, name, false) {
                Ok(_) => true,
                Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => true,
                Err(err) => {
                    tracing::error!(%err, "cannot move a sent message out of outbox/");
                    false
                }
            }
        });
        self.failed.retain(
            |(file, reason)| match move_to_failed(config, file, reason) {
                Ok(()) => true,
                Err(err) => {
                    tracing::error!(%err, "cannot move a refused message to failed/");
                    false
                }
            },
        );
        self
    }
}

/// How many of `ready` go into the next batch: up to [`MAX_BATCH`] messages and
/// [`MAX_BATCH_BYTES`], at least one.
fn batch_len(ready: &[Arc<Ready>]) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for item in ready.iter().take(MAX_BATCH) {
        bytes += item.json.len();
        if n > 0 && bytes > MAX_BATCH_BYTES {
            break;
        }
        n += 1;
    }
    n.max(1)
}

/// Sends one batch and notes in `filing` where the hub's answer sends each message. A
/// batch refused as a whole for a permanent reason is split, so one bad message cannot
/// block the others.
async fn send_batch(
    agent: &Arc<Agent>,
    heartbeat: &Heartbeat,
    batch: &[Arc<Ready>],
    filing: &mut Filing,
) -> Result<(), HubError> {
    let body = batch_body(batch);
    let client = agent.client();
    heartbeat.busy_for(client.timeout());
    match client.send(body).await {
        Ok((status, reply)) => {
            agent.hub_result(Ok(()));
            let mut transient = None;
            // Looked up once per message of a batch of up to a thousand.
            let taken: HashSet<&uuid::Uuid> =
                reply.accepted.iter().chain(&reply.duplicates).collect();
            let filed_before = filing.sent.len();
            for item in batch {
                let id = item.message.id;
                if taken.contains(&id) {
                    // One line per batch at info (below); each id at debug.
                    tracing::debug!(%id, r#type = %item.message.kind, "sent");
                    filing
                        .sent
                        .push((item.file.clone(), item.message.file_name()));
                } else if let Some(r) = reply.rejected.iter().find(|r| r.id == Some(id)) {
                    if is_transient_status(r.status) {
                        transient = Some(HubError::Status {
                            status: r.status,
                            message: r.error.clone(),
                        });
                    } else {
                        filing.failed.push((
                            item.file.clone(),
                            format!("hub refused it ({}): {}", r.status, r.error),
                        ));
                    }
                }
            }
            let sent = filing.sent.len() - filed_before;
            if sent > 0 {
                tracing::info!(
                    messages = sent,
                    duplicates = reply.duplicates.len(),
                    "sent a batch"
                );
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
                Box::pin(send_batch(
                    agent,
                    heartbeat,
                    std::slice::from_ref(item),
                    filing,
                ))
                .await?;
            }
            Ok(())
        }
        Err(err) => {
            agent.hub_result(Ok(()));
            filing
                .failed
                .push((batch[0].file.clone(), format!("hub refused it: {err}")));
            Ok(())
        }
    }
}

fn batch_body(batch: &[Arc<Ready>]) -> Bytes {
    let size = batch.iter().map(|r| r.json.len() + 1).sum::<usize>() + 16;
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(b"{\"messages\":[");
    for (i, item) in batch.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&item.json);
    }
    body.extend_from_slice(b"]}");
    Bytes::from(body)
}

/// Moves `outbox/<file>` to `failed/` with a `<file>.reason` beside it.
pub fn move_to_failed(config: &Config, file: &str, reason: &str) -> Result<()> {
    let failed = config.failed_dir();
    // A file whose name ends in `.reason` would pass for the reason of another.
    let base = match file.strip_suffix(REASON_SUFFIX) {
        Some(stem) => format!("{stem}.reason-file"),
        None => file.to_string(),
    };
    let mut name = base.clone();
    let mut n = 1;
    while failed.join(&name).exists() || failed.join(format!("{name}{REASON_SUFFIX}")).exists() {
        name = format!("{base}.{n}");
        n += 1;
    }
    // The reason first: whoever sees the message in failed/ (`mesync list failed`) finds
    // why beside it. A crash in between leaves a reason without its message, harmless.
    let reason_name = format!("{name}{REASON_SUFFIX}");
    spool::write_atomic(&failed, &reason_name, format!("{reason}\n").as_bytes())?;
    if let Err(err) = spool::move_file(&config.outbox_dir().join(file), &failed, &name, true) {
        let _ = std::fs::remove_file(failed.join(&reason_name));
        return Err(err);
    }
    tracing::warn!(file = %name, %reason, "message moved to failed/");
    Ok(())
}

/// Reads outbox files not read before into `outbox.known`: the files `names` (from the
/// watcher) and those to look at again, or, when `None`, every file of the directory,
/// forgetting files that are gone. Returns whether a file is worth another look soon.
/// Invalid files go to `failed/`; hand-dropped ones are completed in place (see
/// [`complete`]) before they are known, so nothing is sent under an id that is not durable.
fn scan(
    config: &Config,
    outbox: &mut Outbox,
    names: Option<Vec<String>>,
    heartbeat: &Heartbeat,
) -> Result<(bool, Vec<crate::error::Error>)> {
    let dir = config.outbox_dir();
    // Each file is a step of its own: a backlog of thousands takes as long as it takes.
    heartbeat.busy_for(DISK_BOUND);
    let mut names = match names {
        Some(mut names) => {
            names.append(&mut outbox.recheck);
            names
        }
        None => {
            outbox.recheck.clear();
            let names = spool::list(&dir)?;
            let present: HashSet<&String> = names.iter().collect();
            outbox.known.retain(|name, _| present.contains(name));
            names
        }
    };
    // The watcher names a file once per event (created, written, closed, renamed).
    let mut seen = HashSet::with_capacity(names.len());
    names.retain(|name| !outbox.known.contains_key(name) && seen.insert(name.clone()));
    if !outbox.renames_durable {
        if let Err(err) = spool::sync_dir(&dir) {
            outbox.recheck.extend(names);
            return Err(err);
        }
        outbox.renames_durable = true;
    }
    let mut completed = Vec::new();
    let mut deferred = Vec::new();
    for file in names {
        heartbeat.busy_for(DISK_BOUND);
        match read_file(config, &dir, &file) {
            Ok(Read::Message(ready, false)) => {
                outbox.known.insert(file, ready);
            }
            Ok(Read::Message(ready, true)) => completed.push(ready),
            Ok(Read::Young) => outbox.recheck.push(file),
            Ok(Read::Skip) => {}
            // Out of descriptors, or no room in failed/ for its reason: this file is read
            // again at the next pass, and the others go on. One file that cannot be handled
            // now must not hold up the rest.
            Err(err) => {
                tracing::debug!(%err, %file, "outbox file left for the next pass");
                outbox.recheck.push(file);
                deferred.push(err);
            }
        }
    }
    deferred.extend(complete(&dir, outbox, completed, heartbeat));
    Ok((!outbox.recheck.is_empty(), deferred))
}

/// What reading one outbox file gave.
enum Read {
    /// A valid message, and whether it was completed (a hand-dropped file, to rewrite).
    Message(Arc<Ready>, bool),
    /// Not a message yet, but young enough to be still being written.
    Young,
    /// Nothing to send: gone, a directory, or moved to `failed/`.
    Skip,
}

fn read_file(config: &Config, dir: &Path, file: &str) -> Result<Read> {
    let path = dir.join(file);
    let bytes = match spool::read_regular(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Read::Skip),
        Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {
            tracing::debug!(%file, "ignoring a directory in outbox/");
            return Ok(Read::Skip);
        }
        // A named pipe, a socket, a device: nothing to send, and reading one could hang
        // the sender (a pipe without a writer) or never end (a device).
        Err(e) if e.kind() == spool::NOT_REGULAR => {
            move_to_failed(config, file, &e.to_string())?;
            return Ok(Read::Skip);
        }
        Err(e) => return Err(e).ctx("read", &path),
    };
    match read_message(&bytes, &config.host_id) {
        Ok((message, completed)) => {
            let json = message.to_json();
            let ready = Ready {
                file: file.to_string(),
                message,
                json,
            };
            Ok(Read::Message(Arc::new(ready), completed))
        }
        // A JSON object is never valid before its last byte is written, so a file being
        // written (in place, against the README's advice to rename it into place) reads
        // as invalid until it is whole: only its age tells it from a broken file.
        Err(reason) if is_young(&path) => {
            tracing::debug!(%file, %reason, "unreadable outbox file may still be being written");
            Ok(Read::Young)
        }
        Err(reason) => {
            move_to_failed(config, file, &reason)?;
            Ok(Read::Skip)
        }
    }
}

/// Rewrites the completed hand-dropped files over themselves, up to [`MAX_BATCH`] in one
/// group commit, and makes them known (ready to send) once that commit is durable. If a
/// script renames another file over the same name between the read and the completion's
/// rename, the completion replaces it: a name reused before its file has left `outbox/`
/// loses one of the two, as the script's own `mv` over the unsent file would have.
///
/// A commit that fails leaves each of its files whole, either as dropped (completed again,
/// with a new id, at the next pass: none was sent) or completed but maybe not durable (the
/// directory is flushed again before anything is sent: see [`Outbox::renames_durable`]).
///
/// Short of space, the longest prefix that fits is completed (and sent); the rest waits
/// for the next pass. Returns the errors that left files uncompleted.
fn complete(
    dir: &Path,
    outbox: &mut Outbox,
    completed: Vec<Arc<Ready>>,
    heartbeat: &Heartbeat,
) -> Vec<crate::error::Error> {
    let mut errors = Vec::new();
    for chunk in completed.chunks(MAX_BATCH) {
        heartbeat.busy_for(DISK_BOUND);
        let files: Vec<spool::NewFile<'_>> = chunk
            .iter()
            .map(|ready| spool::NewFile {
                dir,
                name: &ready.file,
                bytes: &ready.json,
            })
            .collect();
        let (done, failure) = crate::shortage::longest_prefix(&files, |prefix| {
            spool::publish(prefix).map_err(|e| (e, prefix.len()))
        });
        if done > 0 {
            tracing::info!(messages = done, "completed hand-dropped messages");
        }
        for ready in &chunk[..done] {
            tracing::debug!(id = %ready.message.id, file = %ready.file, "completed a hand-dropped message");
            outbox.known.insert(ready.file.clone(), Arc::clone(ready));
        }
        if let Some(err) = failure {
            tracing::debug!(%err, messages = chunk.len() - done, "cannot complete hand-dropped messages yet");
            outbox.renames_durable = false;
            outbox
                .recheck
                .extend(chunk[done..].iter().map(|ready| ready.file.clone()));
            errors.push(err);
        }
    }
    errors
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
