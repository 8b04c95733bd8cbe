//! The file store's start-up: its state rebuilt from the files of the data dir.

// The file store's types, imports and helpers.
use super::*;

/// Rebuilds the in-memory state from the files.
pub(super) fn recover(dir: &Path) -> Result<State> {
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

pub(super) fn clear_dir(dir: &Path) -> Result<()> {
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
