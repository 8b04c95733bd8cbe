//! The file store: everything the hub keeps, as files in its data dir.
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

mod commit;
mod recovery;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
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

use super::{Enqueued, HostInfo, Refused, Store};
use commit::{CommitJob, commit_loop};
use recovery::{clear_dir, recover};

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
        let refused = || vec![Enqueued::Refused(Refused::Failed); count];
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

/// Free bytes where `dir` is; unknown counts as plenty (the probe's write decides then).
fn spool_free_bytes(dir: &Path) -> u64 {
    crate::shortage::free_bytes(dir).unwrap_or(u64::MAX)
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
}
