//! `cargo xtask bench [--short]`: mesync's speed, measured with the real binary (release
//! build) as hub and agents on loopback in a temporary directory, printed in one table
//! beside the machine's own file-system limits and the real peers (Redis, mosquitto)
//! measured in the same run: the disk is shared and drifts, so only ratios taken in one
//! run mean anything.
//!
//! 1. latency: a message file renamed into one agent's `outbox/` until it is in another
//!    agent's `inbox/`, and until its hook starts; one message at a time.
//! 2. durable throughput end to end: messages of about 300 bytes, 1 sender → 1 receiver
//!    and 4 senders → 1 receiver; from the first message handed to the sender to the hub
//!    counting the last one acknowledged by the receiver (which acks only what its inbox
//!    holds durably). 1 → 1 is measured the three ways users hand messages over: complete
//!    message files renamed into `outbox/`, the minimal hand-dropped file the README shows
//!    (`type`, `target`, `payload`, which the agent completes), and `mesync send`, one
//!    process per message run from shell loops as a script would.
//! 3. broadcast: one message to 1,000 light hosts long-polling the hub, until each has it.
//! 4. idle: the hub's RSS per idle long-poll (5,000, 10,000 and 20,000 light hosts, over
//!    TLS, real agents) and its CPU while idle (see `idle`).
//! 5. the machine's limits (see `disk`), 6. the peers (see `peers`).
//!
//! `--short` runs smaller counts so CI can check that the bench works; it asserts nothing
//! about timings.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::light::{self, Fleet};
use crate::procs::{Proc, build_release, http_get, start_agent, start_hub, wait_until};
use crate::{disk, idle, peers};

/// The sizes of one run.
struct Mode {
    name: &'static str,
    latency_messages: usize,
    throughput_messages: usize,
    /// `mesync send` costs a process per message, so the short mode sends fewer.
    send_messages: usize,
    broadcast_hosts: usize,
    idle: &'static idle::Sizes,
}

const FULL: Mode = Mode {
    name: "full",
    latency_messages: 500,
    throughput_messages: 20_000,
    send_messages: 20_000,
    broadcast_hosts: 1_000,
    idle: &idle::FULL,
};

const SHORT: Mode = Mode {
    name: "short",
    latency_messages: 50,
    throughput_messages: 2_000,
    send_messages: 400,
    broadcast_hosts: 100,
    idle: &idle::SHORT,
};

/// About 300 bytes once wrapped in a message.
const PAYLOAD: &str = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. ut enim ad minim veniam, quis nostrud";

