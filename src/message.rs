//! The message: its schema, the one validator for names (types and host ids), and file names.
//!
//! Every message that crosses a boundary (an outbox file, an HTTP body, a pulled batch) goes
//! through [`Message::parse`] or [`Message::complete`], so a message held in memory is valid.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Longest type or host id accepted.
pub const MAX_NAME_LEN: usize = 128;

/// One message, as written in queue files and sent over HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub target: Option<String>,
    pub priority: Priority,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    pub payload: Value,
    /// Fields mesync does not know are kept and passed through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Message {
    /// A new message from this host, created now.
    pub fn new(kind: &str, source: &str, payload: Value) -> Message {
        Message {
            id: Uuid::new_v4(),
            kind: kind.to_string(),
            source: source.to_string(),
            target: None,
            priority: Priority::Normal,
            created_at: Timestamp::now(),
            expires_at: None,
            payload,
            extra: Map::new(),
        }
    }

    /// Parses and validates a complete message.
    pub fn parse(bytes: &[u8]) -> Result<Message, String> {
        let message: Message =
            serde_json::from_slice(bytes).map_err(|e| format!("not a valid message: {e}"))?;
        message.validate()?;
        Ok(message)
    }

    /// Builds a valid message from JSON that may carry only `type` and `payload` (a file
    /// dropped into `outbox/` by hand): the missing `id`, `source`, `created_at`, `priority`
    /// and `target` are filled in.
    pub fn complete(value: Value, host_id: &str) -> Result<Message, String> {
        let Value::Object(mut fields) = value else {
            return Err("not a valid message: expected a JSON object".to_string());
        };
        if !fields.contains_key("type") {
            return Err("not a valid message: missing field `type`".to_string());
        }
        let defaults: [(&str, &dyn Fn() -> Value); 6] = [
            ("id", &|| Value::String(Uuid::new_v4().to_string())),
            ("source", &|| Value::String(host_id.to_string())),
            ("created_at", &|| {
                Value::String(Timestamp::now().to_string())
            }),
            ("priority", &|| Value::String("normal".to_string())),
            ("target", &|| Value::Null),
            ("payload", &|| Value::Null),
        ];
        for (key, default) in defaults {
            fields.entry(key).or_insert_with(default);
        }
        let message: Message = serde_json::from_value(Value::Object(fields))
            .map_err(|e| format!("not a valid message: {e}"))?;
        message.validate()?;
        Ok(message)
    }

    /// Checks what serde's types cannot: the name rules of `type`, `source` and `target`.
    pub fn validate(&self) -> Result<(), String> {
        validate_name("type", &self.kind)?;
        validate_name("source", &self.source)?;
        if let Some(target) = &self.target {
            validate_name("target", target)?;
        }
        Ok(())
    }

    /// The queue file name: `YYYYMMDDTHHmmss_<uuid>.json`, from `created_at` in UTC.
    pub fn file_name(&self) -> String {
        format!(
            "{}_{}.json",
            self.created_at.utc().format("%Y%m%dT%H%M%S"),
            self.id
        )
    }

    /// Serialized as the compact JSON stored in files and sent on the wire.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a Message cannot fail: every field is plain data with string keys.
        serde_json::to_vec(self).expect("a message serializes")
    }

    /// True when `expires_at` is set and has passed.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at.utc() <= now)
    }

    /// The order in which messages are sent and delivered: highest priority first, then
    /// oldest first (to the microsecond), then by id so the order is total.
    pub fn send_order(&self, other: &Message) -> Ordering {
        (self.priority.rank(), self.created_at.utc(), self.id).cmp(&(
            other.priority.rank(),
            other.created_at.utc(),
            other.id,
        ))
    }
}

/// The id carried in a queue file name (`..._<uuid>.json`), if it has one.
pub fn id_from_file_name(name: &str) -> Option<Uuid> {
    // Agent names are `<time>_<uuid>.json` and hub names `<P>-<seq>-<uuid>.json`: both end
    // with the 36 characters of the uuid.
    let stem = name.strip_suffix(".json")?;
    let id = stem.get(stem.len().checked_sub(36)?..)?;
    Uuid::try_parse(id).ok()
}

/// The one validator for message types and host ids: 1–128 characters of
/// `[A-Za-z0-9._-]`, the first alphanumeric. A type names a hook file, so nothing that could
/// climb out of `hooks/` (`/`, `..`) is ever accepted.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let valid_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.len() > MAX_NAME_LEN || !valid_chars || !valid_first {
        return Err(format!(
            "invalid {what} {name:?}: use 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ -, \
             starting with a letter or digit"
        ));
    }
    Ok(())
}

