//! The hub's store: the [`Store`] operations the HTTP layer needs, and [`FileStore`], which
//! keeps everything as files in the data dir.
//!
//! Layout of the data dir:
//!
//! ```text
//! hosts/<host>.json                     registry: one file per registered host
//! queues/<host>/<P>-<seq>-<uuid>.json   a host's pending messages (P: 0 high, 1 normal, 2 low)
//! accepted.log                          ids accepted so far, one per line (deduplication)
//! staging/                              data of a commit in progress; emptied at start-up
//! spare/                                files of delivered messages, kept for reuse
//! ```
//!
//! `ls queues/HOST` lists a host's queue in delivery order. A broadcast is written once and
//! hard-linked into each recipient's queue.
//!
//! Accepting messages is a group commit run by one thread: every message that arrives while a
//! commit is in progress goes into the next one, so many messages share one flush, and an
//! idle hub commits a lone message at once (no timer). A commit:
//!
//! 1. writes each message to `staging/` and flushes the data;
//! 2. links it into every recipient's queue and appends its id to `accepted.log`, and flushes
//!    again;
//! 3. only then answers the senders and wakes the recipients' long-polls.
//!
//! A crash before step 2's flush may leave some links of a message without its id in
//! `accepted.log`; the sender had no answer and sends again, and the retry links the message
//! into the queues that lack it. A recipient may then see the message twice on the wire,
//! which its agent's inbox ledger absorbs: at least once on the wire, once in the inbox.
//! A queue file whose last link is acknowledged is not deleted but moved to `spare/` and
//! overwritten by a later message: creating and freeing an inode per message costs more
//! than everything else a commit does on some file systems.
//!
//! Acks only unlink queue entries, without a flush: an ack lost in a crash means the message
//! is offered again, and deduplicated again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use uuid::Uuid;

use crate::error::{Error, IoContext, Result};
use crate::message::{Message, Priority, Timestamp, id_from_file_name};
use crate::service::Heartbeat;
use crate::service::liveness::DISK_BOUND;
use crate::shortage::{Resource, Shortages};
use crate::spool::{self, Commit};

/// Most messages one commit takes, so a flood still gets answers in bounded time.
const MAX_COMMIT_MESSAGES: usize = 4096;
/// Most files kept in `spare/` for reuse. Each keeps its inode and its data block (a few
/// KiB of disk): truncating or deleting it would free the block, which costs a discard on
/// file systems mounted with `discard`.
const MAX_SPARE_FILES: usize = 16_384;
/// Free bytes the data dir needs before the health probe calls a lack of space over.
const MIN_FREE_FOR_HEALTH: u64 = 1024 * 1024;
/// Most bytes of pending messages also kept in memory, so that a host that keeps up is
/// served without reading its files back. Beyond this, messages are read from disk.
const MAX_CACHED_BYTES: usize = 64 * 1024 * 1024;

/// What became of one message handed to [`Store::enqueue`].
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    /// Durable in this many recipients' queues.
    Accepted(usize),
    /// This id was accepted before; nothing was fanned out again.
    Duplicate,
    /// Not stored; the status (429, 507, 500) and why. Senders retry these later.
    Refused(u16, String),
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
/// default; another implementation (a shared database) must pass the same tests.
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

/// The file store. Cheap to clone.
#[derive(Clone)]
pub struct FileStore {
    shared: Arc<Shared>,
    committer: mpsc::Sender<CommitJob>,
}

struct Shared {
    dir: PathBuf,
    /// Changed by a reload (SIGHUP).
    max_pending_per_host: AtomicUsize,
    state: Mutex<State>,
    counters: Counters,
    /// The data dir's shortage, while the last commit had to refuse messages for want of a
    /// resource; ended by a commit that stores all it was given, or a health probe that
    /// finds the resource back.
    shortages: Shortages,
    /// Files in `spare/`, ready to be overwritten by new messages.
    spares: Mutex<Vec<PathBuf>>,
    /// Bytes of queue entries that hold their message in memory.
    cached_bytes: AtomicUsize,
}

#[derive(Default)]
struct State {
    hosts: HashMap<String, Host>,
    accepted: HashSet<Uuid>,
    next_seq: u64,
}

/// A host known to the hub: registered, or only the target of messages waiting for it.
struct Host {
    registered_at: Option<DateTime<Utc>>,
    last_seen: Option<DateTime<Utc>>,
    /// When the registry file's mtime was last set to record `last_seen`.
    last_seen_saved: Option<DateTime<Utc>>,
    queue: BTreeMap<(u8, u64), Entry>,
    by_id: HashMap<Uuid, (u8, u64)>,
    notify: Arc<Notify>,
    delivered: u64,
}

impl Host {
    fn new() -> Host {
        Host {
            registered_at: None,
            last_seen: None,
            last_seen_saved: None,
            queue: BTreeMap::new(),
            by_id: HashMap::new(),
            notify: Arc::new(Notify::new()),
            delivered: 0,
        }
    }