pub fn run(args: &[String]) -> Result<(), String> {
    let mode = match args {
        [] => &FULL,
        [flag] if flag == "--short" => &SHORT,
        _ => return Err("usage: cargo xtask bench [--short]".into()),
    };
    let binary = build_release()?;
    light::raise_fd_limit();
    // Under target/, not in /tmp: /tmp is a tmpfs on many systems, where fsync costs nothing
    // and the figures would mean nothing.
    let parent = crate::project_root().join("target").join("bench");
    fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("run.")
        .tempdir_in(&parent)
        .map_err(|e| {
            format!(
                "cannot create a temporary directory in {}: {e}",
                parent.display()
            )
        })?;
    let root = tmp.path();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;

    println!("mesync bench, {} mode, in {}", mode.name, root.display());
    let mut table = Table::default();
    latency(&binary, &root.join("latency"), mode, &mut table)?;
    // The machine and the peers are measured right beside mesync's throughput, in the same
    // directory, so that the ratios compare like with like.
    let n = mode.throughput_messages;
    let disk = disk::measure(&root.join("disk"), mode.name == "short")?;
    let redis = peers::redis(&root.join("peers"), n, 300)?;
    let mosquitto = peers::mosquitto(&root.join("peers"), n, 300)?;
    let complete = throughput(&binary, &root.join("tp1"), 1, n, Handover::Complete)?;
    let hand = throughput(&binary, &root.join("tp1-hand"), 1, n, Handover::HandDropped)?;
    let sends = mode.send_messages;
    let send = throughput(
        &binary,
        &root.join("tp1-send"),
        1,
        sends,
        Handover::Send { loops: SEND_LOOPS },
    )?;
    let four = throughput(&binary, &root.join("tp4"), 4, n, Handover::Complete)?;
    let ratios = |rate: f64| {
        let mut parts = vec![
            format!("{:.1}x fsync-per-file", rate / disk.fsync_per_file),
            format!("{:.2}x file pipeline", rate / disk.pipeline),
        ];
        for peer in [&redis, &mosquitto].into_iter().flatten() {
            parts.push(format!("{:.2}x {}", rate / peer.msgs_per_sec, peer.name));
        }
        parts.join(", ")
    };
    table.row(
        "2. throughput 1 -> 1, complete files",
        format!(
            "{:.0} msg/s ({n} x {} B); {}",
            complete.rate,
            complete.bytes,
            ratios(complete.rate)
        ),
    );
    table.row(
        "   throughput 1 -> 1, hand-dropped",
        format!(
            "{:.0} msg/s ({n} x {} B {{type, target, payload}}); {}",
            hand.rate,
            hand.bytes,
            ratios(hand.rate)
        ),
    );
    table.row(
        "   throughput 1 -> 1, mesync send",
        format!(
            "{:.0} msg/s ({sends} processes, {SEND_LOOPS} shell loops, {:.0} sends/s); {}",
            send.rate,
            send.handed_over_rate,
            ratios(send.rate)
        ),
    );
    table.row(
        "   throughput 4 -> 1",
        format!(
            "{:.0} msg/s ({n} x {} B); {}",
            four.rate,
            four.bytes,
            ratios(four.rate)
        ),
    );
    let broadcast = runtime.block_on(broadcast(
        &binary,
        &root.join("broadcast"),
        mode.broadcast_hosts,
    ))?;
    table.row(
        format!("3. broadcast to {} hosts", mode.broadcast_hosts),
        format!("{:.1} ms until every host has it", ms(broadcast)),
    );
    for (label, value) in
        runtime.block_on(idle::rows(&binary, &root.join("idle"), mode.idle, None))?
    {
        table.row(label, value);
    }
    table.row(
        "5. disk: fsync per file",
        format!(
            "{:.0} files/s (temp, write, fsync, rename, fsync dir)",
            disk.fsync_per_file
        ),
    );
    table.row(
        "   disk: syncfs per 256 files",
        format!(
            "{:.0} files/s (writes and renames, one syncfs)",
            disk.syncfs_batch
        ),
    );
    table.row(
        "   disk: syncfs, safe order",
        format!(
            "{:.0} files/s (writes, syncfs, renames, syncfs)",
            disk.syncfs_safe_order
        ),
    );
    table.row(
        "   disk: append log, fdatasync/100",
        format!("{:.0} records/s", disk.log_fdatasync),
    );
    table.row(
        "   disk: file pipeline",
        format!(
            "{:.0} msgs/s (read outbox, rename to sent, create inbox; syncfs/256)",
            disk.pipeline
        ),
    );
    for (name, peer, note) in [
        (
            "6. redis 7 streams, appendfsync always",
            &redis,
            "XADD pipelined, XREADGROUP + XACK",
        ),
        (
            "   mosquitto QoS 1, persistence",
            &mosquitto,
            "no fsync per message: a ceiling, not a peer in durability",
        ),
    ] {
        match peer {
            Some(p) => {
                let p50 = p
                    .p50_ms
                    .map_or(String::new(), |v| format!(", p50 {v:.2} ms"));
                table.row(name, format!("{:.0} msg/s{p50} ({note})", p.msgs_per_sec));
            }
            None => table.row(name, "not installed"),
        }
    }
    table.print();
    Ok(())
}

/// Rows of the printed table.
#[derive(Default)]
struct Table {
    rows: Vec<(String, String)>,
}

