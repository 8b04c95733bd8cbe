//! The commands that work on the agent's queues directly: `send`, `list`, `retry`, `flush`.
//! They need no running agent or hub.

use std::fs;
use std::io::Read;
use std::path::Path;

use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{FlushQueue, Queue, SendArgs};
use crate::agent::ledger::Ledger;
use crate::agent::outbox::{self, REASON_SUFFIX};
use crate::config::{Config, parse_duration};
use crate::error::{Error, IoContext, Result};
use crate::message::{Message, Timestamp, validate_name};
use crate::spool;

/// `mesync send`: validates, writes one message into `outbox/`, prints its id.
pub fn send(config: &Config, args: SendArgs) -> Result<()> {
    validate_name("type", &args.kind).map_err(Error::Invalid)?;
    if let Some(target) = &args.target {
        validate_name("target", target).map_err(Error::Invalid)?;
    }
    let payload = read_payload(&args)?;
    let mut message = Message::new(&args.kind, &config.host_id, payload);
    message.priority = args.priority;
    message.target = args.target;
    if let Some(ttl) = &args.ttl {
        let ttl = parse_duration(ttl).map_err(|e| Error::Invalid(format!("--ttl: {e}")))?;
        let ttl = chrono::Duration::from_std(ttl)
            .map_err(|_| Error::Invalid("--ttl: too long".into()))?;
        message.expires_at = Some(Timestamp::from(message.created_at.utc() + ttl));
    }
    outbox::put(config, &message)?;
    println!("{}", message.id);
    Ok(())
}

fn read_payload(args: &SendArgs) -> Result<Value> {
    let (text, from) = match (&args.payload, &args.payload_file) {
        (Some(text), _) if text == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .ctx("read payload", Path::new("(stdin)"))?;
            (text, "stdin".to_string())
        }
        (Some(text), _) => (text.clone(), "--payload".to_string()),
        (None, Some(path)) => (
            fs::read_to_string(path).ctx("read payload", path)?,
            path.display().to_string(),
        ),
        (None, None) => return Ok(Value::Null),
    };
    serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{from}: payload is not valid JSON: {e}")))
}