    fn insert(&mut self, key: (u8, u64), entry: Entry) {
        self.by_id.insert(entry.id, key);
        self.queue.insert(key, entry);
    }

    fn remove(&mut self, id: &Uuid) -> Option<Entry> {
        let key = self.by_id.remove(id)?;
        self.queue.remove(&key)
    }
}

struct Entry {
    id: Uuid,
    file: String,
    queued_at: SystemTime,
    expires_at: Option<DateTime<Utc>>,
    /// The message, when it is cached in memory (see [`MAX_CACHED_BYTES`]).
    bytes: Option<Bytes>,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    duplicates: AtomicU64,
    delivered: AtomicU64,
    expired: AtomicU64,
    refused_queue_full: AtomicU64,
    refused_storage_full: AtomicU64,
    refused_unavailable: AtomicU64,
    refused_error: AtomicU64,
    commits: AtomicU64,
    removed_hosts: AtomicU64,
    dropped_with_hosts: AtomicU64,
}

struct CommitJob {
    messages: Vec<Message>,
    reply: oneshot::Sender<Vec<Enqueued>>,
}

/// A message the commit thread decided to store.
struct Planned {
    index: usize,
    message_id: Uuid,
    priority: Priority,
    seq: u64,
    expires_at: Option<DateTime<Utc>>,
    recipients: Vec<String>,
    bytes: Vec<u8>,
    /// For the log line that says the message was accepted.
    kind: String,
    source: String,
    target: Option<String>,
}

impl Planned {
    fn queue_name(&self) -> String {
        queue_file_name(self.priority, self.seq, self.message_id)
    }
}

fn queue_file_name(priority: Priority, seq: u64, id: Uuid) -> String {
    format!("{}-{seq:016}-{id}.json", priority.rank())
}

/// `<P>-<seq>-<uuid>.json` back into its parts.
fn parse_queue_file_name(name: &str) -> Option<(u8, u64, Uuid)> {
    let mut parts = name.splitn(3, '-');
    let rank: u8 = parts.next()?.parse().ok()?;
    Priority::from_rank(rank)?;
    let seq: u64 = parts.next()?.parse().ok()?;
    let id = id_from_file_name(name)?;
    Some((rank, seq, id))
}

#[derive(Serialize, Deserialize)]
struct HostRecord {
    host: String,
    registered_at: Timestamp,
}

