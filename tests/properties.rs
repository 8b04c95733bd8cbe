//! Property tests: everything mesync parses from outside (message bytes, JSON values, names,
//! file names, config files and environment, HTTP requests, outbox files) is fuzzed, and
//! nothing may panic or hang.
//!
//! Each property runs through proptest's `TestRunner`, so a failure prints the minimal
//! failing input, and each prints how many cases it ran and how long they took. Case counts
//! are chosen so the whole file stays well under a minute on a slow two-core machine;
//! `PROPTEST_CASES` raises (or lowers) every count at once.

mod support;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use mesync::config::{Config, Overrides};
use mesync::message::{MAX_NAME_LEN, Message, Timestamp, id_from_file_name, validate_name};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};
use support::*;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------
// Running a property
// ---------------------------------------------------------------------------------------

/// Runs `test` on the `examples` (edge cases worth trying every time), then on `cases`
/// inputs drawn from `strategy` (or `$PROPTEST_CASES`); shrinks a failure to its minimal
/// input and panics with it. Prints how many cases ran and the time they took.
fn check<S>(
    name: &str,
    cases: u32,
    max_shrink_iters: u32,
    examples: Vec<S::Value>,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: fmt::Debug + Clone,
{
    let start = Instant::now();
    let mut failures = Vec::new();
    for example in &examples {
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(example.clone())));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(err)) => failures.push(format!("{err}\nexample input: {example:#?}")),
            Err(_) => failures.push(format!(
                "panicked (see above) on example input {example:#?}"
            )),
        }
    }
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    let config = RunnerConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters,
        max_shrink_time: 30_000,
        ..RunnerConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let ran = Cell::new(0u32);
    let result = runner.run(&strategy, |value| {
        ran.set(ran.get() + 1);
        test(value)
    });
    eprintln!(
        "property {name}: {} examples ({} failed) + {} generated cases ({cases} planned; \
         shrinking included) in {:.2?}",
        examples.len(),
        failures.len(),
        ran.get(),
        start.elapsed()
    );
    if let Err(err) = result {
        failures.push(err.to_string());
    }
    if !failures.is_empty() {
        panic!(
            "property {name} failed {} time(s):\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
}

/// Runs `f` on its own thread; panics (a hang) when it has not returned after `limit`,
/// and passes a panic of `f` on.
fn within<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => {
            let _ = handle.join();
            value
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still running after {limit:?}: it hangs")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the worker returned without sending"),
        },
    }
}

const PURE_LIMIT: Duration = Duration::from_secs(10);

/// Bytes that print as a byte string in proptest's "minimal failing input".
#[derive(Clone, PartialEq)]
struct Bytes(Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// Strings around the name rules: valid names, near misses, unicode, `/`, `..`, long ones.
fn name_ish() -> BoxedStrategy<String> {
    prop_oneof![
        5 => "[A-Za-z0-9][A-Za-z0-9._-]{0,20}",
        2 => "[A-Za-z0-9._/ -]{0,12}",
        1 => "\\PC{0,6}",
        1 => any::<String>(),
        1 => prop::sample::select(vec![
            "", "..", ".", "a/b", "../x", "-x", "_x", ".hidden", "é", "a b", "a\nb", "ａ", "٣",
            "x\u{0}", "A-1_b.c",
        ])
        .prop_map(str::to_string),
        1 => (126usize..=130).prop_map(|n| "x".repeat(n)),
        1 => (126usize..=130, "[é٣ａ]").prop_map(|(n, c)| format!("{}{c}", "y".repeat(n - 1))),
    ]
    .boxed()
}

/// A few host names, so fan-out stays small.
fn host_ish() -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::sample::select(vec!["tx", "rx", "h1", "h-2"]).prop_map(str::to_string),
        1 => name_ish(),
    ]
    .boxed()
}

/// RFC 3339 times in many spellings (fractions of 0 to 12 digits, offsets, `t`/`z`, a leap
/// second), invalid dates and garbage.
fn time_ish() -> BoxedStrategy<String> {
    let date = (
        0u32..=9999,
        1u32..=12,
        1u32..=31,
        0u32..=24,
        0u32..=59,
        0u32..=60,
    );
    let fraction = prop_oneof![Just(String::new()), "\\.[0-9]{1,12}"];
    let offset = prop::sample::select(vec![
        "Z", "z", "+00:00", "-00:00", "+05:30", "-23:59", "+23:59", "+24:00", "",
    ]);
    let separator = prop::sample::select(vec!["T", "t", " ", "_"]);
    prop_oneof![
        6 => (date, fraction, offset, separator).prop_map(
            |((y, mo, d, h, mi, s), frac, off, sep)| {
                format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{frac}{off}")
            }
        ),
        1 => Just(Timestamp::now().to_string()),
        1 => "\\PC{0,30}",
    ]
    .boxed()
}

/// Any JSON value: floats of every magnitude, big integers, unicode strings, nesting.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        "\\PC{0,12}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A string-valued field most of the time, any JSON value sometimes.
fn string_or_value(s: BoxedStrategy<String>) -> BoxedStrategy<Value> {
    prop_oneof![8 => s.prop_map(Value::String), 1 => json_value()].boxed()
}

/// JSON objects shaped like messages: each field present or not, valid or not, plus extra
/// fields (some named like the known ones).
fn message_value() -> BoxedStrategy<Value> {
    let id = prop_oneof![
        6 => any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string()),
        1 => any::<u128>().prop_map(|n| Uuid::from_u128(n).simple().to_string()),
        1 => any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string().to_uppercase()),
        1 => "\\PC{0,40}",
    ]
    .boxed();
    let priority = prop_oneof![
        6 => prop::sample::select(vec!["high", "normal", "low"]).prop_map(str::to_string),
        1 => prop::sample::select(vec!["High", "urgent", "", "0"]).prop_map(str::to_string),
    ]
    .boxed();
    let target = prop_oneof![1 => Just(Value::Null), 3 => string_or_value(host_ish())];
    let expires = prop_oneof![1 => Just(Value::Null), 3 => string_or_value(time_ish())];
    let extra_key = prop_oneof![
        3 => "[a-z_]{1,8}",
        1 => prop::sample::select(vec!["messages", "type", "id", "payload", "", "expires_at"])
            .prop_map(str::to_string),
        1 => "\\PC{0,8}",
    ];
    let p = 0.85;
    (
        (
            prop::option::weighted(p, string_or_value(id)),
            prop::option::weighted(p, string_or_value(name_ish())),
            prop::option::weighted(p, string_or_value(host_ish())),
            prop::option::weighted(p, target),
        ),
        (
            prop::option::weighted(p, string_or_value(priority)),
            prop::option::weighted(p, string_or_value(time_ish())),
            prop::option::weighted(0.3, expires),
            prop::option::weighted(p, json_value()),
            prop::collection::btree_map(extra_key, json_value(), 0..3),
        ),
    )
        .prop_map(
            |((id, kind, source, target), (priority, created, expires, payload, extra))| {
                let mut map = Map::new();
                for (key, value) in extra {
                    map.insert(key, value);
                }
                for (key, value) in [
                    ("id", id),
                    ("type", kind),
                    ("source", source),
                    ("target", target),
                    ("priority", priority),
                    ("created_at", created),
                    ("expires_at", expires),
                    ("payload", payload),
                ] {
                    if let Some(value) = value {
                        map.insert(key.to_string(), value);
                    }
                }
                Value::Object(map)
            },
        )
        .boxed()
}

