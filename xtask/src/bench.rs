//! `cargo xtask bench`: latency of single messages through a real hub and real agents.
//!
//! A message file is renamed into the sender's `outbox/` (as a script would drop it); the
//! clock stops when the message's file is in the receiver's `inbox/`, and when its hook
//! has started (the hook's first act is to create a marker file). Messages go one at a
//! time, so this is the latency of an idle system, not of a loaded one.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::procs::{build_release, http_get, start_agent, start_hub, wait_until};

const SHORT_MESSAGES: usize = 50;
const FULL_MESSAGES: usize = 500;

pub fn run(args: &[String]) -> Result<(), String> {
    let short = match args {
        [] => false,
        [flag] if flag == "--short" => true,
        _ => return Err("usage: cargo xtask bench [--short]".into()),
    };
    let count = if short { SHORT_MESSAGES } else { FULL_MESSAGES };
    let binary = build_release()?;
    let tmp = tempfile::Builder::new()
        .prefix("mesync-bench.")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let root = tmp.path();

    let (_hub, addr) = start_hub(&binary, &root.join("hub"))?;
    let sender_base = root.join("sender");
    let receiver_base = root.join("receiver");
    let _sender = start_agent(&binary, &sender_base, "sender", &addr)?;
    let _receiver = start_agent(&binary, &receiver_base, "receiver", &addr)?;
    let markers = root.join("markers");
    fs::create_dir_all(&markers).map_err(|e| e.to_string())?;
    install_marker_hook(&receiver_base, &markers)?;
    wait_until(Duration::from_secs(20), "agents to register", || {
        http_get(&addr, "/v1/hosts")
            .is_ok_and(|b| b.contains("\"sender\"") && b.contains("\"receiver\""))
    })?;

    let mut to_inbox = Vec::with_capacity(count);
    let mut to_hook = Vec::with_capacity(count);
    // One warm-up message: connections and caches, not measured.
    for i in 0..=count {
        let (inbox, hook) = one_message(&sender_base, &receiver_base, &markers, i)?;
        if i > 0 {
            to_inbox.push(inbox);
            to_hook.push(hook);
        }
    }
    println!(
        "mesync bench ({} mode): {count} single messages, sender agent -> hub -> receiver agent, loopback",
        if short { "short" } else { "full" }
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9}",
        "latency (ms)", "p50", "p99", "max"
    );
    print_row("outbox file -> receiver inbox file", &mut to_inbox);
    print_row("outbox file -> receiver hook start", &mut to_hook);
    Ok(())
}

/// Sends message `i` and returns its two latencies.
fn one_message(
    sender: &Path,
    receiver: &Path,
    markers: &Path,
    i: usize,
) -> Result<(Duration, Duration), String> {
    let id = format!("00000000-0000-4000-8000-{i:012}");
    let body = format!(
        r#"{{"id":"{id}","type":"bench.ping","source":"sender","target":"receiver","priority":"normal","created_at":"2024-01-01T00:00:00.000000+00:00","payload":{{"n":{i}}}}}"#
    );
    let temp = sender.join("outbox").join(format!(".{i}.tmp"));
    let name = format!("20240101T000000_{id}.json");
    fs::write(&temp, body).map_err(|e| e.to_string())?;
    let inbox_file = receiver.join("inbox").join(&name);
    let marker = markers.join(&id);
    let start = Instant::now();
    fs::rename(&temp, sender.join("outbox").join(&name)).map_err(|e| e.to_string())?;
    let mut inbox = None;
    let deadline = start + Duration::from_secs(30);
    while Instant::now() < deadline {
        if inbox.is_none() && inbox_file.exists() {
            inbox = Some(start.elapsed());
        }
        if inbox.is_some() && marker.exists() {
            return Ok((inbox.unwrap_or_default(), start.elapsed()));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    Err(format!("message {i} did not arrive within 30 s"))
}

fn install_marker_hook(receiver: &Path, markers: &Path) -> Result<(), String> {
    let hook = receiver.join("hooks").join("bench.ping");
    let script = format!(
        "#!/bin/sh\n: > '{}'/\"$MESYNC_MESSAGE_ID\"\ncat > /dev/null\n",
        markers.display()
    );
    fs::write(&hook, script).map_err(|e| e.to_string())?;
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())
}

fn print_row(label: &str, samples: &mut [Duration]) {
    samples.sort();
    let pick = |q: f64| {
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples
            .get(index)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{label:<34} {:>9.2} {:>9.2} {:>9.2}",
        pick(0.5),
        pick(0.99),
        pick(1.0)
    );
}