impl FileStore {
    /// Opens (creating if needed) the store in `dir`, recovers its state from the files and
    /// starts the commit thread, which shows it is alive on `heartbeat`.
    pub fn open(
        dir: &Path,
        max_pending_per_host: usize,
        heartbeat: Heartbeat,
    ) -> Result<FileStore> {
        for sub in ["hosts", "queues", "staging", "spare"] {
            spool::ensure_dir(&dir.join(sub))?;
        }
        clear_dir(&dir.join("staging"))?;
        // Created here, durably, so that commits only ever append to it.
        let log = dir.join("accepted.log");
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .ctx("create", &log)?;
        spool::sync_dir(dir)?;
        let state = recover(dir)?;
        let spare_dir = dir.join("spare");
        let spares: Vec<PathBuf> = spool::list(&spare_dir)?
            .into_iter()
            .map(|name| spare_dir.join(name))
            .collect();
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            max_pending_per_host: AtomicUsize::new(max_pending_per_host),
            state: Mutex::new(state),
            counters: Counters::default(),
            shortages: Shortages::default(),
            spares: Mutex::new(spares),
            cached_bytes: AtomicUsize::new(0),
        });
        let (committer, jobs) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("mesync-commit".into())
            .spawn(move || commit_loop(&thread_shared, &jobs, &heartbeat))
            .ctx("start the commit thread", dir)?;
        Ok(FileStore { shared, committer })
    }

    /// Total messages pending across all queues.
    pub fn pending_total(&self) -> usize {
        self.shared
            .lock()
            .hosts
            .values()
            .map(|h| h.queue.len())
            .sum()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; the state itself stays consistent
        // (every update is a few map operations), so keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn queue_dir(&self, host: &str) -> PathBuf {
        self.dir.join("queues").join(host)
    }

    fn host_file(&self, host: &str) -> PathBuf {
        self.dir.join("hosts").join(format!("{host}.json"))
    }

    fn accepted_log(&self) -> PathBuf {
        self.dir.join("accepted.log")
    }

    /// Whether the data dir takes a write now. A probe that passes also ends a shortage
    /// that refused messages (no sender may be left to retry and end it by a commit); for
    /// space, only once a message's worth of room is back.
    fn probe(&self) -> Result<(), String> {
        const PROBE: [u8; 4096] = [0; 4096];
        let staging = self.dir.join("staging");
        let path = staging.join(".healthz");
        let written = fs::write(&path, PROBE);
        let _ = fs::remove_file(&path);
        if let Err(e) = written {
            return Err(match Resource::of(&e, &staging) {
                Some(resource) => {
                    self.shortages
                        .report(&self.dir, resource, "the health probe cannot write");
                    format!("data dir: {}", resource.describe())
                }
                None => format!("data dir is not writable: {}", e.kind()),
            });
        }
        let roomy = spool_free_bytes(&self.dir) >= MIN_FREE_FOR_HEALTH;
        match self.shortages.current().into_iter().next() {
            Some(short) if short.resource == Resource::Space && !roomy => Err(format!(
                "data dir: {} (messages refused since {})",
                short.resource.describe(),
                short.since
            )),
            Some(_) => {
                self.shortages.clear(&self.dir);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Accounts for entries leaving the queues; returns their files.
    fn forget(&self, host: &str, entries: impl IntoIterator<Item = Entry>) -> Vec<PathBuf> {
        let dir = self.queue_dir(host);
        entries
            .into_iter()
            .map(|entry| {
                if let Some(bytes) = &entry.bytes {
                    self.cached_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
                }
                dir.join(entry.file)
            })
            .collect()
    }

    /// Retires files on a blocking thread; returns once they are gone from the queues, so
    /// that an answered ack means the files are gone.
    async fn retire_all(self: &Arc<Self>, files: Vec<PathBuf>) -> Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        let shared = Arc::clone(self);
        tokio::task::spawn_blocking(move || shared.retire(&files))
            .await
            .map_err(|e| Error::Invalid(format!("retire task failed: {e}")))
    }

    fn spares(&self) -> MutexGuard<'_, Vec<PathBuf>> {
        self.spares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes queue entries that are done with (acked, expired). A file whose last link
    /// this was goes to `spare/` for reuse, while there is room.
    fn retire(&self, paths: &[PathBuf]) {
        use std::os::unix::fs::MetadataExt;
        let spare_dir = self.dir.join("spare");
        for path in paths {
            let last_link = fs::symlink_metadata(path).is_ok_and(|m| m.nlink() == 1);
            if last_link && self.spares().len() < MAX_SPARE_FILES {
                let spare = spare_dir.join(uuid::Uuid::new_v4().simple().to_string());
                if fs::rename(path, &spare).is_ok() {
                    self.spares().push(spare);
                    continue;
                }
            }
            unlink_all(std::slice::from_ref(path));
        }
    }
}

impl Store for FileStore {
    async fn register(&self, host: &str) -> Result<()> {
        let now = Utc::now();
        // Decided under the lock; the file work is done after it is released.
        let (needs_file, touch) = {
            let mut state = self.shared.lock();
            let entry = state
                .hosts
                .entry(host.to_string())
                .or_insert_with(Host::new);
            entry.last_seen = Some(now);
            if entry.registered_at.is_some() {
                // Record last-seen in the registry file's mtime, at most once a minute.
                let stale = entry
                    .last_seen_saved
                    .is_none_or(|saved| now - saved > chrono::Duration::seconds(60));
                if stale {
                    entry.last_seen_saved = Some(now);
                }
                (false, stale)
            } else {
                (true, false)
            }
        };
        if touch {
            let _ = File::options()
                .write(true)
                .open(self.shared.host_file(host))
                .and_then(|f| f.set_modified(SystemTime::now()));
        }
        if needs_file {
            let shared = Arc::clone(&self.shared);
            let host = host.to_string();
            tokio::task::spawn_blocking(move || {
                let record = HostRecord {
                    host: host.clone(),
                    registered_at: Timestamp::from(now),
                };
                let bytes = serde_json::to_vec_pretty(&record).expect("host record serializes");
                spool::write_atomic(&shared.dir.join("hosts"), &format!("{host}.json"), &bytes)?;
                let mut state = shared.lock();
                let entry = state.hosts.entry(host.clone()).or_insert_with(Host::new);
                if entry.registered_at.is_none() {
                    entry.registered_at = Some(now);
                    entry.last_seen_saved = Some(now);
                    tracing::info!(%host, "host registered");
                }
                Ok(())
            })
            .await
            .map_err(|e| Error::Invalid(format!("registration task failed: {e}")))??;
        }
        Ok(())
    }

    async fn enqueue(&self, messages: Vec<Message>) -> Vec<Enqueued> {
        let count = messages.len();
        let (reply, answer) = oneshot::channel();
        let refused = || vec![Enqueued::Refused(500, "the hub is shutting down".into()); count];
        if self.committer.send(CommitJob { messages, reply }).is_err() {
            return refused();
        }
        answer.await.unwrap_or_else(|_| refused())
    }

    async fn fetch(&self, host: &str, max: usize) -> Result<Vec<Bytes>> {
        let now = Utc::now();
        let (candidates, expired) = {
            let mut state = self.shared.lock();
            let Some(entry) = state.hosts.get_mut(host) else {
                return Ok(Vec::new());
            };
            let dir = self.shared.queue_dir(host);
            let mut candidates: Vec<(PathBuf, Option<Bytes>)> = Vec::new();
            let mut expired: Vec<Uuid> = Vec::new();
            for e in entry.queue.values() {
                if candidates.len() >= max {
                    break;
                }
                if e.expires_at.is_some_and(|at| at <= now) {
                    expired.push(e.id);
                } else {
                    candidates.push((dir.join(&e.file), e.bytes.clone()));
                }
            }
            let gone: Vec<Entry> = expired.iter().filter_map(|id| entry.remove(id)).collect();
            (candidates, self.shared.forget(host, gone))
        };
        if !expired.is_empty() {
            tracing::info!(%host, count = expired.len(), "expired messages dropped");
            self.shared
                .counters
                .expired
                .fetch_add(expired.len() as u64, Ordering::Relaxed);
            self.shared.retire_all(expired).await?;
        }
        if candidates.iter().all(|(_, bytes)| bytes.is_some()) {
            return Ok(candidates.into_iter().filter_map(|(_, b)| b).collect());
        }
        tokio::task::spawn_blocking(move || read_queue_files(candidates))
            .await
            .map_err(|e| Error::Invalid(format!("fetch task failed: {e}")))?
    }

    async fn ack(&self, host: &str, ids: Vec<Uuid>) -> Result<usize> {
        let files = {
            let mut state = self.shared.lock();
            let Some(entry) = state.hosts.get_mut(host) else {
                return Ok(0);
            };
            let removed: Vec<Entry> = ids.iter().filter_map(|id| entry.remove(id)).collect();
            entry.delivered += removed.len() as u64;
            self.shared.forget(host, removed)
        };
        let count = files.len();
        self.shared
            .counters
            .delivered
            .fetch_add(count as u64, Ordering::Relaxed);
        self.shared.retire_all(files).await?;
        Ok(count)
    }

    fn waiter(&self, host: &str) -> Arc<Notify> {
        let mut state = self.shared.lock();
        let entry = state
            .hosts
            .entry(host.to_string())
            .or_insert_with(Host::new);
        Arc::clone(&entry.notify)
    }

    fn hosts(&self) -> Vec<HostInfo> {
        let state = self.shared.lock();
        let now = SystemTime::now();
        let mut hosts: Vec<HostInfo> = state
            .hosts
            .iter()
            .filter(|(_, h)| h.registered_at.is_some() || !h.queue.is_empty())
            .map(|(name, h)| HostInfo {
                host: name.clone(),
                registered_at: h.registered_at.map(|t| Timestamp::from(t).to_string()),
                last_seen: h.last_seen.map(|t| Timestamp::from(t).to_string()),
                pending: h.queue.len(),
                oldest_pending_secs: h
                    .queue
                    .values()
                    .map(|e| e.queued_at)
                    .min()
                    .map(|t| now.duration_since(t).unwrap_or_default().as_secs()),
            })
            .collect();
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        hosts
    }

    async fn remove_host(&self, host: &str) -> Result<Option<usize>> {
        let removed = self.shared.lock().hosts.remove(host);
        let Some(removed) = removed else {
            return Ok(None);
        };
        let dropped = removed.queue.len();
        removed.notify.notify_waiters();
        // The directory goes as a whole below; only the accounting is needed here.
        let _ = self.shared.forget(host, removed.queue.into_values());
        let shared = Arc::clone(&self.shared);
        let name = host.to_string();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let host = name;
            let queue = shared.queue_dir(&host);
            if queue.exists() {
                fs::remove_dir_all(&queue).ctx("remove queue", &queue)?;
            }
            let file = shared.host_file(&host);
            match fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).ctx("remove host file", &file),
            }
            spool::sync_dir(&shared.dir.join("hosts"))?;
            spool::sync_dir(&shared.dir.join("queues"))
        })
        .await
        .map_err(|e| Error::Invalid(format!("remove task failed: {e}")))??;
        let counters = &self.shared.counters;
        counters.removed_hosts.fetch_add(1, Ordering::Relaxed);
        counters
            .dropped_with_hosts
            .fetch_add(dropped as u64, Ordering::Relaxed);
        tracing::warn!(%host, dropped, "host removed with its queue");
        Ok(Some(dropped))
    }

    async fn expire(&self) -> Result<usize> {
        let now = Utc::now();
        let files: Vec<PathBuf> = {
            let mut state = self.shared.lock();
            let mut files = Vec::new();
            for (name, host) in state.hosts.iter_mut() {
                let expired: Vec<Uuid> = host
                    .queue
                    .values()
                    .filter(|e| e.expires_at.is_some_and(|at| at <= now))
                    .map(|e| e.id)
                    .collect();
                for id in &expired {
                    tracing::info!(%id, host = %name, "message expired");
                }
                let gone: Vec<Entry> = expired.iter().filter_map(|id| host.remove(id)).collect();
                files.extend(self.shared.forget(name, gone));
            }
            files
        };
        let count = files.len();
        self.shared
            .counters
            .expired
            .fetch_add(count as u64, Ordering::Relaxed);
        self.shared.retire_all(files).await?;
        Ok(count)
    }

    async fn health(&self) -> Result<(), String> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.probe())
            .await
            .map_err(|e| format!("health probe failed: {e}"))?
    }

    fn set_max_pending_per_host(&self, max: usize) {
        self.shared
            .max_pending_per_host
            .store(max, Ordering::Relaxed);
    }

    fn metrics(&self) -> String {
        let c = &self.shared.counters;
        let mut out = String::new();
        let counters = [
            (
                "mesync_messages_accepted_total",
                "Messages accepted and made durable.",
                &c.accepted,
            ),
            (
                "mesync_messages_duplicate_total",
                "Sends of an id accepted before.",
                &c.duplicates,
            ),
            (
                "mesync_messages_delivered_total",
                "Queue entries acknowledged by their host.",
                &c.delivered,
            ),
            (
                "mesync_messages_expired_total",
                "Queue entries dropped past their expires_at.",
                &c.expired,
            ),
            (
                "mesync_commits_total",
                "Group commits (flushes) of accepted messages.",
                &c.commits,
            ),
            (
                "mesync_hosts_removed_total",
                "Hosts removed by an operator.",
                &c.removed_hosts,
            ),
            (
                "mesync_messages_dropped_with_host_total",
                "Queue entries dropped with a removed host.",
                &c.dropped_with_hosts,
            ),
        ];
        for (name, help, value) in counters {
            let value = value.load(Ordering::Relaxed);
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        }
        out.push_str(
            "# HELP mesync_messages_refused_total Messages refused, by reason.\n\
             # TYPE mesync_messages_refused_total counter\n",
        );
        for (reason, value) in [
            ("queue_full", &c.refused_queue_full),
            ("storage_full", &c.refused_storage_full),
            ("unavailable", &c.refused_unavailable),
            ("error", &c.refused_error),
        ] {
            out.push_str(&format!(
                "mesync_messages_refused_total{{reason=\"{reason}\"}} {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
        out.push_str(
            "# HELP mesync_store_short The data dir lacks this resource: messages are being \
             refused (1) or not (0).\n# TYPE mesync_store_short gauge\n",
        );
        for resource in Resource::ALL {
            let short = u8::from(self.shared.shortages.is_short_of(resource));
            out.push_str(&format!(
                "mesync_store_short{{resource=\"{}\"}} {short}\n",
                resource.name()
            ));
        }
        let state = self.shared.lock();
        let mut names: Vec<&String> = state.hosts.keys().collect();
        names.sort();
        out.push_str(
            "# HELP mesync_hosts_registered Registered hosts.\n# TYPE mesync_hosts_registered gauge\n",
        );
        let registered = state
            .hosts
            .values()
            .filter(|h| h.registered_at.is_some())
            .count();
        out.push_str(&format!("mesync_hosts_registered {registered}\n"));
        out.push_str(
            "# HELP mesync_pending_messages Messages waiting for a host.\n\
             # TYPE mesync_pending_messages gauge\n",
        );
        for name in &names {
            let host = &state.hosts[*name];
            out.push_str(&format!(
                "mesync_pending_messages{{host=\"{name}\"}} {}\n",
                host.queue.len()
            ));
        }
        out.push_str(
            "# HELP mesync_delivered_messages_total Messages acknowledged, by host.\n\
             # TYPE mesync_delivered_messages_total counter\n",
        );
        for name in &names {
            let host = &state.hosts[*name];
            out.push_str(&format!(
                "mesync_delivered_messages_total{{host=\"{name}\"}} {}\n",
                host.delivered
            ));
        }
        out
    }
}

/// Reads the messages of a fetch that are not cached, skipping files acked meanwhile.
fn read_queue_files(candidates: Vec<(PathBuf, Option<Bytes>)>) -> Result<Vec<Bytes>> {
    let mut out = Vec::with_capacity(candidates.len());
    for (path, cached) in candidates {
        if let Some(bytes) = cached {
            out.push(bytes);
            continue;
        }
        match fs::read(&path) {
            Ok(bytes) => out.push(Bytes::from(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).ctx("read queue file", &path),
        }
    }
    Ok(out)
}

fn unlink_all(paths: &[PathBuf]) {
    for path in paths {
        if let Err(e) = fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), %e, "cannot remove a queue file");
        }
    }
}