impl Table {
    fn row(&mut self, label: impl Into<String>, value: impl Into<String>) {
        self.rows.push((label.into(), value.into()));
    }

    fn print(&self) {
        let width = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        for (label, value) in &self.rows {
            println!("{label:<width$}  {value}");
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A message file's JSON and name, from `source` to `target` (or broadcast).
fn message(i: usize, kind: &str, source: &str, target: Option<&str>) -> (String, String) {
    let id = format!("00000000-0000-4000-8000-{i:012}");
    let target = target.map_or("null".to_string(), |t| format!("\"{t}\""));
    let body = format!(
        r#"{{"id":"{id}","type":"{kind}","source":"{source}","target":{target},"priority":"normal","created_at":"2024-01-01T00:00:00.{:06}+00:00","payload":{}}}"#,
        i % 1_000_000,
        payload(i)
    );
    (body, format!("20240101T000000_{id}.json"))
}

/// The minimal file the README tells users to drop: `type`, `target` and `payload` only
/// (the same payload as [`message`]), and a name for it.
fn hand_dropped(i: usize, kind: &str, target: &str) -> (String, String) {
    let body = format!(
        r#"{{"type":"{kind}","target":"{target}","payload":{}}}"#,
        payload(i)
    );
    (body, format!("job-{i}.json"))
}

fn payload(i: usize) -> String {
    format!(r#"{{"n":{i},"text":"{PAYLOAD}"}}"#)
}

fn agents_registered(addr: &str, hosts: &[&str]) -> Result<(), String> {
    wait_until(Duration::from_secs(30), "agents to register", || {
        http_get(addr, "/v1/hosts")
            .is_ok_and(|body| hosts.iter().all(|h| body.contains(&format!("\"{h}\""))))
    })
}

/// 1. Latency of single messages, with a hook that marks its start.
fn latency(binary: &Path, root: &Path, mode: &Mode, table: &mut Table) -> Result<(), String> {
    let (_hub, addr) = start_hub(binary, &root.join("hub"))?;
    let sender = root.join("sender");
    let receiver = root.join("receiver");
    let _s = start_agent(binary, &sender, "sender", &addr)?;
    let _r = start_agent(binary, &receiver, "receiver", &addr)?;
    let markers = root.join("markers");
    fs::create_dir_all(&markers).map_err(|e| e.to_string())?;
    install_marker_hook(&receiver, &markers)?;
    agents_registered(&addr, &["sender", "receiver"])?;

    let mut to_inbox = Vec::with_capacity(mode.latency_messages);
    let mut to_hook = Vec::with_capacity(mode.latency_messages);
    // Message 0 warms up connections and caches and is not counted.
    for i in 0..=mode.latency_messages {
        let (inbox, hook) = one_message(&sender, &receiver, &markers, i)?;
        if i > 0 {
            to_inbox.push(inbox);
            to_hook.push(hook);
        }
    }
    let n = mode.latency_messages;
    table.row(
        format!("1. latency outbox -> inbox ({n} msgs)"),
        percentiles(&mut to_inbox),
    );
    table.row("   latency outbox -> hook start", percentiles(&mut to_hook));
    Ok(())
}

fn one_message(
    sender: &Path,
    receiver: &Path,
    markers: &Path,
    i: usize,
) -> Result<(Duration, Duration), String> {
    let (body, name) = message(i, "bench.ping", "sender", Some("receiver"));
    let temp = sender.join("outbox").join(format!(".{i}.tmp"));
    fs::write(&temp, body).map_err(|e| e.to_string())?;
    let inbox_file = receiver.join("inbox").join(&name);
    let marker = markers.join(name.trim_end_matches(".json"));
    let start = Instant::now();
    fs::rename(&temp, sender.join("outbox").join(&name)).map_err(|e| e.to_string())?;
    let mut inbox = None;
    let deadline = start + Duration::from_secs(30);
    while Instant::now() < deadline {
        if inbox.is_none() && inbox_file.exists() {
            inbox = Some(start.elapsed());
        }
        if let Some(inbox) = inbox
            && marker.exists()
        {
            return Ok((inbox, start.elapsed()));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    Err(format!("message {i} did not arrive within 30 s"))
}

/// A hook whose first act is to create a marker named after the inbox file.
fn install_marker_hook(receiver: &Path, markers: &Path) -> Result<(), String> {
    let hook = receiver.join("hooks").join("bench.ping");
    let script = format!(
        "#!/bin/sh\n: > '{}'/\"$(basename \"$MESYNC_INBOX_FILE\" .json)\"\ncat > /dev/null\n",
        markers.display()
    );
    fs::write(&hook, script).map_err(|e| e.to_string())?;
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())
}

fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort();
    let pick = |q: f64| {
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(index).map_or(f64::NAN, |d| ms(*d))
    };
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pick(0.5),
        pick(0.99),
        pick(1.0)
    )
}

/// How a throughput case hands its messages to the sending agents.
#[derive(Clone, Copy)]
enum Handover {
    /// Complete message files, written beforehand under dot-names (which agents ignore) and
    /// renamed into `outbox/` once the clock runs.
    Complete,
    /// The minimal `{type, target, payload}` file the README shows, dropped the same way;
    /// the agent completes it (id, source, created_at, priority) before sending.
    HandDropped,
    /// `mesync send`, one process per message, from `loops` shell loops run side by side
    /// (as a script or `xargs -P` would): the cost of a process start and of a durable
    /// write per message is part of what is measured.
    Send { loops: usize },
}

/// Shell loops running `mesync send` side by side in the `mesync send` case.
const SEND_LOOPS: usize = 4;

/// The loop each `mesync send` shell runs: messages `$2` up to `$3`, each a process.
const SEND_LOOP: &str = r#"bin=$1; i=$2; end=$3; text=$4
while [ "$i" -lt "$end" ]; do
  "$bin" send bench.load --target receiver --payload "{\"n\":$i,\"text\":\"$text\"}" >/dev/null || exit 1
  i=$((i + 1))
done"#;

/// What one throughput case measured.
struct Throughput {
    /// Messages per second, end to end.
    rate: f64,
    /// Messages per second handed to the senders (the renames, or the `mesync send` runs).
    handed_over_rate: f64,
    /// The mean size of a file handed over (0 for `mesync send`, which writes its own).
    bytes: usize,
}

/// 2. Durable throughput: `count` messages from `senders` agents to one receiver.
fn throughput(
    binary: &Path,
    root: &Path,
    senders: usize,
    count: usize,
    handover: Handover,
) -> Result<Throughput, String> {
    let (_hub, addr) = start_hub(binary, &root.join("hub"))?;
    let receiver = root.join("receiver");
    let _r = start_agent(binary, &receiver, "receiver", &addr)?;
    let names: Vec<String> = (0..senders).map(|i| format!("sender{i}")).collect();
    let bases: Vec<PathBuf> = names.iter().map(|n| root.join(n)).collect();
    let _agents: Vec<Proc> = names
        .iter()
        .zip(&bases)
        .map(|(name, base)| start_agent(binary, base, name, &addr))
        .collect::<Result<_, _>>()?;
    let mut hosts: Vec<&str> = names.iter().map(String::as_str).collect();
    hosts.push("receiver");
    agents_registered(&addr, &hosts)?;

    let (start, handed_over, bytes) = match handover {
        Handover::Complete | Handover::HandDropped => {
            let complete = matches!(handover, Handover::Complete);
            let mut drops = Vec::with_capacity(count);
            let mut bytes = 0;
            for i in 0..count {
                let s = i % senders;
                let (body, name) = if complete {
                    message(i, "bench.load", &names[s], Some("receiver"))
                } else {
                    hand_dropped(i, "bench.load", "receiver")
                };
                bytes += body.len();
                let outbox = bases[s].join("outbox");
                let temp = outbox.join(format!(".{i}.tmp"));
                fs::write(&temp, body).map_err(|e| e.to_string())?;
                drops.push((temp, outbox.join(name)));
            }
            let start = Instant::now();
            for (temp, target) in &drops {
                fs::rename(temp, target).map_err(|e| e.to_string())?;
            }
            (start, start.elapsed(), bytes / count.max(1))
        }
        Handover::Send { loops } => {
            let start = Instant::now();
            let loops = send_loops(binary, &bases, &names, count, loops)?;
            finish_loops(loops)?;
            (start, start.elapsed(), 0)
        }
    };
    let deadline = start + Duration::from_secs(600);
    loop {
        if delivered(&addr) >= count {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "throughput: only {} of {count} delivered in 600 s",
                delivered(&addr)
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = start.elapsed();
    let in_inbox = fs::read_dir(receiver.join("inbox"))
        .map_err(|e| e.to_string())?
        .count();
    if in_inbox != count {
        return Err(format!(
            "throughput: the receiver's inbox holds {in_inbox} files, expected {count}"
        ));
    }
    let commits = metric(&addr, "mesync_commits_total");
    eprintln!(
        "throughput {senders} -> 1: {count} messages in {elapsed:?} (handed over in \
         {handed_over:?}), {commits} hub commits"
    );
    Ok(Throughput {
        rate: count as f64 / elapsed.as_secs_f64(),
        handed_over_rate: count as f64 / handed_over.as_secs_f64(),
        bytes,
    })
}

/// Starts `loops` shells, each running `mesync send` once per message for its share of
/// `count`, as the sender `names[k % senders]`.
fn send_loops(
    binary: &Path,
    bases: &[PathBuf],
    names: &[String],
    count: usize,
    loops: usize,
) -> Result<Vec<std::process::Child>, String> {
    let loops = loops.max(1);
    (0..loops)
        .map(|k| {
            let (from, to) = (count * k / loops, count * (k + 1) / loops);
            let s = k % bases.len();
            let mut shell = std::process::Command::new("sh");
            mesync::service::clear_inherited_settings(&mut shell);
            shell
                .args(["-c", SEND_LOOP, "sh"])
                .arg(binary)
                .args([from.to_string(), to.to_string(), PAYLOAD.to_string()])
                .env("MESYNC_BASE_DIR", &bases[s])
                .env("MESYNC_HOST_ID", &names[s])
                .env("HOME", &bases[s])
                .stdin(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start sh: {e}"))
        })
        .collect()
}

/// Waits for every shell loop to end; an error if one failed.
fn finish_loops(loops: Vec<std::process::Child>) -> Result<(), String> {
    let mut failed = None;
    for mut shell in loops {
        match shell.wait() {
            Ok(status) if status.success() => {}
            Ok(status) => failed = Some(format!("a `mesync send` loop failed: {status}")),
            Err(e) => failed = Some(format!("sh: {e}")),
        }
    }
    failed.map_or(Ok(()), Err)
}

/// The hub's count of messages acknowledged by their recipient.
fn delivered(addr: &str) -> usize {
    metric(addr, "mesync_messages_delivered_total")
}

/// One unlabelled value from the hub's /metrics.
fn metric(addr: &str, name: &str) -> usize {
    http_get(addr, "/metrics")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_string))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// 3. One broadcast to `hosts` light hosts.
async fn broadcast(binary: &Path, root: &Path, hosts: usize) -> Result<Duration, String> {
    let (_hub, addr) = start_hub(binary, &root.join("hub"))?;
    let mut fleet = Fleet::start(&addr, "h", hosts, 60).await?;
    // Let every host's long-poll reach the hub and wait there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (body, _) = message(1, "bench.broadcast", "bench", None);
    let start = Instant::now();
    light::post(&addr, &body).await?;
    let last = fleet.wait_received(hosts, Duration::from_secs(60)).await?;
    Ok(last.duration_since(start))
}
