//! The agent's ledger (`state/ledger.jsonl`): an append-only record of every message written
//! into `inbox/` and of each hook run. It outlives `mesync flush inbox`, so a message
//! redelivered later is still recognised, and it tells, after a crash, which hooks have not
//! finished (they run again, with a higher `MESYNC_ATTEMPT`).
//!
//! One JSON object per line. Each record is appended with a single write(2), so a process
//! crash leaves whole lines; a machine crash may tear the last line, which is cut off when
//! the ledger is opened. The `delivered` records are made durable together with the inbox
//! files they describe (see `inbox`), before the hub gets the ack.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{IoContext, Result};

/// One line of the ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    /// The message is durable in `inbox/` under `file`.
    Delivered {
        id: Uuid,
        file: String,
        #[serde(rename = "type")]
        kind: String,
    },
    /// Attempt `attempt` of the message's hook started.
    HookStarted { id: Uuid, attempt: u32 },
    /// The hook attempt ended; `retry` when it will be tried again (exit 75).
    HookFinished {
        id: Uuid,
        attempt: u32,
        outcome: String,
        retry: bool,
    },
}

/// What the ledger knows of one delivered message.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub file: String,
    pub kind: String,
    /// Hook attempts started so far.
    pub attempts: u32,
    /// The final outcome, once there is one.
    pub outcome: Option<String>,
}

/// The ledger, replayed into memory.
pub struct Ledger {
    path: PathBuf,
    /// Open for appending in the agent; `None` when only read.
    file: Option<File>,
    deliveries: HashMap<Uuid, Delivery>,
    /// Delivered messages whose hook has not finished, in delivery order.
    pending_hooks: VecDeque<Uuid>,
    /// The latest final outcomes that were failures, for `mesync status`.
    recent_failures: VecDeque<(Uuid, String)>,
}

const RECENT_FAILURES: usize = 10;