/// Message priority. Higher priorities are sent and delivered first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// 0 for high, 1 for normal, 2 for low: the sort key, and the digit in hub queue names.
    pub fn rank(self) -> u8 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    pub fn from_rank(rank: u8) -> Option<Priority> {
        match rank {
            0 => Some(Priority::High),
            1 => Some(Priority::Normal),
            2 => Some(Priority::Low),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = String;

    fn from_str(s: &str) -> Result<Priority, String> {
        match s {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            _ => Err(format!("invalid priority {s:?}: use high, normal or low")),
        }
    }
}

/// An RFC 3339 time, written as `2024-01-15T10:30:00.123456+00:00` (the seed's format)
/// and accepted in any RFC 3339 form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(DateTime<FixedOffset>);

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from(Utc::now())
    }

    pub fn utc(&self) -> DateTime<Utc> {
        self.0.with_timezone(&Utc)
    }
}

impl From<DateTime<Utc>> for Timestamp {
    fn from(at: DateTime<Utc>) -> Timestamp {
        Timestamp(at.fixed_offset())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Microseconds, as the seed writes them; nanoseconds only when a time has them,
        // so that a message passes through unchanged.
        let format = if self.0.timestamp_subsec_nanos().is_multiple_of(1000) {
            SecondsFormat::Micros
        } else {
            SecondsFormat::Nanos
        };
        f.write_str(&self.0.to_rfc3339_opts(format, false))
    }
}

impl FromStr for Timestamp {
    type Err = String;

    fn from_str(s: &str) -> Result<Timestamp, String> {
        DateTime::parse_from_rfc3339(s)
            .map(Timestamp)
            .map_err(|e| format!("invalid time {s:?}: {e} (expected RFC 3339)"))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_follow_the_rules() {
        for good in ["a", "task.event", "A-1_b.c", &"x".repeat(128)] {
            assert!(validate_name("type", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "..",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate_name("type", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_hand_dropped_message_is_completed() {
        let m = Message::complete(json!({"type": "t.e", "payload": {"a": 1}}), "me").unwrap();
        assert_eq!(m.source, "me");
        assert_eq!(m.priority, Priority::Normal);
        assert_eq!(m.target, None);
        assert_eq!(m.payload, json!({"a": 1}));
        assert!(Message::complete(json!({"payload": 1}), "me").is_err());
        assert!(Message::complete(json!({"type": "../x", "payload": 1}), "me").is_err());
        assert!(Message::complete(json!([1]), "me").is_err());
    }

    #[test]
    fn unknown_fields_pass_through_and_times_keep_the_seed_format() {
        let text = r#"{"id":"550e8400-e29b-41d4-a716-446655440000","type":"t","source":"h",
            "target":null,"priority":"low","created_at":"2024-01-15T10:30:00.123456Z",
            "payload":{},"trace":"abc"}"#;
        let m = Message::parse(text.as_bytes()).unwrap();
        assert_eq!(m.extra["trace"], json!("abc"));
        let back: Value = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(
            back["created_at"],
            json!("2024-01-15T10:30:00.123456+00:00")
        );
        assert_eq!(back["trace"], json!("abc"));
        assert_eq!(
            m.file_name(),
            "20240115T103000_550e8400-e29b-41d4-a716-446655440000.json"
        );
    }

    #[test]
    fn bad_fields_are_refused() {
        let base = json!({"id": Uuid::new_v4(), "type": "t", "source": "h", "target": null,
            "priority": "normal", "created_at": "2024-01-15T10:30:00Z", "payload": 1});
        for (key, bad) in [
            ("priority", json!("urgent")),
            ("id", json!("nope")),
            ("created_at", json!("yesterday")),
            ("target", json!("a/b")),
            ("source", json!("")),
        ] {
            let mut v = base.clone();
            v[key] = bad;
            let text = serde_json::to_vec(&v).unwrap();
            assert!(Message::parse(&text).is_err(), "{key}");
        }
        assert!(Message::parse(b"{").is_err());
    }

    #[test]
    fn ids_come_back_from_both_kinds_of_file_name() {
        let id = Uuid::new_v4();
        assert_eq!(
            id_from_file_name(&format!("20240115T103000_{id}.json")),
            Some(id)
        );
        assert_eq!(
            id_from_file_name(&format!("1-0000000000000007-{id}.json")),
            Some(id)
        );
        assert_eq!(id_from_file_name("garbage.json"), None);
    }

    #[test]
    fn send_order_is_priority_then_age() {
        let mut a = Message::new("t", "h", Value::Null);
        let mut b = a.clone();
        b.id = Uuid::new_v4();
        b.created_at = Timestamp::from(a.created_at.utc() + chrono::Duration::microseconds(1));
        assert_eq!(a.send_order(&b), Ordering::Less);
        a.priority = Priority::Low;
        assert_eq!(a.send_order(&b), Ordering::Greater);
    }
}
