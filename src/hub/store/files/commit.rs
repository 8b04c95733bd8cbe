//! The file store's group commit: one thread takes every message waiting, decides what each
//! becomes (`plan`), writes and flushes it (`write_plan`), then makes it visible and
//! answers (`publish_plan`). The order of the flushes is what `tests/crash_order.rs` checks.

// The file store's types, imports and helpers.
use super::*;

pub(super) struct CommitJob {
    pub(super) messages: Vec<Message>,
    pub(super) reply: oneshot::Sender<Vec<Enqueued>>,
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

/// The commit thread: takes every job waiting, commits them together, repeats.
pub(super) fn commit_loop(
    shared: &Shared,
    jobs: &mpsc::Receiver<CommitJob>,
    heartbeat: &Heartbeat,
) {
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
    let (why, counter) = match err.shortage() {
        Some(resource) => {
            shared
                .shortages
                .report(&shared.dir, resource, "cannot store messages");
            let counter = if resource.status() == 507 {
                &shared.counters.refused_storage_full
            } else {
                &shared.counters.refused_unavailable
            };
            (Refused::Short(resource), counter)
        }
        None => {
            tracing::error!(%err, messages = refused.len(), "commit failed; senders will retry");
            (Refused::Failed, &shared.counters.refused_error)
        }
    };
    tracing::info!(
        stored,
        refused = refused.len(),
        status = why.status(),
        "messages refused for now; their senders retry"
    );
    counter.fetch_add(refused.len() as u64, Ordering::Relaxed);
    for item in &refused {
        outcomes[item.index] = Enqueued::Refused(why.clone());
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
            outcomes[index] = Enqueued::Refused(Refused::QueueFull { host: full.clone() });
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