impl Ledger {
    /// The ledger's path in a state dir.
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("ledger.jsonl")
    }

    /// Opens the ledger for appending, replaying what it holds. Only the agent does this:
    /// it alone writes the ledger.
    pub fn open(state_dir: &Path) -> Result<Ledger> {
        let path = Ledger::path_in(state_dir);
        let (records, good_len) = read_records(&path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .ctx("open", &path)?;
        // The ledger may have just been created: its name must be durable before any
        // record in it is relied on.
        crate::spool::sync_dir(state_dir)?;
        let len = file.metadata().ctx("stat", &path)?.len();
        if len != good_len {
            tracing::warn!(path = %path.display(), "cutting a torn line off the end of the ledger");
            file.set_len(good_len).ctx("truncate", &path)?;
        }
        Ok(Ledger::replay(path, Some(file), records))
    }

    /// Reads the ledger without writing to it, for `mesync list` and `status`, which may run
    /// while the agent appends (a line being written is skipped, never cut off).
    pub fn read(state_dir: &Path) -> Result<Ledger> {
        let path = Ledger::path_in(state_dir);
        let (records, _) = read_records(&path)?;
        Ok(Ledger::replay(path, None, records))
    }

    fn replay(path: PathBuf, file: Option<File>, records: Vec<Record>) -> Ledger {
        let mut ledger = Ledger {
            path,
            file,
            deliveries: HashMap::new(),
            pending_hooks: VecDeque::new(),
            recent_failures: VecDeque::new(),
        };
        for record in records {
            ledger.apply(record);
        }
        ledger
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when this id was written into the inbox before.
    pub fn is_delivered(&self, id: &Uuid) -> bool {
        self.deliveries.contains_key(id)
    }

    pub fn delivery(&self, id: &Uuid) -> Option<&Delivery> {
        self.deliveries.get(id)
    }

    /// The next message whose hook must run, in delivery order.
    pub fn next_hook(&self) -> Option<(Uuid, Delivery)> {
        let id = *self.pending_hooks.front()?;
        Some((id, self.deliveries.get(&id)?.clone()))
    }

    pub fn recent_failures(&self) -> impl Iterator<Item = &(Uuid, String)> {
        self.recent_failures.iter()
    }

    pub fn pending_hooks(&self) -> usize {
        self.pending_hooks.len()
    }

    /// Appends records with one write. Durability is the caller's: see `spool::Commit`.
    pub fn append(&mut self, records: &[Record]) -> Result<()> {
        let mut text = Vec::with_capacity(records.len() * 128);
        for record in records {
            serde_json::to_writer(&mut text, record).expect("a ledger record serializes");
            text.push(b'\n');
        }
        let file = self.file.as_mut().ok_or_else(|| crate::error::Error::Io {
            action: "append",
            path: self.path.clone(),
            source: std::io::Error::other("the ledger was opened read-only"),
        })?;
        let len = file.metadata().ctx("stat", &self.path)?.len();
        if let Err(e) = file.write_all(&text) {
            // A partial line (disk full) would join the next record: cut it off.
            let _ = file.set_len(len);
            return Err(e).ctx("append", &self.path);
        }
        for record in records {
            self.apply(record.clone());
        }
        Ok(())
    }

    /// Appends one record, and applies it in memory even when the write fails (a full
    /// disk): the running agent must not redo what it just did; after a restart the lost
    /// record costs at most one more run of a hook.
    pub fn append_or_remember(&mut self, record: Record) -> Result<()> {
        let result = self.append(std::slice::from_ref(&record));
        if result.is_err() {
            self.apply(record);
        }
        result
    }

    fn apply(&mut self, record: Record) {
        match record {
            Record::Delivered { id, file, kind } => {
                if self.deliveries.contains_key(&id) {
                    return;
                }
                self.deliveries.insert(
                    id,
                    Delivery {
                        file,
                        kind,
                        attempts: 0,
                        outcome: None,
                    },
                );
                self.pending_hooks.push_back(id);
            }
            Record::HookStarted { id, attempt } => {
                if let Some(d) = self.deliveries.get_mut(&id) {
                    d.attempts = d.attempts.max(attempt);
                }
            }
            Record::HookFinished {
                id, outcome, retry, ..
            } => {
                if retry {
                    return;
                }
                if let Some(d) = self.deliveries.get_mut(&id) {
                    let failed = !matches!(outcome.as_str(), "ok" | "none");
                    d.outcome = Some(outcome.clone());
                    if failed {
                        self.recent_failures.push_back((id, outcome));
                        if self.recent_failures.len() > RECENT_FAILURES {
                            self.recent_failures.pop_front();
                        }
                    }
                }
                if self.pending_hooks.front() == Some(&id) {
                    self.pending_hooks.pop_front();
                } else {
                    self.pending_hooks.retain(|p| *p != id);
                }
            }
        }
    }
}

/// Reads every whole line; returns the records and the length of the whole lines.
fn read_records(path: &Path) -> Result<(Vec<Record>, u64)> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e).ctx("open", path),
    };
    let mut reader = BufReader::new(file);
    let mut records = Vec::new();
    let mut good_len = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).ctx("read", path)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        good_len += n as u64;
        match serde_json::from_slice::<Record>(&line) {
            Ok(record) => records.push(record),
            Err(e) => {
                tracing::warn!(path = %path.display(), %e, "skipping an unreadable ledger line")
            }
        }
    }
    Ok((records, good_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(id: Uuid) -> Record {
        Record::Delivered {
            id,
            file: format!("x_{id}.json"),
            kind: "t".into(),
        }
    }

    #[test]
    fn replay_restores_dedupe_and_pending_hooks_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        {
            let mut l = Ledger::open(tmp.path()).unwrap();
            l.append(&[delivered(a), delivered(b), delivered(c)])
                .unwrap();
            l.append(&[
                Record::HookStarted { id: a, attempt: 1 },
                Record::HookFinished {
                    id: a,
                    attempt: 1,
                    outcome: "ok".into(),
                    retry: false,
                },
                Record::HookStarted { id: b, attempt: 1 },
            ])
            .unwrap();
        }
        let l = Ledger::open(tmp.path()).unwrap();
        assert!(l.is_delivered(&a) && l.is_delivered(&b) && l.is_delivered(&c));
        let (next, d) = l.next_hook().unwrap();
        assert_eq!(next, b, "the hook that was running comes first");
        assert_eq!(d.attempts, 1, "so its next run is attempt 2");
        assert_eq!(l.pending_hooks(), 2);
    }

    #[test]
    fn a_torn_line_is_cut_and_appends_continue() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Uuid::new_v4();
        {
            let mut l = Ledger::open(tmp.path()).unwrap();
            l.append(&[delivered(a)]).unwrap();
        }
        let path = Ledger::path_in(tmp.path());
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"event\":\"deliv").unwrap();
        drop(f);
        let b = Uuid::new_v4();
        {
            let mut l = Ledger::open(tmp.path()).unwrap();
            l.append(&[delivered(b)]).unwrap();
        }
        let l = Ledger::open(tmp.path()).unwrap();
        assert!(l.is_delivered(&a) && l.is_delivered(&b));
        assert!(std::fs::read_to_string(&path).unwrap().lines().count() == 2);
    }
}