/// The commit thread: takes every job waiting, commits them together, repeats.
fn commit_loop(shared: &Shared, jobs: &mpsc::Receiver<CommitJob>, heartbeat: &Heartbeat) {
    loop {
        // Waiting for messages is not being stuck, however long none come; a commit that
        // does not end within DISK_BOUND is (a disk that stopped answering).
        heartbeat.idle();
        let Ok(first) = jobs.recv() else {
            return;
        };
        heartbeat.busy_for(DISK_BOUND);
        let mut batch = vec![first];
        let mut count = batch[0].messages.len();
        while count < MAX_COMMIT_MESSAGES {
            match jobs.try_recv() {
                Ok(job) => {
                    count += job.messages.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let mut messages = Vec::with_capacity(count);
        let mut replies = Vec::with_capacity(batch.len());
        for job in batch {
            replies.push((job.messages.len(), job.reply));
            messages.extend(job.messages);
        }
        let mut outcomes = commit(shared, messages).into_iter();
        for (len, reply) in replies {
            // A sender that went away (timeout, closed connection) will retry; its messages
            // are durable and the retry is answered as duplicates.
            let _ = reply.send(outcomes.by_ref().take(len).collect());
        }
    }
}

/// One group commit. Returns one outcome per message, in order.
fn commit(shared: &Shared, messages: Vec<Message>) -> Vec<Enqueued> {
    let mut outcomes = vec![Enqueued::Duplicate; messages.len()];
    let mut plan = plan(shared, messages, &mut outcomes);
    if plan.is_empty() {
        return outcomes;
    }
    let started = std::time::Instant::now();
    let (stored, failure) = write_what_fits(shared, &plan);
    tracing::debug!(messages = stored, took = ?started.elapsed(), "group commit");
    let refused = plan.split_off(stored);
    if stored > 0 {
        shared.counters.commits.fetch_add(1, Ordering::Relaxed);
        publish_plan(shared, plan, &mut outcomes);
    }
    let Some(err) = failure else {
        shared.shortages.clear(&shared.dir);
        return outcomes;
    };
    let (status, reason, counter) = match err.shortage() {
        Some(resource) => {
            shared
                .shortages
                .report(&shared.dir, resource, "cannot store messages");
            let counter = if resource.status() == 507 {
                &shared.counters.refused_storage_full
            } else {
                &shared.counters.refused_unavailable
            };
            let reason = format!("the hub cannot store it now: {}", resource.describe());
            (resource.status(), reason, counter)
        }
        None => {
            tracing::error!(%err, messages = refused.len(), "commit failed; senders will retry");
            let reason = "the hub could not store the message".to_string();
            (500, reason, &shared.counters.refused_error)
        }
    };
    tracing::info!(
        stored,
        refused = refused.len(),
        status,
        "messages refused for now; their senders retry"
    );
    counter.fetch_add(refused.len() as u64, Ordering::Relaxed);
    for item in &refused {
        outcomes[item.index] = Enqueued::Refused(status, reason.clone());
    }
    outcomes
}

/// Writes the longest prefix of `plan` that the data dir can take: a batch larger than the
/// free space (or inodes, or descriptors) stores what fits, and the senders of the rest
/// retry, so a shortage slows a sender down instead of stopping it. Returns how many
/// messages are durable, and the error that stopped the others.
fn write_what_fits(shared: &Shared, plan: &[Planned]) -> (usize, Option<Error>) {
    crate::shortage::longest_prefix(plan, |prefix| write_plan(shared, prefix))
}

/// Decides, under the lock, what each message becomes: duplicate, refused, or planned with
/// its recipients and sequence number.
fn plan(shared: &Shared, messages: Vec<Message>, outcomes: &mut [Enqueued]) -> Vec<Planned> {
    let mut state = shared.lock();
    let mut in_batch: HashSet<Uuid> = HashSet::new();
    let mut added: HashMap<String, usize> = HashMap::new();
    let mut plan = Vec::new();
    for (index, message) in messages.into_iter().enumerate() {
        if state.accepted.contains(&message.id) || !in_batch.insert(message.id) {
            shared.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(id = %message.id, "duplicate refused");
            outcomes[index] = Enqueued::Duplicate;
            continue;
        }
        let recipients: Vec<String> = match &message.target {
            Some(target) => vec![target.clone()],
            None => state
                .hosts
                .iter()
                .filter(|(name, h)| h.registered_at.is_some() && **name != message.source)
                .map(|(name, _)| name.clone())
                .collect(),
        };
        // A retry after a crash mid-commit must not queue the message twice for a host.
        let recipients: Vec<String> = recipients
            .into_iter()
            .filter(|r| {
                state
                    .hosts
                    .get(r)
                    .is_none_or(|h| !h.by_id.contains_key(&message.id))
            })
            .collect();
        let full = recipients.iter().find(|r| {
            let pending = state.hosts.get(*r).map_or(0, |h| h.queue.len());
            pending + added.get(*r).copied().unwrap_or(0)
                >= shared.max_pending_per_host.load(Ordering::Relaxed)
        });
        if let Some(full) = full {
            shared
                .counters
                .refused_queue_full
                .fetch_add(1, Ordering::Relaxed);
            in_batch.remove(&message.id);
            outcomes[index] = Enqueued::Refused(
                429,
                format!("the queue of host {full} is full; try again later"),
            );
            continue;
        }
        for r in &recipients {
            *added.entry(r.clone()).or_default() += 1;
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        plan.push(Planned {
            index,
            message_id: message.id,
            priority: message.priority,
            seq,
            expires_at: message.expires_at.map(|t| t.utc()),
            recipients,
            bytes: message.to_json(),
            kind: message.kind.clone(),
            source: message.source.clone(),
            target: message.target.clone(),
        });
    }
    plan
}

/// Steps 1 and 2 of a commit: staging data flushed, then links and ids flushed. On error,
/// undoes what it did, so nothing of a refused message stays visible, and says how many
/// leading messages of the plan had their data staged before it.
fn write_plan(shared: &Shared, plan: &[Planned]) -> Result<(), (Error, usize)> {
    let staging = shared.dir.join("staging");
    let queues = shared.dir.join("queues");
    let log_path = shared.accepted_log();
    let mut commit = Commit::new();
    let mut temps: Vec<PathBuf> = Vec::new();
    let mut links: Vec<PathBuf> = Vec::new();
    let opened = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .and_then(|mut log| log.seek(SeekFrom::End(0)).map(|len| (log, len)))
        .ctx("open", &log_path);
    let (mut log, log_len) = opened.map_err(|e| (e, 0))?;
    let mut staged = 0;

    let result = (|| -> Result<()> {
        for item in plan {
            if !item.recipients.is_empty() {
                let name = format!("{}.json", item.message_id);
                let spare = shared.spares().pop();
                temps.push(commit.write_temp_reusing(
                    &staging,
                    &name,
                    &item.bytes,
                    spare.as_deref(),
                )?);
            }
            staged += 1;
        }
        commit.sync_data()?;
        let mut ids = String::with_capacity(plan.len() * 37);
        let mut temp_iter = temps.iter();
        for item in plan {
            let temp = if item.recipients.is_empty() {
                None
            } else {
                temp_iter.next()
            };
            for host in &item.recipients {
                let dir = queues.join(host);
                if !dir.exists() {
                    fs::create_dir(&dir)
                        .or_else(|e| {
                            if e.kind() == std::io::ErrorKind::AlreadyExists {
                                Ok(())
                            } else {
                                Err(e)
                            }
                        })
                        .ctx("create queue", &dir)?;
                    commit.touch_dir(&queues);
                }
                let link = dir.join(item.queue_name());
                let temp = temp.expect("a message with recipients has a staging file");
                fs::hard_link(temp, &link).ctx("link into queue", &link)?;
                links.push(link);
                commit.touch_dir(&dir);
            }
            ids.push_str(&item.message_id.to_string());
            ids.push('\n');
        }
        log.write_all(ids.as_bytes()).ctx("append", &log_path)?;
        commit.add_file(&log_path)?;
        commit.sync()
    })();

    unlink_all(&temps);
    if result.is_err() {
        unlink_all(&links);
        let _ = log.set_len(log_len);
    }
    result.map_err(|e| (e, staged))
}

/// Step 3: the messages are durable; make them visible, count them and wake recipients.
fn publish_plan(shared: &Shared, plan: Vec<Planned>, outcomes: &mut [Enqueued]) {
    let now = SystemTime::now();
    let mut wake = Vec::new();
    let count = plan.len();
    {
        let mut state = shared.lock();
        for mut item in plan {
            state.accepted.insert(item.message_id);
            let cost = item.bytes.len() * item.recipients.len();
            let cache = shared.cached_bytes.load(Ordering::Relaxed) + cost <= MAX_CACHED_BYTES;
            let bytes = cache.then(|| {
                shared.cached_bytes.fetch_add(cost, Ordering::Relaxed);
                Bytes::from(std::mem::take(&mut item.bytes))
            });
            for host in &item.recipients {
                let entry = state.hosts.entry(host.clone()).or_insert_with(Host::new);
                entry.insert(
                    (item.priority.rank(), item.seq),
                    Entry {
                        id: item.message_id,
                        file: item.queue_name(),
                        queued_at: now,
                        expires_at: item.expires_at,
                        bytes: bytes.clone(),
                    },
                );
                wake.push(Arc::clone(&entry.notify));
            }
            outcomes[item.index] = Enqueued::Accepted(item.recipients.len());
            // One line per message costs more than the commit at full speed: at debug.
            tracing::debug!(
                id = %item.message_id,
                r#type = %item.kind,
                source = %item.source,
                host = item.target.as_deref().unwrap_or("(broadcast)"),
                recipients = item.recipients.len(),
                "message accepted"
            );
        }
    }
    tracing::info!(count, "messages accepted");
    shared
        .counters
        .accepted
        .fetch_add(count as u64, Ordering::Relaxed);
    for notify in wake {
        notify.notify_waiters();
    }
}

/// Rebuilds the in-memory state from the files.
fn recover(dir: &Path) -> Result<State> {
    let mut state = State {
        accepted: read_accepted_log(&dir.join("accepted.log"))?,
        ..State::default()
    };
    let hosts_dir = dir.join("hosts");
    for name in spool::list(&hosts_dir)? {
        let path = hosts_dir.join(&name);
        let Some(host) = name.strip_suffix(".json") else {
            continue;
        };
        let record = fs::read(&path)
            .ok()
            .and_then(|text| serde_json::from_slice::<HostRecord>(&text).ok());
        let Some(record) = record else {
            tracing::warn!(path = %path.display(), "ignoring an unreadable host record");
            continue;
        };
        let modified = fs::metadata(&path).and_then(|m| m.modified()).ok();
        let entry = state
            .hosts
            .entry(host.to_string())
            .or_insert_with(Host::new);
        entry.registered_at = Some(record.registered_at.utc());
        entry.last_seen = modified.map(DateTime::<Utc>::from);
        entry.last_seen_saved = entry.last_seen;
    }
    let queues = dir.join("queues");
    let host_dirs = match fs::read_dir(&queues) {
        Ok(entries) => entries,
        Err(e) => return Err(e).ctx("list", &queues),
    };
    let mut max_seq = 0;
    for host_dir in host_dirs {
        let host_dir = host_dir.ctx("list", &queues)?;
        let Ok(host) = host_dir.file_name().into_string() else {
            continue;
        };
        let path = host_dir.path();
        if !path.is_dir() {
            continue;
        }
        spool::remove_debris(&path, Duration::ZERO)?;
        let entry = state.hosts.entry(host.clone()).or_insert_with(Host::new);
        for name in spool::list(&path)? {
            let Some((rank, seq, id)) = parse_queue_file_name(&name) else {
                tracing::warn!(file = %path.join(&name).display(), "ignoring a file that is not a queue entry");
                continue;
            };
            let file = path.join(&name);
            let meta = fs::metadata(&file).ctx("stat", &file)?;
            let expires_at = fs::read(&file)
                .ok()
                .and_then(|b| Message::parse(&b).ok())
                .and_then(|m| m.expires_at.map(|t| t.utc()));
            max_seq = max_seq.max(seq + 1);
            entry.insert(
                (rank, seq),
                Entry {
                    id,
                    file: name,
                    queued_at: meta.modified().unwrap_or_else(|_| SystemTime::now()),
                    expires_at,
                    bytes: None,
                },
            );
        }
    }
    state.next_seq = max_seq;
    let pending: usize = state.hosts.values().map(|h| h.queue.len()).sum();
    tracing::info!(
        hosts = state.hosts.len(),
        pending,
        accepted = state.accepted.len(),
        "store recovered"
    );
    Ok(state)
}

/// Reads the accepted ids. A torn last line (a crash in the middle of an append) is cut off
/// so the next append starts on a line of its own.
fn read_accepted_log(path: &Path) -> Result<HashSet<Uuid>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(e).ctx("open", path),
    };
    let mut ids = HashSet::new();
    let mut good_len: u64 = 0;
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).ctx("read", path)?;
        if n == 0 {
            break;
        }
        if !line.ends_with('\n') {
            break; // torn tail
        }
        if let Ok(id) = Uuid::try_parse(line.trim_end()) {
            ids.insert(id);
        }
        good_len += n as u64;
    }
    let len = fs::metadata(path).ctx("stat", path)?.len();
    if len != good_len {
        tracing::warn!(path = %path.display(), "cutting a torn line off the end of the log");
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(good_len))
            .ctx("truncate", path)?;
    }
    Ok(ids)
}