/// Messages that are valid in every field but the payload and the extra fields, which are
/// arbitrary: they get past validation, so what comes after it is exercised too.
fn valid_message_value() -> BoxedStrategy<Value> {
    (
        any::<u128>(),
        "[A-Za-z0-9][A-Za-z0-9._-]{0,20}",
        host_ish().prop_filter("valid", |h| validate_name("h", h).is_ok()),
        prop::option::of(host_ish().prop_filter("valid", |h| validate_name("h", h).is_ok())),
        prop::sample::select(vec!["high", "normal", "low"]),
        time_ish().prop_filter("RFC 3339", |t| t.parse::<Timestamp>().is_ok()),
        json_value(),
        prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..2),
    )
        .prop_map(
            |(id, kind, source, target, priority, created, payload, extra)| {
                let mut v = json!({
                    "id": Uuid::from_u128(id).to_string(), "type": kind, "source": source,
                    "target": target, "priority": priority, "created_at": created,
                    "payload": payload,
                });
                for (key, value) in extra {
                    v.as_object_mut()
                        .expect("an object")
                        .entry(key)
                        .or_insert(value);
                }
                v
            },
        )
        .boxed()
}

/// JSON-ish text: messages as written, with a splice, truncated, with a key given twice,
/// deeply nested, or any text at all.
fn json_text() -> BoxedStrategy<Bytes> {
    prop_oneof![
        4 => message_value().prop_map(|v| Bytes(v.to_string().into_bytes())),
        2 => valid_message_value().prop_map(|v| Bytes(v.to_string().into_bytes())),
        1 => (message_value(), any::<prop::sample::Index>(), "\\PC{0,4}").prop_map(
            |(v, at, snippet)| {
                let text = v.to_string();
                let cut = floor_char_boundary(&text, at.index(text.len() + 1));
                Bytes(format!("{}{snippet}{}", &text[..cut], &text[cut..]).into_bytes())
            }
        ),
        1 => (message_value(), any::<prop::sample::Index>()).prop_map(|(v, at)| {
            let text = v.to_string().into_bytes();
            let cut = at.index(text.len() + 1);
            Bytes(text[..cut].to_vec())
        }),
        1 => (message_value(), prop::sample::select(vec!["type", "id", "payload", "source"]),
              json_value())
            .prop_map(|(v, key, value)| {
                let text = v.to_string();
                let twice = format!("{{{}:{value},", json!(key));
                Bytes(text.replacen('{', &twice, 1).into_bytes())
            }),
        1 => (1usize..3000).prop_map(|n| {
            Bytes(format!(r#"{{"type":"t","payload":{}{}}}"#, "[".repeat(n), "]".repeat(n))
                .into_bytes())
        }),
        1 => "\\PC{0,200}".prop_map(|s| Bytes(s.into_bytes())),
    ]
    .boxed()
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

// ---------------------------------------------------------------------------------------
// Messages, names, file names
// ---------------------------------------------------------------------------------------

/// On success the message validates and survives `to_json` → `parse` unchanged.
fn parse_round_trips(bytes: Bytes) -> Result<(), TestCaseError> {
    let input = bytes.0.clone();
    let parsed = within("Message::parse", PURE_LIMIT, move || Message::parse(&input));
    match parsed {
        Ok(message) => {
            prop_assert!(
                message.validate().is_ok(),
                "parsed but invalid: {:?}",
                message.validate()
            );
            let json = message.to_json();
            let again = Message::parse(&json);
            prop_assert_eq!(
                again.as_ref(),
                Ok(&message),
                "round trip changed the message; to_json wrote {}",
                String::from_utf8_lossy(&json)
            );
        }
        Err(err) => prop_assert!(!err.is_empty(), "empty error"),
    }
    Ok(())
}

/// Messages that must survive `to_json` → `parse`: times in unusual spellings (more than
/// microseconds, a leap second, an offset), floats that are hard to print and parse.
fn round_trip_examples() -> Vec<Bytes> {
    let message = |created_at: &str, payload: &str| {
        Bytes(
            format!(
                r#"{{"id":"550e8400-e29b-41d4-a716-446655440000","type":"t","source":"h",
                "target":null,"priority":"normal","created_at":"{created_at}",
                "payload":{payload}}}"#
            )
            .into_bytes(),
        )
    };
    vec![
        message("2024-01-15T10:30:00.123456+00:00", "{}"),
        message("2024-01-15T10:30:00Z", "{}"),
        message("2024-01-15T10:30:00.123456+05:30", "{}"),
        message("2016-12-31T23:59:60.5Z", "{}"),
        message("2024-01-15T10:30:00.1234567Z", "{}"),
        message("2024-01-15T10:30:00Z", "-1.1213011281101502e+234"),
        message(
            "2024-01-15T10:30:00Z",
            "[0.1, 1e-300, 5e-324, 1.7976931348623157e308]",
        ),
    ]
}

#[test]
fn parse_never_panics_on_arbitrary_bytes() {
    check(
        "Message::parse(arbitrary bytes)",
        2000,
        1024,
        ["", "{", "null", "[]", "{}", "\u{feff}{}", "{\"id\":1}"]
            .iter()
            .map(|s| Bytes(s.as_bytes().to_vec()))
            .chain([Bytes("[".repeat(100_000).into_bytes())])
            .collect(),
        prop::collection::vec(any::<u8>(), 0..512).prop_map(Bytes),
        parse_round_trips,
    );
}

#[test]
fn parse_never_panics_on_json_ish_text_and_round_trips() {
    check(
        "Message::parse(JSON-ish text) round trip",
        3000,
        1024,
        round_trip_examples(),
        json_text(),
        parse_round_trips,
    );
}

#[test]
fn complete_never_panics_and_success_validates() {
    let input = (
        prop_oneof![3 => message_value(), 1 => json_value()],
        name_ish(),
    );
    check(
        "Message::complete(arbitrary value, host)",
        3000,
        1024,
        vec![
            (json!([1]), "h".to_string()),
            (json!({"type": "t"}), "h".to_string()),
            (json!({"type": "t"}), "../x".to_string()),
            (json!({"type": "t", "source": "a/b"}), "h".to_string()),
            (
                json!({"type": "t", "id": null, "priority": null}),
                "h".to_string(),
            ),
            (
                json!({"type": "t", "payload": 1, "created_at": "2024-01-15T10:30:00.123456789Z"}),
                "h".to_string(),
            ),
        ],
        input,
        |(value, host)| {
            let had_source = value.get("source").is_some();
            let (v, h) = (value.clone(), host.clone());
            let completed = within("Message::complete", PURE_LIMIT, move || {
                Message::complete(v, &h)
            });
            if let Ok(message) = completed {
                prop_assert!(
                    message.validate().is_ok(),
                    "complete() returned an invalid message: {:?}",
                    message.validate()
                );
                if !had_source {
                    prop_assert_eq!(&message.source, &host, "a missing source is this host");
                }
            }
            Ok(())
        },
    );
}