/// `mesync list`.
pub fn list(config: &Config, queue: Queue, json: bool) -> Result<()> {
    let dir = queue_dir(config, queue);
    let ledger = match queue {
        Queue::Inbox => Some(Ledger::read(&config.state_dir())?),
        _ => None,
    };
    for name in message_files(&dir)? {
        let path = dir.join(&name);
        let parsed = match spool::read_regular(&path) {
            Ok(bytes) => Message::parse(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // Moved away meanwhile.
            Err(e) => Err(e.to_string()),
        };
        let mut extra = Map::new();
        extra.insert("file".into(), json!(name));
        if let (Some(ledger), Ok(message)) = (&ledger, &parsed) {
            extra.insert("hook".into(), json!(hook_state(ledger, &message.id)));
        }
        if let Queue::Failed = queue {
            let reason = fs::read_to_string(dir.join(format!("{name}{REASON_SUFFIX}")))
                .map(|r| r.trim().to_string())
                .unwrap_or_else(|_| "unknown".into());
            extra.insert("reason".into(), json!(reason));
        }
        match (&parsed, json) {
            (Ok(message), true) => {
                let mut value = serde_json::to_value(message).expect("a message serializes");
                if let Value::Object(map) = &mut value {
                    map.extend(extra);
                }
                println!("{value}");
            }
            (Err(error), true) => {
                extra.insert("error".into(), json!(error));
                println!("{}", Value::Object(extra));
            }
            (Ok(m), false) => {
                let target = m.target.as_deref().unwrap_or("*");
                let mut line = format!(
                    "{name}  {}  {}  {}  {}->{target}  {}",
                    m.id, m.kind, m.priority, m.source, m.created_at
                );
                for key in ["hook", "reason"] {
                    if let Some(Value::String(v)) = extra.get(key) {
                        line.push_str(&format!("  {key}: {v}"));
                    }
                }
                println!("{line}");
            }
            (Err(error), false) => {
                let reason = extra.get("reason").and_then(Value::as_str).unwrap_or(error);
                println!("{name}  (not a valid message)  reason: {reason}");
            }
        }
    }
    Ok(())
}

fn hook_state(ledger: &Ledger, id: &Uuid) -> String {
    match ledger.delivery(id) {
        None => "unknown".into(),
        Some(d) => match &d.outcome {
            Some(outcome) => outcome.clone(),
            None if d.attempts > 0 => format!("running or retrying (attempt {})", d.attempts),
            None => "pending".into(),
        },
    }
}

/// `mesync retry [ID...]`.
pub fn retry(config: &Config, ids: &[String]) -> Result<()> {
    let wanted: Vec<Uuid> = ids
        .iter()
        .map(|id| {
            Uuid::try_parse(id).map_err(|_| Error::Invalid(format!("{id:?} is not a message id")))
        })
        .collect::<Result<_>>()?;
    let failed = config.failed_dir();
    let outbox = config.outbox_dir();
    spool::ensure_dir(&outbox)?;
    let mut found = Vec::new();
    let mut moved = 0;
    for name in message_files(&failed)? {
        let path = failed.join(&name);
        if !wanted.is_empty() {
            let id = spool::read_regular(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|v| {
                    v.get("id")
                        .and_then(Value::as_str)
                        .and_then(|s| Uuid::try_parse(s).ok())
                });
            match id {
                Some(id) if wanted.contains(&id) => found.push(id),
                _ => continue,
            }
        }
        // The reason goes first: once the file is back in outbox/, a running agent may fail
        // it again at once and write a new reason that must not be removed.
        let _ = fs::remove_file(failed.join(format!("{name}{REASON_SUFFIX}")));
        let target = unused_name(&outbox, original_name(&name));
        spool::move_file(&path, &outbox, &target, true)?;
        moved += 1;
    }
    if let Some(missing) = wanted.iter().find(|id| !found.contains(id)) {
        return Err(Error::Invalid(format!(
            "no failed message with id {missing}"
        )));
    }
    println!("re-queued {moved} message(s)");
    Ok(())
}

/// `mesync flush`.
pub fn flush(config: &Config, queue: FlushQueue) -> Result<()> {
    let dir = match queue {
        FlushQueue::Sent => config.sent_dir(),
        FlushQueue::Failed => config.failed_dir(),
        FlushQueue::Inbox => config.inbox_dir(),
    };
    let mut removed = 0;
    for name in spool::list(&dir)? {
        let path = dir.join(&name);
        match fs::remove_file(&path) {
            Ok(()) => {
                if !name.ends_with(REASON_SUFFIX) {
                    removed += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {}
            Err(e) => return Err(e).ctx("remove", &path),
        }
    }
    println!("removed {removed} message(s) from {}", dir.display());
    Ok(())
}

fn queue_dir(config: &Config, queue: Queue) -> std::path::PathBuf {
    match queue {
        Queue::Outbox => config.outbox_dir(),
        Queue::Inbox => config.inbox_dir(),
        Queue::Sent => config.sent_dir(),
        Queue::Failed => config.failed_dir(),
    }
}

/// The message files of a queue (not the `.reason` files beside failed ones).
fn message_files(dir: &Path) -> Result<Vec<String>> {
    Ok(spool::list(dir)?
        .into_iter()
        .filter(|name| !name.ends_with(REASON_SUFFIX))
        .collect())
}

/// `x.json.2` (a name made unique in failed/) back to `x.json`.
fn original_name(name: &str) -> &str {
    match name.rsplit_once('.') {
        Some((stem, n)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => stem,
        _ => name,
    }
}

fn unused_name(dir: &Path, name: &str) -> String {
    let mut candidate = name.to_string();
    let mut n = 1;
    while dir.join(&candidate).exists() {
        candidate = format!("{n}-{name}");
        n += 1;
    }
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_suffixes_come_off() {
        assert_eq!(original_name("a.json.2"), "a.json");
        assert_eq!(original_name("a.json"), "a.json");
    }
}