/// Free bytes where `dir` is; unknown counts as plenty (the probe's write decides then).
fn spool_free_bytes(dir: &Path) -> u64 {
    crate::shortage::free_bytes(dir).unwrap_or(u64::MAX)
}

fn clear_dir(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).ctx("list", dir)? {
        let entry = entry.ctx("list", dir)?;
        let path = entry.path();
        fs::remove_file(&path).ctx("remove", &path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_sort_in_delivery_order() {
        let id = Uuid::new_v4();
        let mut names = [
            queue_file_name(Priority::Low, 1, id),
            queue_file_name(Priority::High, 9, id),
            queue_file_name(Priority::Normal, 3, id),
            queue_file_name(Priority::High, 10, id),
        ];
        names.sort();
        let parsed: Vec<(u8, u64)> = names
            .iter()
            .map(|n| {
                let (p, s, i) = parse_queue_file_name(n).unwrap();
                assert_eq!(i, id);
                (p, s)
            })
            .collect();
        assert_eq!(parsed, vec![(0, 9), (0, 10), (1, 3), (2, 1)]);
    }

    #[test]
    fn a_torn_log_line_is_cut_off() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("accepted.log");
        let id = Uuid::new_v4();
        fs::write(&path, format!("{id}\n1234-ab")).unwrap();
        let ids = read_accepted_log(&path).unwrap();
        assert_eq!(ids.len(), 1);
        assert!(ids.contains(&id));
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{id}\n"));
    }
}