/// The rule, written independently of the implementation: 1–128 bytes, the first an ASCII
/// letter or digit, every other one an ASCII letter, digit, `.`, `_` or `-`.
fn follows_name_rule(name: &str) -> bool {
    let bytes = name.as_bytes();
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    (1..=128).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(allowed)
}

#[test]
fn validate_name_accepts_exactly_the_rule() {
    assert_eq!(MAX_NAME_LEN, 128);
    let input = prop_oneof![
        3 => name_ish(),
        1 => "[A-Za-z0-9][A-Za-z0-9._-]{120,130}",
        1 => ".{0,300}",
    ];
    check(
        "validate_name vs ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        4000,
        1024,
        [
            "", "a", "0", "..", ".", "a/b", "-x", "_x", "a\u{0}", "é", "ａ", "٣", "a b", "a\nb",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([127, 128, 129].map(|n| "x".repeat(n)))
        .chain([format!("{}é", "x".repeat(126))])
        .collect(),
        input,
        |name| {
            let result = validate_name("type", &name);
            prop_assert_eq!(
                result.is_ok(),
                follows_name_rule(&name),
                "validate_name({:?}) = {:?}",
                name,
                result
            );
            if let Err(err) = result {
                prop_assert!(!err.contains('\n'), "error is not one line: {:?}", err);
            }
            Ok(())
        },
    );
}

#[test]
fn id_from_file_name_never_panics_and_finds_the_id() {
    let uuid_text = prop_oneof![
        any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string()),
        any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string().to_uppercase()),
        "[0-9a-fA-F-]{36}",
        "\\PC{36}",
    ];
    let arbitrary = prop_oneof![
        2 => any::<String>(),
        2 => ("\\PC{0,20}", uuid_text, prop::sample::select(vec![".json", ".JSON", "", ".json.tmp"]))
            .prop_map(|(a, b, c)| format!("{a}{b}{c}")),
        1 => "\\PC{0,4}\\.json",
    ];
    check(
        "id_from_file_name(arbitrary name)",
        3000,
        1024,
        vec![
            String::new(),
            ".json".into(),
            "é.json".into(),
            format!("{}é.json", "x".repeat(34)),
            "{550e8400-e29b-41d4-a716-446655440000}.json".into(),
            "550e8400e29b41d4a716446655440000.json".into(),
            "_550e8400-e29b-41d4-a716-446655440000.json".into(),
        ],
        arbitrary,
        |name| {
            let n = name.clone();
            if let Some(id) = within("id_from_file_name", PURE_LIMIT, move || {
                id_from_file_name(&n)
            }) {
                let stem = name.strip_suffix(".json");
                prop_assert!(
                    stem.is_some(),
                    "an id from a name without .json: {:?}",
                    name
                );
                let stem = stem.unwrap_or_default();
                prop_assert!(
                    stem.to_lowercase().ends_with(&id.to_string()),
                    "id {} is not the end of {:?}",
                    id,
                    name
                );
            }
            Ok(())
        },
    );

    // Any time between years 0 and 9999, at nanosecond precision.
    let generated = (
        any::<u128>(),
        -62_167_219_200i64..253_402_300_799,
        0u32..1_000_000_000,
        0u8..3,
        any::<u64>(),
    );
    check(
        "id_from_file_name(Message::file_name())",
        3000,
        1024,
        vec![
            (0, -62_167_219_200, 0, 0, 0),
            (u128::MAX, 253_402_300_798, 999_999_999, 2, u64::MAX),
        ],
        generated,
        |(id, secs, nanos, rank, seq)| {
            let mut message = Message::new("t", "h", Value::Null);
            message.id = Uuid::from_u128(id);
            let at = DateTime::<Utc>::from_timestamp(secs, nanos).expect("in range");
            message.created_at = Timestamp::from(at);
            let name = message.file_name();
            prop_assert_eq!(
                id_from_file_name(&name),
                Some(message.id),
                "agent name {}",
                name
            );
            let hub_name = format!("{rank}-{seq:016}-{}.json", message.id);
            prop_assert_eq!(
                id_from_file_name(&hub_name),
                Some(message.id),
                "hub name {}",
                hub_name
            );
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn duration_text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "0", "1", "10", "-1", "5m", "500ms", "1h", "10s", "0s", "1ns", "1 s", " 7 ", "1.5",
            "1e3", "18446744073709551615", "18446744073709551616", "99999999999999999999d",
            "18446744073709551615s", "584942417355y", "1y", "", "soon", "5 m 3s", "2w",
        ])
        .prop_map(str::to_string),
        1 => "[0-9]{1,25}[a-z]{0,3}",
        1 => "\\PC{0,12}",
    ]
    .boxed()
}

fn toml_value() -> BoxedStrategy<String> {
    prop_oneof![
        3 => duration_text().prop_map(|s| toml_string(&s)),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec![
            "true", "1.5", "-0.0", "inf", "nan", "[]", "{}", "[1, \"a\"]", "1979-05-27T07:32:00Z",
            "\"0.0.0.0:8080\"", "[\"127.0.0.1:0\", \"[::1]:8080\"]", "[\"nowhere\"]",
            "\"http://h:1\"", "\"ftp://x\"", "\"a\\nb\"", "\"\"", "\"../../etc/passwd\"",
        ])
        .prop_map(str::to_string),
        2 => any::<String>().prop_map(|s| toml_string(&s)),
        1 => "\\PC{0,10}",
    ]
    .boxed()
}

fn path_text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "token", "/nonexistent/x", "a\nb", "a\rb", "", ".", "/dev/null", "dir/", "../x",
            "\u{0}",
        ])
        .prop_map(str::to_string),
        1 => "\\PC{0,10}",
        1 => any::<String>(),
    ]
    .boxed()
}

/// A plausible value for `key` most of the time, any TOML value otherwise.
fn toml_value_for(key: &'static str) -> BoxedStrategy<String> {
    let plausible: BoxedStrategy<String> = match key {
        "server_url" => prop::sample::select(vec![
            "http://localhost:8080",
            "https://hub.internal:8443",
            "http://[::1]:1",
            "http://",
        ])
        .prop_map(toml_string)
        .boxed(),
        "host_id" => name_ish().prop_map(|s| toml_string(&s)).boxed(),
        "poll_interval" | "sent_ttl" | "http_timeout" | "hook_timeout" => prop_oneof![
            duration_text().prop_map(|s| toml_string(&s)),
            any::<i64>().prop_map(|n| n.to_string()),
            (0u32..100).prop_map(|n| n.to_string()),
        ]
        .boxed(),
        "listen" => prop_oneof![
            prop::sample::select(vec![
                "\"0.0.0.0:8080\"",
                "[\"127.0.0.1:0\", \"[::1]:8080\"]",
                "[\"nowhere\"]",
                "[]",
                "\"1.2.3.4:99999\"",
                "[1]",
            ])
            .prop_map(str::to_string),
            "[0-9.:\\[\\] ]{0,20}".prop_map(|s| toml_string(&s)),
        ]
        .boxed(),
        "max_message_bytes" | "max_pending_per_host" | "max_connections" => prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            prop::sample::select(vec!["0", "1", "18446744073709551615", "1e3", "\"1\""])
                .prop_map(str::to_string),
        ]
        .boxed(),
        _ => path_text().prop_map(|s| toml_string(&s)).boxed(),
    };
    prop_oneof![4 => plausible, 1 => toml_value()].boxed()
}

const TOP_KEYS: [&str; 12] = [
    "server_url",
    "host_id",
    "poll_interval",
    "sent_ttl",
    "http_timeout",
    "hook_timeout",
    "hook_user",
    "token",
    "token_file",
    "ca_file",
    "client_cert",
    "client_key",
];

const HUB_KEYS: [&str; 8] = [
    "listen",
    "data_dir",
    "max_message_bytes",
    "max_pending_per_host",
    "max_connections",
    "tls_cert",
    "tls_key",
    "client_ca",
];

/// `key = value` lines, each key at most once, each present with probability `p`.
fn toml_table(keys: &'static [&'static str], p: f64) -> BoxedStrategy<Vec<String>> {
    let lines: Vec<BoxedStrategy<Option<String>>> = keys
        .iter()
        .map(|&key| {
            prop::option::weighted(
                p,
                toml_value_for(key).prop_map(move |v| format!("{key} = {v}")),
            )
            .boxed()
        })
        .collect();
    lines
        .prop_map(|lines| lines.into_iter().flatten().collect())
        .boxed()
}

fn junk_line() -> BoxedStrategy<String> {
    prop_oneof![
        1 => ("\\PC{0,8}", toml_value()).prop_map(|(k, v)| format!("{} = {v}", toml_string(&k))),
        1 => ("[a-z_]{1,12}", toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => prop::sample::select(vec!["[hub]", "[other]", "[[hub]]", "hub = 1", "["])
            .prop_map(str::to_string),
        1 => "\\PC{0,20}",
    ]
    .boxed()
}

fn config_text() -> BoxedStrategy<String> {
    let structured = (
        toml_table(&TOP_KEYS, 0.3),
        prop::option::weighted(0.5, toml_table(&HUB_KEYS, 0.4)),
        prop::option::weighted(0.2, (junk_line(), any::<prop::sample::Index>())),
    )
        .prop_map(|(mut lines, hub, junk)| {
            if let Some(hub) = hub {
                lines.push("[hub]".to_string());
                lines.extend(hub);
            }
            if let Some((junk, at)) = junk {
                lines.insert(at.index(lines.len() + 1), junk);
            }
            lines.join("\n")
        });
    prop_oneof![
        6 => structured,
        1 => any::<String>(),
    ]
    .boxed()
}

fn env_value(key: &'static str) -> BoxedStrategy<String> {
    let specific: BoxedStrategy<String> = match key {
        "MESYNC_HOST_ID" => name_ish(),
        "MESYNC_SERVER_URL" => prop_oneof![
            prop::sample::select(vec![
                "http://localhost:8080",
                "https://h:1",
                "http://",
                "ftp://x",
                "http://[::1]:80",
                "localhost:8080",
                "http://h:99999",
                "http://a b",
                "",
            ])
            .prop_map(str::to_string),
            "https?://\\PC{0,20}",
        ]
        .boxed(),
        "MESYNC_LISTEN" => prop_oneof![
            prop::sample::select(vec![
                "0.0.0.0:8080",
                "127.0.0.1:0,[::1]:80",
                "nowhere",
                ",",
                " , ",
                "1.2.3.4:99999",
                "[::]:1",
                "localhost:80",
            ])
            .prop_map(str::to_string),
            "[0-9.:,\\[\\] ]{0,30}",
        ]
        .boxed(),
        "MESYNC_CONFIG" => prop::sample::select(vec!["/nonexistent/config.toml", "a\nb", "."])
            .prop_map(str::to_string)
            .boxed(),
        _ => duration_text(),
    };
    prop_oneof![4 => specific, 1 => any::<String>()].boxed()
}

const CONFIG_ENV: [&str; 10] = [
    "MESYNC_POLL_INTERVAL",
    "MESYNC_SENT_TTL",
    "MESYNC_HTTP_TIMEOUT",
    "MESYNC_HOOK_TIMEOUT",
    "MESYNC_HOST_ID",
    "MESYNC_SERVER_URL",
    "MESYNC_LISTEN",
    "MESYNC_TOKEN",
    "MESYNC_HOOK_USER",
    "MESYNC_CONFIG",
];

fn config_env() -> BoxedStrategy<BTreeMap<&'static str, String>> {
    let vars: Vec<BoxedStrategy<Option<(&'static str, String)>>> = CONFIG_ENV
        .iter()
        .map(|&key| {
            let p = if key == "MESYNC_CONFIG" { 0.05 } else { 0.4 };
            prop::option::weighted(p, env_value(key).prop_map(move |v| (key, v))).boxed()
        })
        .collect();
    vars.prop_map(|vars| vars.into_iter().flatten().collect())
        .boxed()
}

fn config_examples() -> Vec<(String, BTreeMap<&'static str, String>)> {
    let env = |pairs: &[(&'static str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (*k, v.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    vec![
        (String::new(), env(&[])),
        ("poll_interval = -1".into(), env(&[])),
        ("[hub]\nlisten = []".into(), env(&[])),
        ("token_file = \"a\\nb\"".into(), env(&[])),
        ("token_file = \"/dev/null\"".into(), env(&[])),
        (
            String::new(),
            env(&[("MESYNC_POLL_INTERVAL", "18446744073709551616")]),
        ),
        (
            String::new(),
            env(&[("MESYNC_SENT_TTL", "99999999999999999999d")]),
        ),
        (String::new(), env(&[("MESYNC_HTTP_TIMEOUT", "1ns")])),
        (String::new(), env(&[("MESYNC_LISTEN", ",")])),
        (String::new(), env(&[("MESYNC_HOST_ID", "a\nb")])),
        (String::new(), env(&[("MESYNC_SERVER_URL", "http://a\nb")])),
        (String::new(), env(&[("MESYNC_CONFIG", "a\nb")])),
        ("\"a\\nb\" = 1".into(), env(&[])),
    ]
}

#[test]
fn config_load_never_panics_and_errors_are_one_line() {
    let base = tempfile::Builder::new()
        .prefix("mesync-prop-config-")
        .tempdir()
        .expect("tempdir");
    let base_dir = base.path().to_path_buf();
    check(
        "Config::load_with(arbitrary config.toml, arbitrary env)",
        1500,
        1024,
        config_examples(),
        (config_text(), config_env()),
        |(text, vars)| {
            fs::write(base_dir.join("config.toml"), &text).expect("write config.toml");
            let mut env: BTreeMap<String, String> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            env.insert(
                "MESYNC_BASE_DIR".into(),
                base_dir.to_string_lossy().into_owned(),
            );
            let loaded = within("Config::load_with", PURE_LIMIT, move || {
                Config::load_with(&Overrides::default(), |key| env.get(key).cloned())
                    .map_err(|e| e.to_string())
            });
            match loaded {
                Ok(config) => {
                    prop_assert!(!config.poll_interval.is_zero());
                    prop_assert!(!config.http_timeout.is_zero());
                    prop_assert!(validate_name("host id", &config.host_id).is_ok());
                }
                Err(message) => {
                    prop_assert!(
                        !message.contains('\n'),
                        "the error is not one line: {:?}",
                        message
                    );
                    prop_assert!(!message.is_empty(), "empty error");
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// The hub's HTTP API
// ---------------------------------------------------------------------------------------

/// One request to the hub.
#[derive(Debug, Clone)]
enum Req {
    /// `POST /v1/messages` with this body.
    Send(Bytes),
    /// `POST /v1/ack` with this body.
    Ack(Bytes),
    /// `GET /v1/messages?QUERY` (a query that is valid in a URI; wait is 0).
    Pull(String),
    /// A valid HTTP request with unusual header values, written by hand.
    Headers {
        method: String,
        path: String,
        content_type: Option<Bytes>,
        authorization: Option<Bytes>,
        long_header: usize,
        extra: Vec<(String, Bytes)>,
        body: Bytes,
    },
    /// Bytes that are not a valid HTTP request.
    Malformed(Bytes),
}

fn send_body() -> BoxedStrategy<Bytes> {
    let mixed = prop_oneof![message_value(), valid_message_value()];
    prop_oneof![
        2 => message_value().prop_map(|v| Bytes(v.to_string().into_bytes())),
        2 => valid_message_value().prop_map(|v| Bytes(v.to_string().into_bytes())),
        2 => prop::collection::vec(mixed, 0..5)
            .prop_map(|v| Bytes(json!({ "messages": v }).to_string().into_bytes())),
        1 => json_value().prop_map(|v| Bytes(json!({ "messages": v }).to_string().into_bytes())),
        2 => json_text(),
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Bytes),
        1 => (1usize..20_000).prop_map(|n| Bytes(format!("{}{}", "[".repeat(n), "]".repeat(n))
            .into_bytes())),
    ]
    .boxed()
}

fn ack_body() -> BoxedStrategy<Bytes> {
    let id = prop_oneof![
        3 => any::<u128>().prop_map(|n| json!(Uuid::from_u128(n).to_string())),
        1 => json_value(),
    ];
    prop_oneof![
        3 => (string_or_value(host_ish()), prop::collection::vec(id, 0..5))
            .prop_map(|(host, ids)| Bytes(json!({"host": host, "ids": ids}).to_string()
                .into_bytes())),
        1 => (host_ish(), json_value())
            .prop_map(|(host, ids)| Bytes(json!({"host": host, "ids": ids, "x": 1}).to_string()
                .into_bytes())),
        1 => json_value().prop_map(|v| Bytes(v.to_string().into_bytes())),
        1 => prop::collection::vec(any::<u8>(), 0..128).prop_map(Bytes),
    ]
    .boxed()
}

/// Whether `text` may stand in a URI's query as it is.
fn uri_safe(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
}

/// Query strings made of characters a URI may hold, so the request reaches mesync; every
/// `wait` is forced to 0 so nothing long-polls.
fn query() -> BoxedStrategy<String> {
    let key = prop_oneof![
        3 => prop::sample::select(vec!["host", "wait", "max"]).prop_map(str::to_string),
        1 => "[A-Za-z0-9._~!$'()*+,;:@/?%é-]{0,8}",
    ];
    let value = prop_oneof![
        3 => host_ish().prop_filter("URI-safe", |h| uri_safe(h)),
        2 => prop::sample::select(vec![
            "0", "0.0", "-1", "nan", "inf", "-0", "1e-9", "", "1", "1000", "1001", "0x10",
            "99999999999999999999", "%30",
        ])
        .prop_map(str::to_string),
        1 => "[A-Za-z0-9._~!$'()*+,;:@/?%=é-]{0,12}",
    ];
    let valid = (
        host_ish().prop_filter("URI-safe", |h| uri_safe(h)),
        prop::option::of(0usize..1100),
    )
        .prop_map(|(host, max)| match max {
            Some(max) => format!("host={host}&wait=0&max={max}"),
            None => format!("host={host}"),
        });
    prop_oneof![
        2 => valid,
        3 => prop::collection::vec((key, value), 0..4).prop_map(|pairs| pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")),
        1 => "[A-Za-z0-9._~!$&'()*+,;=:@/?%é-]{0,40}",
    ]
    .prop_map(|q| no_long_poll(&q))
    .boxed()
}

/// Replaces every `wait` longer than 0.01 s by `wait=0`.
fn no_long_poll(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("wait", v)) if v.parse::<f64>().is_ok_and(|s| s.is_finite() && s > 0.01) => {
                "wait=0".to_string()
            }
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Header values httparse accepts: tab, visible ASCII, space, bytes of 0x80 and above.
fn header_value() -> BoxedStrategy<Bytes> {
    let byte = prop_oneof![
        8 => 0x20u8..=0x7e,
        1 => Just(b'\t'),
        2 => 0x80u8..=0xff,
    ];
    prop_oneof![
        2 => prop::collection::vec(byte, 0..64).prop_map(|mut v| {
            // Leading and trailing blanks are not part of a value; keep the value as sent.
            while v.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                v.remove(0);
            }
            Bytes(v)
        }),
        1 => prop::sample::select(vec![
            "application/json", "text/plain", "application/json; charset=utf-16",
            "multipart/form-data; boundary=x", "Bearer ", "Bearer x", "Basic Zm9vOmJhcg==",
            "*/*", "",
        ])
        .prop_map(|s| Bytes(s.as_bytes().to_vec())),
    ]
    .boxed()
}

fn headers_request() -> BoxedStrategy<Req> {
    let method = prop_oneof![
        4 => prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD",
            "OPTIONS"])
            .prop_map(str::to_string),
        1 => "[A-Z]{1,8}".prop_filter("not CONNECT", |m| m != "CONNECT"),
    ];
    let path = prop::sample::select(vec![
        "/v1/messages",
        "/v1/messages?host=rx&wait=0",
        "/v1/ack",
        "/v1/hosts",
        "/v1/hosts/nobody",
        "/v1/hosts/..",
        "/healthz",
        "/metrics",
        "/",
        "/v2/x",
        "*",
    ])
    .prop_map(str::to_string);
    let extra_name = "[A-Za-z][A-Za-z0-9-]{0,12}".prop_filter("not a framing header", |n| {
        !matches!(
            n.to_ascii_lowercase().as_str(),
            "content-length"
                | "transfer-encoding"
                | "connection"
                | "host"
                | "expect"
                | "upgrade"
                | "te"
                | "trailer"
        )
    });
    let body = prop_oneof![
        2 => send_body(),
        1 => ack_body(),
        1 => Just(Bytes(Vec::new())),
    ];
    (
        method,
        path,
        prop::option::weighted(0.7, header_value()),
        prop::option::weighted(0.7, header_value()),
        prop_oneof![4 => Just(0usize), 2 => 1usize..60_000, 1 => 60_000usize..200_000],
        prop::collection::vec((extra_name, header_value()), 0..4),
        body,
    )
        .prop_map(
            |(method, path, content_type, authorization, long_header, extra, body)| Req::Headers {
                method,
                path,
                content_type,
                authorization,
                long_header,
                extra,
                body,
            },
        )
        .boxed()
}

fn malformed_request() -> BoxedStrategy<Req> {
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..256),
        2 => prop::sample::select(vec![
            "GET /v1/messages?host=a b HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /v1/messages?host=a\"{}|^` HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
            "POST /v1/ack HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
            "POST /v1/ack HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
            "POST /v1/ack HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
            "POST /v1/ack HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}",
            "POST /v1/ack HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"type\"",
            "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{}",
            "GET / HTTP/9.9\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /healthz HTTP/1.1\r\nHost: x\r\n",
            "GET /healthz\r\n\r\n",
            "\r\n\r\n\r\n",
            "GET /healthz HTTP/1.1\r\n Host: x\r\n\r\n",
            "GET /healthz HTTP/1.1\r\nHost x\r\n\r\n",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        1 => (1usize..500_000).prop_map(|n| format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(n)).into_bytes()),
        1 => (95usize..150).prop_map(|n| {
            let mut r = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
            for i in 0..n {
                r.push_str(&format!("X-{i}: v\r\n"));
            }
            r.push_str("\r\n");
            r.into_bytes()
        }),
    ]
    .prop_map(|b| Req::Malformed(Bytes(b)))
    .boxed()
}

fn hub_request() -> BoxedStrategy<Req> {
    prop_oneof![
        4 => send_body().prop_map(Req::Send),
        2 => ack_body().prop_map(Req::Ack),
        2 => query().prop_map(Req::Pull),
        2 => headers_request(),
        1 => malformed_request(),
    ]
    .boxed()
}

/// Writes `request` on a new connection and reads until the hub closes it. With
/// `half_close`, the write side is shut after the request (for malformed requests, so the
/// hub sees their end).
fn raw_exchange(addr: &str, request: &[u8], half_close: bool) -> std::io::Result<Vec<u8>> {
    let stream = TcpStream::connect(addr)?;
    let timeout = Duration::from_secs(15);
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let data = request.to_vec();
    let sender = thread::spawn(move || {
        let _ = writer.write_all(&data);
        if half_close {
            let _ = writer.shutdown(Shutdown::Write);
        }
    });
    let mut reader = stream;
    let mut buf = Vec::new();
    let result = reader.read_to_end(&mut buf);
    let _ = sender.join();
    match result {
        Ok(_) => Ok(buf),
        // A reset after a complete answer (the hub closed with our body unread) is fine.
        Err(_) if !buf.is_empty() => Ok(buf),
        Err(e) => Err(e),
    }
}

/// Status, headers (names lowercased) and body of an HTTP answer.
type RawAnswer = (u16, Vec<(String, String)>, Vec<u8>);

/// Parses an answer read up to the close of the connection (`Connection: close`).
fn parse_raw(buf: &[u8]) -> Option<RawAnswer> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    if !status_line.starts_with("HTTP/1.") {
        return None;
    }
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &buf[end + 4..];
    let body = match headers.iter().find(|(k, _)| k == "content-length") {
        Some((_, len)) => rest[..len.parse::<usize>().ok()?.min(rest.len())].to_vec(),
        None => rest.to_vec(),
    };
    Some((status, headers, body))
}

/// How many answers of each kind and status the hub fuzzing saw, to show its coverage.
static ANSWERS: std::sync::Mutex<BTreeMap<String, u32>> = std::sync::Mutex::new(BTreeMap::new());

fn count_answer(what: &str) {
    let mut answers = ANSWERS.lock().unwrap_or_else(|e| e.into_inner());
    *answers.entry(what.to_string()).or_default() += 1;
}

/// Checks one answer of the hub to a valid request.
fn check_answer(
    what: &str,
    method: &str,
    path: &str,
    status: u16,
    body: &[u8],
) -> Result<(), TestCaseError> {
    let text = String::from_utf8_lossy(body);
    // The request without its query string, for the coverage counts.
    let kind = match what.split_once('?') {
        Some((head, rest)) => format!("{head}{}", rest.find(' ').map_or("", |i| &rest[i..])),
        None => what.to_string(),
    };
    let accepted = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("accepted").and_then(Value::as_array).map(Vec::len))
        .filter(|n| *n > 0)
        .map(|n| format!(" ({n} accepted)"))
        .unwrap_or_default();
    count_answer(&format!("{kind} -> {status}{accepted}"));
    prop_assert!(
        (100..600).contains(&status),
        "{}: status {} is not an HTTP status",
        what,
        status
    );
    prop_assert!(
        status < 500,
        "{}: the hub failed on this input with {}: {}",
        what,
        status,
        text
    );
    if method == "HEAD" {
        return Ok(());
    }
    if status >= 400 {
        let value: Result<Value, _> = serde_json::from_slice(body);
        let error = value
            .as_ref()
            .ok()
            .and_then(|v| v.get("error"))
            .and_then(Value::as_str);
        prop_assert!(
            error.is_some_and(|e| !e.is_empty()),
            "{}: a {} answer must be {{\"error\": \"...\"}}, got {:?}",
            what,
            status,
            text
        );
    } else if !path.starts_with("/metrics") {
        prop_assert!(
            serde_json::from_slice::<Value>(body).is_ok(),
            "{}: a {} answer that is not JSON: {:?}",
            what,
            status,
            text
        );
    }
    Ok(())
}

fn hub_case(addr: &str, req: Req) -> Result<(), TestCaseError> {
    let timeout = Duration::from_secs(15);
    match req {
        Req::Send(body) => {
            let r = http_request(addr, "POST", "/v1/messages", Some(&body.0), timeout)
                .map_err(|e| TestCaseError::fail(format!("POST /v1/messages: no answer: {e}")))?;
            check_answer(
                "POST /v1/messages",
                "POST",
                "/v1/messages",
                r.status,
                &r.body,
            )
        }
        Req::Ack(body) => {
            let r = http_request(addr, "POST", "/v1/ack", Some(&body.0), timeout)
                .map_err(|e| TestCaseError::fail(format!("POST /v1/ack: no answer: {e}")))?;
            check_answer("POST /v1/ack", "POST", "/v1/ack", r.status, &r.body)
        }
        Req::Pull(query) => {
            let path = format!("/v1/messages?{query}");
            let started = Instant::now();
            let r = http_request(addr, "GET", &path, None, timeout)
                .map_err(|e| TestCaseError::fail(format!("GET {path}: no answer: {e}")))?;
            prop_assert!(
                started.elapsed() < Duration::from_secs(5),
                "GET {} took {:?} with wait=0",
                path,
                started.elapsed()
            );
            check_answer(&format!("GET {path}"), "GET", &path, r.status, &r.body)
        }
        Req::Headers {
            method,
            path,
            content_type,
            authorization,
            long_header,
            extra,
            body,
        } => {
            let mut request =
                format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n")
                    .into_bytes();
            let mut header = |name: &str, value: &[u8]| {
                request.extend_from_slice(name.as_bytes());
                request.extend_from_slice(b": ");
                request.extend_from_slice(value);
                request.extend_from_slice(b"\r\n");
            };
            if let Some(v) = &content_type {
                header("Content-Type", &v.0);
            }
            if let Some(v) = &authorization {
                header("Authorization", &v.0);
            }
            if long_header > 0 {
                header("X-Long", "a".repeat(long_header).as_bytes());
            }
            for (name, value) in &extra {
                header(name, &value.0);
            }
            if method != "GET" && method != "HEAD" || !body.0.is_empty() {
                header("Content-Length", body.0.len().to_string().as_bytes());
            }
            request.extend_from_slice(b"\r\n");
            request.extend_from_slice(&body.0);
            let what = format!("{method} {path} with unusual headers");
            let buf = raw_exchange(addr, &request, false)
                .map_err(|e| TestCaseError::fail(format!("{what}: no answer: {e}")))?;
            let Some((status, _, answer)) = parse_raw(&buf) else {
                return Err(TestCaseError::fail(format!(
                    "{what}: not an HTTP answer: {:?}",
                    String::from_utf8_lossy(&buf)
                )));
            };
            check_answer(&what, &method, &path, status, &answer)
        }
        Req::Malformed(bytes) => {
            // Any answer, or none, is fine for bytes that are not HTTP; the hub must close the
            // connection instead of hanging, and keep running (checked after the cases).
            let buf = raw_exchange(addr, &bytes.0, true);
            match buf {
                Ok(buf) if buf.is_empty() => {
                    count_answer("malformed -> closed without an answer");
                    Ok(())
                }
                Ok(buf) => {
                    let status = parse_raw(&buf).map_or(0, |(status, _, _)| status);
                    count_answer(&format!("malformed -> {status}"));
                    prop_assert!(
                        parse_raw(&buf).is_some(),
                        "malformed request: the answer is not HTTP: {:?}",
                        String::from_utf8_lossy(&buf)
                    );
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
                Err(e) => Err(TestCaseError::fail(format!(
                    "malformed request: the hub neither answered nor closed: {e}"
                ))),
            }
        }
    }
}

#[test]
fn hub_survives_arbitrary_requests() {
    let mut hub = Hub::start();
    let addr = hub.addr().to_string();
    // A few registered hosts, so broadcasts fan out.
    for host in ["tx", "rx"] {
        let r = hub.get(&format!("/v1/messages?host={host}&wait=0"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    check(
        "hub HTTP API on arbitrary requests",
        300,
        64,
        vec![
            Req::Send(Bytes(b"[".repeat(100_000))),
            Req::Send(Bytes(b"{\"messages\": {}}".to_vec())),
            Req::Ack(Bytes(br#"{"host": "../x", "ids": []}"#.to_vec())),
            Req::Pull("host=rx&wait=0&max=1000".into()),
            Req::Pull("host=rx&host=..".into()),
            Req::Pull("wait=nan".into()),
        ],
        hub_request(),
        |req| hub_case(&addr, req),
    );
    let answers = ANSWERS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    eprintln!("answers of the hub (request -> status): {answers:#?}");
    assert!(hub.is_running(), "the hub died during the fuzzing");
    let r = hub.get("/healthz");
    assert_eq!(r.status, 200, "/healthz after the fuzzing: {}", r.text());
    assert!(
        !hub.logs.contains("panicked"),
        "the hub logged a panic: {:?}",
        hub.logs
            .lines()
            .iter()
            .filter(|l| l.contains("panicked"))
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------
// Outbox files
// ---------------------------------------------------------------------------------------

const AGENT_HOST: &str = "fuzz-agent";

/// Contents of an outbox file: full messages, hand-dropped ones, JSON-ish text, bytes.
fn outbox_contents() -> BoxedStrategy<Bytes> {
    let hand_dropped = (name_ish(), json_value(), prop::option::of(host_ish())).prop_map(
        |(kind, payload, target)| {
            let mut v = json!({"type": kind, "payload": payload});
            if let Some(target) = target {
                v["target"] = json!(target);
            }
            Bytes(v.to_string().into_bytes())
        },
    );
    prop_oneof![
        2 => message_value().prop_map(|v| Bytes(v.to_string().into_bytes())),
        2 => valid_message_value().prop_map(|v| Bytes(v.to_string().into_bytes())),
        2 => hand_dropped,
        1 => json_text(),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Bytes),
        1 => Just(Bytes(Vec::new())),
    ]
    .boxed()
}

/// A file name mesync must handle: not starting with a dot, without `/` or NUL.
fn outbox_name() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "[^./\\x00][^/\\x00]{0,30}",
        1 => "[A-Za-z0-9_-]{1,12}(\\.json)?",
        1 => any::<u128>().prop_map(|n| format!("20240115T103000_{}.json", Uuid::from_u128(n))),
    ]
    .boxed()
}

/// One case: files dropped together (in this order); `fresh` ones keep their modification
/// time, the others are backdated past the agent's grace period for half-written files.
#[derive(Debug, Clone)]
struct OutboxCase {
    files: Vec<(String, Bytes)>,
    fresh: bool,
    /// Each file is dropped once the one before it has left the outbox.
    stagger: bool,
}

fn outbox_case() -> BoxedStrategy<OutboxCase> {
    (
        prop::collection::vec((outbox_name(), outbox_contents()), 1..4),
        prop::option::weighted(0.2, (any::<prop::sample::Index>(), outbox_contents())),
        any::<prop::sample::Index>(),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(mut files, twin, at, fresh, stagger)| {
            // Sometimes a file and its `.reason` namesake, in either order.
            if let Some((which, contents)) = twin {
                let name = format!("{}.reason", files[which.index(files.len())].0);
                files.insert(at.index(files.len() + 1), (name, contents));
            }
            let mut seen = BTreeSet::new();
            files.retain(|(name, _)| seen.insert(name.clone()));
            OutboxCase {
                files,
                fresh,
                stagger,
            }
        })
        .boxed()
}

/// What the agent must do with `bytes`: send it (the message, completed) or refuse it.
fn predict(bytes: &[u8]) -> Result<(Message, bool), String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let explicit_id = value.get("id").is_some();
    Message::complete(value, AGENT_HOST).map(|m| (m, explicit_id))
}

fn clear_dir(dir: &Path) {
    for name in list_dir_all(dir) {
        let _ = fs::remove_file(dir.join(name));
    }
}

fn drop_file(outbox: &Path, n: usize, name: &str, contents: &[u8], fresh: bool) {
    let tmp = outbox.join(format!(".prop-{n}.tmp"));
    let mut file = fs::File::create(&tmp).expect("create temp file");
    file.write_all(contents).expect("write temp file");
    if !fresh {
        let past = SystemTime::now() - Duration::from_secs(60);
        file.set_modified(past).expect("backdate temp file");
    }
    drop(file);
    fs::rename(&tmp, outbox.join(name)).expect("rename into outbox");
}

/// The files of `failed/` that hold `contents` under a name made from `name` (`name`,
/// `name.N`, or another suffix where `name` itself ends in `.reason`).
fn copies_in(failed: &Path, name: &str, contents: &[u8]) -> Vec<String> {
    let stem = name.strip_suffix(".reason").unwrap_or(name);
    list_dir_all(failed)
        .into_iter()
        .filter(|candidate| {
            candidate.starts_with(stem)
                && fs::read(failed.join(candidate)).is_ok_and(|c| c == contents)
        })
        .collect()
}

/// Each refused file's copy in `failed/`, with a non-empty `.reason` beside it, a
/// different copy for each file; or which file has none.
fn failed_copies(failed: &Path, refused: &[(String, Vec<u8>)]) -> Result<Vec<String>, String> {
    let candidates: Vec<Vec<String>> = refused
        .iter()
        .map(|(name, contents)| {
            copies_in(failed, name, contents)
                .into_iter()
                .filter(|copy| {
                    fs::read(failed.join(format!("{copy}.reason"))).is_ok_and(|r| !r.is_empty())
                })
                .collect()
        })
        .collect();
    fn assign(candidates: &[Vec<String>], taken: &mut Vec<String>) -> bool {
        let Some((first, rest)) = candidates.split_first() else {
            return true;
        };
        for copy in first {
            if !taken.contains(copy) {
                taken.push(copy.clone());
                if assign(rest, taken) {
                    return true;
                }
                taken.pop();
            }
        }
        false
    }
    let mut taken = Vec::new();
    if assign(&candidates, &mut taken) {
        return Ok(taken);
    }
    let missing: Vec<String> = refused
        .iter()
        .zip(&candidates)
        .map(|((name, _), c)| format!("{name:?} -> copies with a reason: {c:?}"))
        .collect();
    Err(missing.join("\n"))
}

fn outbox_case_run(
    agent: &Agent,
    case: OutboxCase,
    counter: &Cell<usize>,
) -> Result<(), TestCaseError> {
    let (outbox, sent, failed) = (agent.dir("outbox"), agent.dir("sent"), agent.dir("failed"));
    clear_dir(&outbox);
    clear_dir(&sent);
    clear_dir(&failed);
    let mut to_fail: Vec<(String, Vec<u8>)> = Vec::new();
    let mut explicit_ids: BTreeSet<Uuid> = BTreeSet::new();
    let mut fresh_ids = 0usize;
    for (name, contents) in &case.files {
        match predict(&contents.0) {
            Ok((_, false)) => fresh_ids += 1,
            Ok((message, true)) => {
                explicit_ids.insert(message.id);
            }
            Err(_) => to_fail.push((name.clone(), contents.0.clone())),
        }
    }
    let deadline = Instant::now() + TIMEOUT;
    for (name, contents) in &case.files {
        counter.set(counter.get() + 1);
        drop_file(&outbox, counter.get(), name, &contents.0, case.fresh);
        while case.stagger && outbox.join(name).exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
    // Done when every file left the outbox and every refused one is in failed/ with its
    // reason; or, when that never comes, once failed/ has stopped changing for a while.
    let done = || list_dir(&outbox).is_empty() && failed_copies(&failed, &to_fail).is_ok();
    let mut last_failed = list_dir_all(&failed);
    let mut unchanged_since = Instant::now();
    while !done() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        let now_failed = list_dir_all(&failed);
        if now_failed != last_failed {
            last_failed = now_failed;
            unchanged_since = Instant::now();
        } else if list_dir(&outbox).is_empty()
            && unchanged_since.elapsed() > Duration::from_millis(500)
        {
            break;
        }
    }
    let state = || {
        format!(
            "outbox/: {:?}\nsent/: {:?}\nfailed/: {:?}",
            list_dir_all(&outbox),
            list_dir_all(&sent),
            list_dir_all(&failed)
        )
    };
    prop_assert!(
        list_dir(&outbox).is_empty(),
        "files still in outbox/ after {:?}\n{}",
        TIMEOUT,
        state()
    );
    if let Err(missing) = failed_copies(&failed, &to_fail) {
        return Err(TestCaseError::fail(format!(
            "every refused file must be in failed/ unchanged, each with its own .reason \
             beside it:\n{missing}\n{}",
            state()
        )));
    }
    // Everything that was not refused went to the hub and then to sent/.
    let sent_ids: Vec<Uuid> = list_dir(&sent)
        .iter()
        .filter_map(|n| id_from_file_name(n))
        .collect();
    for id in &explicit_ids {
        prop_assert!(
            sent_ids.contains(id),
            "message {} is not in sent/\n{}",
            id,
            state()
        );
    }
    let others = sent_ids
        .iter()
        .filter(|id| !explicit_ids.contains(id))
        .count();
    prop_assert_eq!(
        others,
        fresh_ids,
        "hand-dropped messages in sent/ (ids filled in by the agent)\n{}",
        state()
    );
    for (name, contents) in &case.files {
        if predict(&contents.0).is_ok() {
            let copies = copies_in(&failed, name, &contents.0);
            prop_assert!(
                copies.is_empty(),
                "{:?} is a valid message but went to failed/ as {:?}\n{}",
                name,
                copies,
                state()
            );
        }
    }
    Ok(())
}

fn outbox_examples() -> Vec<OutboxCase> {
    let file = |name: &str, contents: &[u8]| (name.to_string(), Bytes(contents.to_vec()));
    vec![
        // A hand-dropped message, a full one, and files that are not messages.
        OutboxCase {
            files: vec![
                file("job.json", br#"{"type": "t.e", "payload": {"a": 1}}"#),
                file("empty", b""),
                file("bad type", br#"{"type": "../x", "payload": 1}"#),
            ],
            fresh: false,
            stagger: false,
        },
        // A file still being written (young) goes to failed/ only after the grace period.
        OutboxCase {
            files: vec![file("half.json", br#"{"type": "t", "pay"#)],
            fresh: true,
            stagger: false,
        },
        // A refused file named like the reason of another refused file that comes after it.
        OutboxCase {
            files: vec![file("x.reason", b"not json"), file("x", b"{")],
            fresh: false,
            stagger: true,
        },
    ]
}

#[test]
fn outbox_files_all_end_in_sent_or_failed() {
    let hub = Hub::start();
    let mut agent = Agent::new(&hub.url(), AGENT_HOST);
    agent.start();
    hub.wait_registered(&[AGENT_HOST]);
    let counter = Cell::new(0usize);
    check(
        "outbox files end in sent/ or failed/",
        25,
        32,
        outbox_examples(),
        outbox_case(),
        |case| outbox_case_run(&agent, case, &counter),
    );
    assert!(agent.is_running(), "the agent died during the fuzzing");
    assert!(
        !agent.logs.contains("panicked"),
        "the agent logged a panic: {:?}",
        agent
            .logs
            .lines()
            .iter()
            .filter(|l| l.contains("panicked"))
            .collect::<Vec<_>>()
    );
}
