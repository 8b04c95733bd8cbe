//! `cargo xtask torture [--kills N] [--seed S] [--agents K] [--short] [--keep]`: fault
//! injection against the real binary, to prove the delivery promise: a message accepted into
//! an outbox reaches every recipient's inbox exactly once and runs its hook once, whatever
//! crashes in between (a crash in the middle of a hook runs it again, with
//! `MESYNC_ATTEMPT` > 1).
//!
//! In a directory under `target/torture/` it starts a hub on a fixed loopback port (so a
//! restarted hub is found where it was) and K agents, each with a hook that appends
//! `<id> <attempt>` to a log of its own. Once every agent is registered at the hub:
//!
//! - a load generator (seeded PRNG) drops messages into random agents' outboxes at a steady
//!   pace (20 a second), with a burst of 10–40 every 2 s and, in full runs, of 100–300
//!   every 10 s: targeted and broadcast, every priority, each written under a dot-name and
//!   renamed into place; every drop is written to `ledger.tsv`;
//! - a chaos loop, every 50–500 ms, SIGKILLs the hub (frozen or not), an agent with
//!   messages in its outbox or an agent in the middle of a hook, and restarts it 0–800 ms
//!   later (several processes may be down at once); every 15th action instead freezes the
//!   hub (SIGSTOP) for 2–4 s, longer than the agents' HTTP timeout. Every action is in
//!   `chaos.log`, with the UTC time that the processes' logs use.
//!
//! - one agent's `inbox/` is a 64 KiB tmpfs (when the run may mount one: as root), far
//!   smaller than a burst, and its hook is the consumer that moves each message out of it
//!   (to `consumed/`, on the ordinary disk) once it has run: the agent must write the part
//!   of each pulled batch that fits and take the rest as space is freed, kills included.
//!
//! After N kills: the load stops, everything is restarted, and once the outboxes and the
//! hub's queues are empty, every expected delivery is in place and every hook has run (or
//! a deadline passed), everything is stopped with SIGTERM and the files are checked: lost,
//! duplicated or misrouted deliveries, inbox files that are not whole JSON, anything in
//! `failed/`, hook runs missing or repeated without a higher attempt. One summary line, and
//! for the first problems the ids, hosts, the chaos around them and the log lines naming
//! them. The directory is kept when something is wrong (or with `--keep`).
//!
//! This file uses only std, libc and serde_json and nothing else of the xtask crate, so the
//! test suite runs the very same code (`tests/torture.rs` includes it with `#[path]`) with
//! the debug binary and fewer kills.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// The type of every message, so the name of every hook.
const MESSAGE_TYPE: &str = "torture.event";
/// Time between two drops of the load generator.
const LOAD_INTERVAL: Duration = Duration::from_millis(50);
/// Every this many drops, a burst of 10–40 messages into one outbox.
const BURST_EVERY: u64 = 40;
/// In full runs, every this many drops a big burst of 100–300 messages, so that kills land
/// in the middle of large batches (POSTs, pulls and group commits of hundreds of files).
const BIG_BURST_EVERY: u64 = 200;
/// Every this many chaos actions, the hub is frozen instead of a process killed.
const FREEZE_EVERY: usize = 15;
/// How many problems are described in detail.
const DETAILED: usize = 5;
const PRIORITIES: [&str; 3] = ["high", "normal", "low"];

/// What one run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// SIGKILLs to deal, at least.
    pub kills: usize,
    pub seed: u64,
    pub agents: usize,
    pub short: bool,
    /// Keep the run's directory even when everything is right.
    pub keep: bool,
    /// How to run this again, printed at the start.
    pub replay: String,
}

impl Options {
    pub fn new(short: bool, seed: u64) -> Options {
        Options {
            kills: if short { 20 } else { 100 },
            seed,
            agents: 4,
            short,
            keep: false,
            replay: String::new(),
        }
    }

    /// How long the processes get to deliver everything once the chaos is over.
    fn settle_timeout(&self) -> Duration {
        Duration::from_secs(if self.short { 90 } else { 120 })
    }
}

const USAGE: &str =
    "usage: cargo xtask torture [--kills N] [--seed S] [--agents K] [--short] [--keep]";

/// Parses the task's arguments.
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let short = args.iter().any(|a| a == "--short");
    let mut opts = Options::new(short, random_seed());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number\n{USAGE}"))
        };
        match arg.as_str() {
            "--short" => {}
            "--keep" => opts.keep = true,
            "--kills" => opts.kills = value("--kills")? as usize,
            "--seed" => opts.seed = value("--seed")?,
            "--agents" => opts.agents = value("--agents")? as usize,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if opts.agents < 2 {
        return Err(format!("--agents must be at least 2\n{USAGE}"));
    }
    opts.replay = format!(
        "cargo xtask torture --seed {} --kills {} --agents {}{}",
        opts.seed,
        opts.kills,
        opts.agents,
        if short { " --short" } else { "" }
    );
    Ok(opts)
}

/// The xtask entry point: `build` gives the binary to torture; the run's directory goes in
/// `torture/` of the target dir the binary is in.
pub fn cli(args: &[String], build: impl FnOnce() -> Result<PathBuf, String>) -> Result<(), String> {
    let opts = parse_args(args)?;
    let binary = build()?;
    let target = binary
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("no target dir above {}", binary.display()))?;
    let started = Instant::now();
    let report = run(&binary, &target.join("torture"), &opts)?;
    eprintln!("torture: run time {:.1} s", started.elapsed().as_secs_f64());
    println!("{}", report.summary);
    if report.ok {
        Ok(())
    } else {
        Err(format!(
            "the promise was broken; seed {}, files in {}",
            opts.seed,
            report.dir.display()
        ))
    }
}

/// What a run found.
#[derive(Debug)]
pub struct Report {
    /// The one summary line.
    pub summary: String,
    /// No message lost, duplicated or misrouted, no bad hook run, nothing failed or torn.
    pub ok: bool,
    /// The problems, the first ones described in detail.
    pub details: Vec<String>,
    /// Observations that break nothing (debris, statistics, slow shutdowns).
    pub notes: Vec<String>,
    /// The run's directory (removed when all is well unless kept).
    pub dir: PathBuf,
}

/// One torture run of `binary` in a new directory under `parent`.
pub fn run(binary: &Path, parent: &Path, opts: &Options) -> Result<Report, String> {
    if opts.agents < 2 {
        return Err("a torture run needs at least 2 agents".into());
    }
    let dir = parent.join(format!("run.{}.{}", opts.seed, std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dir = dir.canonicalize().map_err(|e| e.to_string())?;
    eprintln!(
        "torture: seed={} kills>={} agents={} {} in {}",
        opts.seed,
        opts.kills,
        opts.agents,
        if opts.short { "short" } else { "full" },
        dir.display()
    );
    if !opts.replay.is_empty() {
        eprintln!("torture: replay the same choices with: {}", opts.replay);
    }
    let mut cluster = Cluster::new(binary, &dir, opts.agents, true)?;
    cluster.start_all()?;
    cluster.wait_ready(Duration::from_secs(30))?;
    eprintln!(
        "torture: hub on {} and {} agents registered; load and chaos begin",
        cluster.addr, opts.agents
    );

    let load = Load::spawn(&cluster, &dir, opts.seed, !opts.short)?;
    let mut chaos_rng = Rng::new(opts.seed ^ 0xC4A0_5C4A_05C4_A05C);
    let mut stats = ChaosStats::default();
    let chaos_result = chaos(
        &mut cluster,
        opts,
        &mut chaos_rng,
        &load.dropped,
        &mut stats,
    );
    let ledger = load.finish()?;
    chaos_result?;
    cluster.events.note(format!(
        "chaos over: {} kills, {} freezes, {} messages dropped; healing",
        stats.kills,
        stats.freezes,
        ledger.len()
    ));
    eprintln!(
        "torture: chaos over after {:.1} s: {} kills, {} freezes, {} messages; waiting for delivery",
        cluster.events.start.elapsed().as_secs_f64(),
        stats.kills,
        stats.freezes,
        ledger.len()
    );
    cluster.heal(&mut stats)?;
    let expected = Expected::new(&ledger, opts.agents);
    let settle_start = Instant::now();
    let unsettled = settle(&mut cluster, &expected, opts.settle_timeout(), &mut stats)?;
    let settle_time = settle_start.elapsed();
    cluster.events.note(format!(
        "settled: {}",
        unsettled.as_deref().unwrap_or("yes")
    ));
    let stop_notes = cluster.stop_all();

    let mut report = check(&cluster, &ledger, &expected, opts, &stats);
    if let Some(state) = unsettled {
        report.ok = false;
        report.details.insert(
            0,
            format!(
                "did not settle within {} s after the chaos: {state}",
                opts.settle_timeout().as_secs()
            ),
        );
    }
    report.notes.push(format!(
        "delivery completed {:.1} s after the chaos ended",
        settle_time.as_secs_f64()
    ));
    report.notes.extend(stop_notes);
    report.notes.extend(stats.describe());
    for note in &report.notes {
        eprintln!("torture: note: {note}");
    }
    for detail in &report.details {
        eprintln!("torture: PROBLEM: {detail}");
    }
    if report.ok && !opts.keep {
        let _ = fs::remove_dir_all(&dir);
    } else {
        eprintln!(
            "torture: files kept in {} (chaos.log, ledger.tsv, <host>.log, <host>.hooks.log, <host>/)",
            dir.display()
        );
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// Randomness and time
// ---------------------------------------------------------------------------------------

/// splitmix64: tiny, seedable, good enough to pick victims and messages.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A duration uniform in `lo..=hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    /// A version-4 UUID made of this generator's bits.
    fn uuid(&mut self) -> String {
        let hi = self.next_u64();
        let lo = self.next_u64();
        let hi = (hi & !0xF000) | 0x4000;
        let lo = (lo & !(0b11 << 62)) | (0b10 << 62);
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xFFFF,
            hi & 0xFFFF,
            lo >> 48,
            lo & 0xFFFF_FFFF_FFFF
        )
    }
}

/// A seed from the clock and the process id, for runs not asked to replay one.
pub fn random_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = Rng::new(nanos ^ (u64::from(std::process::id()) << 32));
    // Small enough to type.
    rng.next_u64() % 1_000_000_000
}

/// Now in UTC: (`2024-01-15T10:30:00.123456Z`, `20240115T103000`).
fn utc_now() -> (String, String) {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let micros = since.subsec_micros();
    (
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{micros:06}Z"),
        format!("{year:04}{month:02}{day:02}T{h:02}{m:02}{s:02}"),
    )
}

// ---------------------------------------------------------------------------------------
// The processes
// ---------------------------------------------------------------------------------------

/// A timestamped record of everything the chaos did, in `chaos.log` and in memory.
struct Events {
    start: Instant,
    file: File,
    entries: Vec<(Duration, String)>,
}

impl Events {
    fn note(&mut self, text: String) {
        let at = self.start.elapsed();
        let _ = writeln!(
            self.file,
            "{} +{:.3}s {text}",
            utc_now().0,
            at.as_secs_f64()
        );
        self.entries.push((at, text));
    }
}

/// The hub (index 0) or an agent.
struct Node {
    name: String,
    is_hub: bool,
    /// The hub's data dir, or the agent's base dir.
    dir: PathBuf,
    /// stdout and stderr of every incarnation, with the harness's markers between them.
    log: PathBuf,
    /// The agent's hook log: `<id> <attempt>` per run.
    hook_log: PathBuf,
    /// For the agent whose inbox is a small tmpfs: where its hook moves the inbox files.
    consumed: Option<PathBuf>,
    child: Option<Child>,
    frozen: bool,
    restart_at: Option<Instant>,
    thaw_at: Option<Instant>,
    starts: u32,
    /// Deaths other than the final SIGTERM: SIGKILLs and exits on its own.
    deaths: usize,
}

impl Node {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// Appends a harness line to this node's log, between the process's own lines.
    fn mark(&self, text: &str) {
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&self.log) {
            let _ = writeln!(f, "[torture {}] {text}", utc_now().0);
        }
    }
}

struct Cluster {
    binary: PathBuf,
    root: PathBuf,
    addr: String,
    nodes: Vec<Node>,
    events: Events,
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a child of ours that has not been reaped; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

impl Cluster {
    /// A hub and `agents` agents in `root`; with `small_inbox`, the last agent's inbox is a
    /// small tmpfs (see [`small_inbox`]).
    fn new(
        binary: &Path,
        root: &Path,
        agents: usize,
        small_inbox: bool,
    ) -> Result<Cluster, String> {
        let port = free_port()?;
        let file = File::create(root.join("chaos.log")).map_err(|e| e.to_string())?;
        let mut nodes = Vec::with_capacity(agents + 1);
        let hub_dir = root.join("hub");
        fs::create_dir_all(&hub_dir).map_err(|e| e.to_string())?;
        nodes.push(Node {
            name: "hub".into(),
            is_hub: true,
            dir: hub_dir,
            log: root.join("hub.log"),
            hook_log: PathBuf::new(),
            consumed: None,
            child: None,
            frozen: false,
            restart_at: None,
            thaw_at: None,
            starts: 0,
            deaths: 0,
        });
        for i in 1..=agents {
            let name = format!("a{i}");
            let base = root.join(&name);
            for d in ["outbox", "inbox", "sent", "failed", "hooks", "state"] {
                fs::create_dir_all(base.join(d)).map_err(|e| e.to_string())?;
            }
            let hook_log = root.join(format!("{name}.hooks.log"));
            File::create(&hook_log).map_err(|e| e.to_string())?;
            // The last agent's inbox is smaller than a burst; its hook makes room.
            let consumed = if small_inbox && i == agents {
                self::small_inbox(&base)?
            } else {
                None
            };
            install_hook(&base, &hook_log, consumed.as_deref())?;
            nodes.push(Node {
                log: root.join(format!("{name}.log")),
                name,
                is_hub: false,
                dir: base,
                hook_log,
                consumed,
                child: None,
                frozen: false,
                restart_at: None,
                thaw_at: None,
                starts: 0,
                deaths: 0,
            });
        }
        Ok(Cluster {
            binary: binary.to_path_buf(),
            root: root.to_path_buf(),
            addr: format!("127.0.0.1:{port}"),
            nodes,
            events: Events {
                start: Instant::now(),
                file,
                entries: Vec::new(),
            },
        })
    }

    fn agents(&self) -> std::ops::Range<usize> {
        1..self.nodes.len()
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        node.restart_at = None;
        if node.child.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| format!("{}: {e}", node.log.display()))?;
        let mut cmd = Command::new(&self.binary);
        mesync::service::clear_inherited_settings(&mut cmd);
        cmd.env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        if node.is_hub {
            cmd.args(["serve", "--listen", &self.addr, "--data-dir"])
                .arg(node.dir.join("data"))
                .env("HOME", &node.dir);
        } else {
            cmd.arg("start")
                .env("HOME", &node.dir)
                .env("MESYNC_BASE_DIR", &node.dir)
                .env("MESYNC_HOST_ID", &node.name)
                .env("MESYNC_SERVER_URL", format!("http://{}", self.addr))
                .env("MESYNC_POLL_INTERVAL", "1")
                .env("MESYNC_HTTP_TIMEOUT", "2");
        }
        node.starts += 1;
        node.mark(&format!("start #{}", node.starts));
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", node.name))?;
        let text = format!("start {} #{} (pid {})", node.name, node.starts, child.id());
        node.child = Some(child);
        self.events.note(text);
        Ok(())
    }

    fn start_all(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            self.spawn(i)?;
        }
        Ok(())
    }

    fn kill9(&mut self, i: usize, why: &str) {
        let node = &mut self.nodes[i];
        let Some(mut child) = node.child.take() else {
            return;
        };
        let pid = child.id();
        let _ = child.kill();
        let _ = child.wait();
        node.deaths += 1;
        node.frozen = false;
        node.thaw_at = None;
        node.mark(&format!("SIGKILL pid {pid} ({why})"));
        let text = format!("SIGKILL {} pid {pid} ({why})", node.name);
        self.events.note(text);
    }

    fn freeze(&mut self, i: usize, until: Instant) {
        let node = &mut self.nodes[i];
        let Some(pid) = node.pid() else { return };
        signal(pid, libc::SIGSTOP);
        node.frozen = true;
        node.thaw_at = Some(until);
        node.mark(&format!("SIGSTOP pid {pid}"));
        let text = format!(
            "SIGSTOP {} pid {pid} for {:.1} s",
            node.name,
            until
                .saturating_duration_since(Instant::now())
                .as_secs_f64()
        );
        self.events.note(text);
    }

    fn thaw(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.thaw_at = None;
        if !node.frozen {
            return;
        }
        node.frozen = false;
        if let Some(pid) = node.pid() {
            signal(pid, libc::SIGCONT);
            node.mark(&format!("SIGCONT pid {pid}"));
            let text = format!("SIGCONT {} pid {pid}", node.name);
            self.events.note(text);
        }
    }

    /// Restarts and thaws what is due.
    fn due(&mut self, now: Instant) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].thaw_at.is_some_and(|t| t <= now) {
                self.thaw(i);
            }
            if self.nodes[i].restart_at.is_some_and(|t| t <= now) {
                self.spawn(i)?;
            }
        }
        Ok(())
    }

    /// Processes that exited without being killed: noted, and restarted a moment later.
    fn reap_exits(&mut self, stats: &mut ChaosStats) {
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            let Some(child) = node.child.as_mut() else {
                continue;
            };
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            let pid = child.id();
            node.child = None;
            node.deaths += 1;
            node.restart_at = Some(Instant::now() + Duration::from_millis(250));
            node.mark(&format!("pid {pid} exited by itself: {status}"));
            let tail = log_tail(&node.log, 6);
            let text = format!("{} pid {pid} exited by itself: {status}", node.name);
            let bind_race = node.is_hub && tail.iter().any(|l| l.contains("in use"));
            self.events.note(text.clone());
            stats.unexpected_exits.push(UnexpectedExit {
                text,
                tail,
                bind_race,
                log: self.nodes[i].log.clone(),
            });
        }
    }

    /// Waits for the hub to answer and every agent to be registered.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let names: Vec<String> = self.agents().map(|i| self.nodes[i].name.clone()).collect();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(body) = http_get(&self.addr, "/v1/hosts")
                && let Ok(v) = serde_json::from_str::<Value>(&body)
            {
                let hosts: HashSet<&str> = v["hosts"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|h| h["host"].as_str()).collect())
                    .unwrap_or_default();
                if names.iter().all(|n| hosts.contains(n.as_str())) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the hub at {} did not list agents {names:?} within {} s; see {}",
                    self.addr,
                    timeout.as_secs(),
                    self.root.display()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// After the chaos: nothing frozen, everything running, the hub answering.
    fn heal(&mut self, stats: &mut ChaosStats) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            self.thaw(i);
            self.spawn(i)?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.reap_exits(stats);
            self.due(Instant::now() + Duration::from_secs(3600))?;
            if http_get(&self.addr, "/healthz").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the hub does not answer on {}", self.addr));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM to the agents, then to the hub; notes about any unclean exit.
    fn stop_all(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        let order: Vec<usize> = self.agents().chain([0]).collect();
        for i in order {
            let node = &mut self.nodes[i];
            let Some(mut child) = node.child.take() else {
                continue;
            };
            let pid = child.id();
            signal(pid, libc::SIGTERM);
            let start = Instant::now();
            let status = loop {
                if let Ok(Some(status)) = child.try_wait() {
                    break Some(status);
                }
                if start.elapsed() > Duration::from_secs(15) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                thread::sleep(Duration::from_millis(10));
            };
            node.mark(&format!("SIGTERM pid {pid}: {status:?}"));
            match status {
                Some(s) if s.success() => {}
                Some(s) => notes.push(format!(
                    "{} did not exit 0 on SIGTERM: {s} (see {})",
                    node.name,
                    node.log.display()
                )),
                None => notes.push(format!(
                    "{} was still running 15 s after SIGTERM, killed (see {})",
                    node.name,
                    node.log.display()
                )),
            }
        }
        notes
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                if node.frozen {
                    signal(child.id(), libc::SIGCONT);
                }
                let _ = child.wait();
            }
            if node.consumed.is_some() {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(node.dir.join("inbox"))
                    .status();
            }
        }
    }
}

/// Mounts a 64 KiB tmpfs over `base/inbox` (room for about 15 messages) and makes
/// `base/../<name>.consumed/`; `None` (and a note) when mounting is not allowed here.
fn small_inbox(base: &Path) -> Result<Option<PathBuf>, String> {
    let inbox = base.join("inbox");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs"])
        .arg(&inbox)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("torture: note: cannot mount a tmpfs (not root?): no agent gets a small inbox");
        return Ok(None);
    }
    let consumed = base.with_extension("consumed");
    fs::create_dir_all(&consumed).map_err(|e| format!("{}: {e}", consumed.display()))?;
    Ok(Some(consumed))
}

/// What an agent delivered: the files in its inbox and, for the agent with a small inbox,
/// those its hook moved out (a file in both, cut between the copy and the removal, counts
/// once). Returns the paths by file name, and the dot-files left in the inbox.
fn delivered(node: &Node) -> (BTreeMap<String, PathBuf>, Vec<String>) {
    let inbox = node.dir.join("inbox");
    let (names, dots) = list(&inbox);
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    if let Some(consumed) = &node.consumed {
        for name in list(consumed).0 {
            files.insert(name.clone(), consumed.join(name));
        }
    }
    for name in names {
        files.insert(name.clone(), inbox.join(name));
    }
    (files, dots)
}

/// The hook: one line `<id> <attempt>` per run, appended with one write, then a short
/// sleep so that kills land in the middle of hooks. Paths are written in: hooks run with a
/// clean environment.
///
/// With `consumed`, the hook then moves its inbox file there, as a consumer script would:
/// copied under a dot-name, renamed into place, and only then removed from the inbox.
fn install_hook(base: &Path, hook_log: &Path, consumed: Option<&Path>) -> Result<(), String> {
    let consume = consumed.map_or(String::new(), |dir| {
        let dir = dir.display();
        "f=\"$MESYNC_INBOX_FILE\"; n=$(basename \"$f\")\n".to_string()
            + &format!(
                "cp \"$f\" '{dir}'/.\"$n\" && mv '{dir}'/.\"$n\" '{dir}'/\"$n\" && rm -f \"$f\"\n"
            )
    });
    let script = format!(
        "#!/bin/sh\nprintf '%s %s\\n' \"$MESYNC_MESSAGE_ID\" \"$MESYNC_ATTEMPT\" >> '{}'\ncat > /dev/null\nsleep 0.02\n{consume}exit 0\n",
        hook_log.display()
    );
    let hooks = base.join("hooks");
    let tmp = hooks.join(format!(".{MESSAGE_TYPE}.tmp"));
    fs::write(&tmp, script).map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    fs::rename(&tmp, hooks.join(MESSAGE_TYPE)).map_err(|e| e.to_string())
}

/// The last `n` lines of a file.
fn log_tail(path: &Path, n: usize) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// A plain HTTP GET with short timeouts (the hub may be down or frozen); the body of a 200.
pub fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let sock = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(1))
        .map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_string())
}

/// Whether a process has children (an agent's are its hooks), from /proc.
fn has_children(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .flatten()
        .any(|t| fs::read_to_string(t.path().join("children")).is_ok_and(|c| !c.trim().is_empty()))
}

/// Names in `dir` not starting with a dot, and those starting with one.
fn list(dir: &Path) -> (Vec<String>, Vec<String>) {
    let mut plain = Vec::new();
    let mut dots = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                dots.push(name);
            } else {
                plain.push(name);
            }
        }
    }
    plain.sort();
    dots.sort();
    (plain, dots)
}

/// The UUID at the end of a queue file name (`YYYYMMDDTHHmmss_<uuid>.json`).
fn id_in_name(name: &str) -> &str {
    let stem = name.strip_suffix(".json").unwrap_or(name);
    stem.get(stem.len().saturating_sub(36)..).unwrap_or(stem)
}

// ---------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------

/// One message dropped into an outbox.
#[derive(Debug, Clone)]
struct Dropped {
    seq: u64,
    id: String,
    /// Agent index (1-based, as in `Cluster::nodes`).
    source: usize,
    /// `None` for a broadcast.
    target: Option<usize>,
    priority: &'static str,
    /// When it was renamed into the outbox, since the run's start.
    at: Duration,
}

struct Load {
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicUsize>,
    thread: thread::JoinHandle<Result<Vec<Dropped>, String>>,
}

impl Load {
    fn spawn(cluster: &Cluster, root: &Path, seed: u64, big_bursts: bool) -> Result<Load, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicUsize::new(0));
        let agents: Vec<(String, PathBuf)> = cluster
            .agents()
            .map(|i| {
                (
                    cluster.nodes[i].name.clone(),
                    cluster.nodes[i].dir.join("outbox"),
                )
            })
            .collect();
        let mut ledger =
            File::create(root.join("ledger.tsv")).map_err(|e| format!("ledger.tsv: {e}"))?;
        let _ = writeln!(ledger, "# seq\tid\tsource\ttarget\tpriority\tdropped_at");
        let start = cluster.events.start;
        let (stop2, dropped2) = (Arc::clone(&stop), Arc::clone(&dropped));
        let thread = thread::spawn(move || {
            let mut rng = Rng::new(seed ^ 0x10AD_10AD_10AD_10AD);
            let mut out = Vec::new();
            let k = agents.len() as u64;
            let begin = Instant::now();
            let mut tick: u64 = 0;
            while !stop2.load(Ordering::Relaxed) {
                tick += 1;
                let big = big_bursts && tick.is_multiple_of(BIG_BURST_EVERY);
                let burst = big || tick.is_multiple_of(BURST_EVERY);
                let count = match (big, burst) {
                    (true, _) => 100 + rng.below(201),
                    (false, true) => 10 + rng.below(31),
                    (false, false) => 1,
                };
                let burst_source = rng.below(k) as usize;
                for _ in 0..count {
                    let source = if burst {
                        burst_source
                    } else {
                        rng.below(k) as usize
                    };
                    let target = if rng.below(2) == 0 {
                        None
                    } else {
                        Some((source + 1 + rng.below(k - 1) as usize) % k as usize)
                    };
                    let priority = PRIORITIES[rng.below(3) as usize];
                    let id = rng.uuid();
                    let seq = out.len() as u64;
                    let (created_at, stamp) = utc_now();
                    let message = json!({
                        "id": id,
                        "type": MESSAGE_TYPE,
                        "source": agents[source].0,
                        "target": target.map(|t| agents[t].0.clone()),
                        "priority": priority,
                        "created_at": created_at,
                        "payload": {"seq": seq, "pad": "x".repeat(rng.below(400) as usize)},
                    });
                    let outbox = &agents[source].1;
                    let tmp = outbox.join(format!(".torture-{id}.tmp"));
                    let name = format!("{stamp}_{id}.json");
                    fs::write(&tmp, message.to_string())
                        .and_then(|()| fs::rename(&tmp, outbox.join(&name)))
                        .map_err(|e| format!("dropping {name} into {}: {e}", outbox.display()))?;
                    let at = start.elapsed();
                    let _ = writeln!(
                        ledger,
                        "{seq}\t{id}\t{}\t{}\t{priority}\t+{:.3}s",
                        agents[source].0,
                        target.map_or("*", |t| agents[t].0.as_str()),
                        at.as_secs_f64()
                    );
                    out.push(Dropped {
                        seq,
                        id,
                        source: source + 1,
                        target: target.map(|t| t + 1),
                        priority,
                        at,
                    });
                    dropped2.store(out.len(), Ordering::Relaxed);
                }
                let next = begin + LOAD_INTERVAL * (tick as u32);
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            Ok(out)
        });
        Ok(Load {
            stop,
            dropped,
            thread,
        })
    }

    fn finish(self) -> Result<Vec<Dropped>, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| "the load generator panicked".to_string())?
    }
}

// ---------------------------------------------------------------------------------------
// Chaos
// ---------------------------------------------------------------------------------------

struct UnexpectedExit {
    text: String,
    tail: Vec<String>,
    /// A restarted hub that found its port still taken: the harness's race, not a bug.
    bind_race: bool,
    log: PathBuf,
}

#[derive(Default)]
struct ChaosStats {
    kills: usize,
    freezes: usize,
    hub_kills: usize,
    sender_kills: usize,
    mid_hook_kills: usize,
    other_agent_kills: usize,
    unexpected_exits: Vec<UnexpectedExit>,
}

impl ChaosStats {
    fn describe(&self) -> Vec<String> {
        let mut notes = vec![format!(
            "SIGKILLs: hub {}, agents with a non-empty outbox {}, agents in the middle of a hook {}, other agents {}; hub freezes {}",
            self.hub_kills,
            self.sender_kills,
            self.mid_hook_kills,
            self.other_agent_kills,
            self.freezes
        )];
        for exit in &self.unexpected_exits {
            notes.push(format!(
                "{}{}; last lines of {}:\n    {}",
                exit.text,
                if exit.bind_race {
                    " (port still taken; restarted)"
                } else {
                    ""
                },
                exit.log.display(),
                exit.tail.join("\n    ")
            ));
        }
        notes
    }

    /// Exits that were not the harness's own race: crashes.
    fn crashes(&self) -> usize {
        self.unexpected_exits
            .iter()
            .filter(|e| !e.bind_race)
            .count()
    }
}

/// Picks a victim: the hub, an agent with messages to send, or an agent running a hook,
/// each a third of the time (falling back to any agent that is up).
fn pick_victim(cluster: &Cluster, rng: &mut Rng) -> Option<(usize, String)> {
    let up: Vec<usize> = cluster
        .agents()
        .filter(|&i| cluster.nodes[i].is_up())
        .collect();
    let hub = &cluster.nodes[0];
    let choice = rng.below(3);
    if choice == 0 && hub.is_up() {
        // A frozen hub is killed too, as a watchdog kills a hung process.
        let role = if hub.frozen { "hub, frozen" } else { "hub" };
        return Some((0, role.into()));
    }
    if up.is_empty() {
        return None;
    }
    let outbox_len = |i: usize| list(&cluster.nodes[i].dir.join("outbox")).0.len();
    let in_hook = |i: usize| cluster.nodes[i].pid().is_some_and(has_children);
    let wanted: Vec<usize> = match choice {
        1 => up.iter().copied().filter(|&i| outbox_len(i) > 0).collect(),
        _ => up.iter().copied().filter(|&i| in_hook(i)).collect(),
    };
    let pool = if wanted.is_empty() { &up } else { &wanted };
    let i = pool[rng.below(pool.len() as u64) as usize];
    let (n, hook) = (outbox_len(i), in_hook(i));
    let role = match (n, hook) {
        (_, true) => format!("in a hook, {n} in outbox"),
        (0, false) => "idle".to_string(),
        (n, false) => format!("{n} in outbox"),
    };
    Some((i, role))
}

fn chaos(
    cluster: &mut Cluster,
    opts: &Options,
    rng: &mut Rng,
    dropped: &AtomicUsize,
    stats: &mut ChaosStats,
) -> Result<(), String> {
    let mut next_action = Instant::now() + rng.millis(50, 500);
    let mut actions = 0usize;
    // A freeze falls due every FREEZE_EVERY actions, and waits for the hub to be up.
    let mut freeze_due = false;
    while stats.kills < opts.kills {
        let now = Instant::now();
        cluster.due(now)?;
        cluster.reap_exits(stats);
        if now >= next_action {
            actions += 1;
            freeze_due |= actions.is_multiple_of(FREEZE_EVERY);
            let hub = &cluster.nodes[0];
            if freeze_due && hub.is_up() && !hub.frozen {
                let until = now + rng.millis(2000, 4000);
                cluster.freeze(0, until);
                stats.freezes += 1;
                freeze_due = false;
            } else if let Some((i, role)) = pick_victim(cluster, rng) {
                cluster.kill9(i, &role);
                cluster.nodes[i].restart_at = Some(Instant::now() + rng.millis(0, 800));
                stats.kills += 1;
                if i == 0 {
                    stats.hub_kills += 1;
                } else if role.starts_with("in a hook") {
                    stats.mid_hook_kills += 1;
                } else if role.ends_with("in outbox") {
                    stats.sender_kills += 1;
                } else {
                    stats.other_agent_kills += 1;
                }
                if stats.kills.is_multiple_of(10) {
                    eprintln!(
                        "torture: +{:.1}s {}/{} kills, {} freezes, {} messages dropped",
                        cluster.events.start.elapsed().as_secs_f64(),
                        stats.kills,
                        opts.kills,
                        stats.freezes,
                        dropped.load(Ordering::Relaxed)
                    );
                }
            }
            next_action = Instant::now() + rng.millis(50, 500);
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Settling and checking
// ---------------------------------------------------------------------------------------

/// Who should receive what.
struct Expected {
    /// Per node index (agents only), the ids it must receive.
    by_host: Vec<HashSet<String>>,
    by_id: HashMap<String, Dropped>,
    total: usize,
}

impl Expected {
    fn new(ledger: &[Dropped], agents: usize) -> Expected {
        let mut by_host = vec![HashSet::new(); agents + 1];
        let mut by_id = HashMap::new();
        let mut total = 0;
        for d in ledger {
            for h in recipients(d, agents) {
                by_host[h].insert(d.id.clone());
                total += 1;
            }
            by_id.insert(d.id.clone(), d.clone());
        }
        Expected {
            by_host,
            by_id,
            total,
        }
    }
}

/// The agents (node indexes) a message is for: its target, or every agent but its source.
fn recipients(d: &Dropped, agents: usize) -> Vec<usize> {
    match d.target {
        Some(t) => vec![t],
        None => (1..=agents).filter(|&h| h != d.source).collect(),
    }
}

/// Ids in a hook log with their attempts, in log order; and the lines that do not parse.
fn hook_runs(path: &Path) -> (Vec<(String, u32)>, Vec<String>) {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut runs = Vec::new();
    let mut bad = Vec::new();
    for line in text.lines() {
        match line.split_once(' ') {
            Some((id, attempt)) if id.len() == 36 && attempt.parse::<u32>().is_ok() => {
                runs.push((id.to_string(), attempt.parse().unwrap_or(0)));
            }
            _ => bad.push(line.to_string()),
        }
    }
    (runs, bad)
}

/// Waits until the outboxes and the hub's queues are empty and every expected delivery is
/// in its inbox with its hook run; restarts whatever exits meanwhile. `Some(state)` when
/// `timeout` passed first.
fn settle(
    cluster: &mut Cluster,
    expected: &Expected,
    timeout: Duration,
    stats: &mut ChaosStats,
) -> Result<Option<String>, String> {
    let start = Instant::now();
    let mut last_print = Instant::now();
    loop {
        cluster.reap_exits(stats);
        cluster.due(Instant::now())?;
        let mut outbox = 0;
        let mut missing = 0;
        let mut hooks_behind = 0;
        for h in cluster.agents() {
            let node = &cluster.nodes[h];
            outbox += list(&node.dir.join("outbox")).0.len();
            let inbox: HashSet<String> = delivered(node)
                .0
                .keys()
                .map(|n| id_in_name(n).to_string())
                .collect();
            missing += expected.by_host[h].difference(&inbox).count();
            let ran: HashSet<String> = hook_runs(&node.hook_log)
                .0
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            hooks_behind += inbox.difference(&ran).count();
        }
        let pending = http_get(&cluster.addr, "/v1/hosts")
            .ok()
            .and_then(|b| serde_json::from_str::<Value>(&b).ok())
            .and_then(|v| {
                v["hosts"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|h| h["pending"].as_u64()).sum::<u64>())
            });
        let state = format!(
            "{outbox} files in outboxes, {missing} of {} deliveries missing, hub pending {}, {hooks_behind} inbox files without a hook run",
            expected.total,
            pending.map_or("unknown (no answer)".to_string(), |p| p.to_string())
        );
        if outbox == 0 && missing == 0 && hooks_behind == 0 && pending == Some(0) {
            return Ok(None);
        }
        if start.elapsed() > timeout {
            return Ok(Some(state));
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "torture: +{:.1}s waiting: {state}",
                cluster.events.start.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Counts and first descriptions of one kind of problem.
#[derive(Default)]
struct Tally {
    count: usize,
    details: Vec<String>,
}

impl Tally {
    fn add(&mut self, n: usize, detail: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        self.count += n;
        if self.details.len() < DETAILED {
            self.details.push(detail());
        }
    }
}

fn check(
    cluster: &Cluster,
    ledger: &[Dropped],
    expected: &Expected,
    opts: &Options,
    stats: &ChaosStats,
) -> Report {
    let mut lost = Tally::default();
    let mut duplicated = Tally::default();
    let mut misrouted = Tally::default();
    let mut bad_hooks = Tally::default();
    let mut other = Tally::default();
    let mut notes = Vec::new();
    let mut deliveries = 0;
    let mut reruns = 0;
    let name = |h: usize| cluster.nodes[h].name.as_str();
    let describe = |id: &str| -> String {
        match expected.by_id.get(id) {
            Some(d) => format!(
                "message #{} {id} ({}, from {} to {}, dropped at +{:.3}s)",
                d.seq,
                d.priority,
                name(d.source),
                d.target.map_or("all (broadcast)", name),
                d.at.as_secs_f64()
            ),
            None => format!("unknown message {id} (not in the ledger)"),
        }
    };

    for h in cluster.agents() {
        let node = &cluster.nodes[h];
        let host = node.name.as_str();
        // The inbox: whole JSON, the right id, once, and only what is for this host.
        let (files, dots) = delivered(node);
        if !dots.is_empty() {
            notes.push(dot_files(host, "inbox", &dots));
        }
        let mut count: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (file, path) in &files {
            let parsed = fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()));
            let message = match parsed {
                Ok(v) => v,
                Err(e) => {
                    other.add(1, || format!("{} is not whole JSON: {e}", path.display()));
                    count
                        .entry(id_in_name(file).to_string())
                        .or_default()
                        .push(file.clone());
                    continue;
                }
            };
            let id = message["id"].as_str().unwrap_or_default().to_string();
            if id != id_in_name(file) {
                other.add(1, || {
                    format!(
                        "{}: its id is {id:?}, not the one in its name",
                        path.display()
                    )
                });
            }
            if let Some(d) = expected.by_id.get(&id) {
                let source_ok = message["source"] == name(d.source);
                let target_ok = match d.target {
                    Some(t) => message["target"] == name(t),
                    None => message["target"].is_null(),
                };
                let seq_ok = message["payload"]["seq"] == d.seq;
                if !(source_ok && target_ok && seq_ok) {
                    other.add(1, || {
                        format!(
                            "{} does not hold what was sent ({}): {message}",
                            path.display(),
                            describe(&id)
                        )
                    });
                }
            }
            count.entry(id).or_default().push(file.clone());
        }
        for id in &expected.by_host[h] {
            match count.get(id).map_or(0, Vec::len) {
                0 => lost.add(1, || format!("{} never reached {host}", describe(id))),
                1 => deliveries += 1,
                n => {
                    deliveries += 1;
                    duplicated.add(1, || {
                        format!(
                            "{} is {n} times in {host}/inbox: {:?}",
                            describe(id),
                            count[id]
                        )
                    });
                }
            }
        }
        for (id, names) in &count {
            if !expected.by_host[h].contains(id) {
                misrouted.add(names.len(), || {
                    format!(
                        "{} is in {host}/inbox, which it was not for: {names:?}",
                        describe(id)
                    )
                });
            }
        }

        // Hooks: once per delivered message; more only with distinct, higher attempts.
        let (runs, malformed) = hook_runs(&node.hook_log);
        for line in &malformed {
            bad_hooks.add(1, || {
                format!("{host}.hooks.log has a malformed line {line:?}")
            });
        }
        let mut host_reruns = 0;
        let mut attempts: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (id, attempt) in &runs {
            attempts.entry(id.as_str()).or_default().push(*attempt);
        }
        for (id, list) in &attempts {
            if !count.contains_key(*id) {
                bad_hooks.add(list.len(), || {
                    format!(
                        "{host}'s hook ran for {} (attempts {list:?}), which is not in its inbox",
                        describe(id)
                    )
                });
                continue;
            }
            let distinct: BTreeSet<u32> = list.iter().copied().collect();
            reruns += distinct.len() - 1;
            host_reruns += distinct.len() - 1;
            let repeated = list.len() - distinct.len();
            bad_hooks.add(repeated + usize::from(distinct.contains(&0)), || {
                format!(
                    "{host}'s hook ran {} times for {}, with attempts {list:?} (in log order): a run repeated without a higher MESYNC_ATTEMPT",
                    list.len(),
                    describe(id)
                )
            });
        }
        // Hooks run one at a time, so each death of the agent interrupts one hook at most.
        let excess = host_reruns.saturating_sub(node.deaths);
        bad_hooks.add(excess, || {
            format!(
                "{host}'s hooks ran again {host_reruns} times, but {host} died only {} times: hooks that had finished ran again",
                node.deaths
            )
        });
        for id in count.keys() {
            if !attempts.contains_key(id.as_str()) {
                bad_hooks.add(1, || {
                    format!(
                        "{host}'s hook never ran for {}, which is in its inbox",
                        describe(id)
                    )
                });
            }
        }

        // Nothing refused, nothing left behind.
        let (failed, _) = list(&node.dir.join("failed"));
        for f in &failed {
            other.add(1, || {
                let reason =
                    fs::read_to_string(node.dir.join("failed").join(format!("{f}.reason")))
                        .unwrap_or_default();
                format!("{host}/failed/{f}: {}", reason.trim())
            });
        }
        let (outbox, outbox_dots) = list(&node.dir.join("outbox"));
        for f in &outbox {
            other.add(1, || format!("{host}/outbox/{f} was never sent"));
        }
        if !outbox_dots.is_empty() {
            notes.push(dot_files(host, "outbox", &outbox_dots));
        }
    }

    // Every message sent should be archived once in its sender's sent/.
    let mut sent: HashMap<String, usize> = HashMap::new();
    for h in cluster.agents() {
        for f in list(&cluster.nodes[h].dir.join("sent")).0 {
            *sent.entry(id_in_name(&f).to_string()).or_default() += 1;
        }
    }
    let not_archived = ledger.iter().filter(|d| !sent.contains_key(&d.id)).count();
    let archived_twice = sent.values().filter(|&&n| n > 1).count();
    if not_archived + archived_twice > 0 {
        notes.push(format!(
            "sent/: {not_archived} messages not archived, {archived_twice} archived more than once"
        ));
    }
    let crashes = stats.crashes();
    other.add(crashes, || {
        format!("{crashes} processes exited without being killed (see the notes)")
    });

    let summary = format!(
        "torture: seed={} kills={} freezes={} messages={} deliveries={deliveries} lost={} duplicated={} misrouted={} hook_reruns={reruns} bad_hook_runs={}",
        opts.seed,
        stats.kills,
        stats.freezes,
        ledger.len(),
        lost.count,
        duplicated.count,
        misrouted.count,
        bad_hooks.count
    );
    let ok = lost.count + duplicated.count + misrouted.count + bad_hooks.count + other.count == 0;
    let mut details = Vec::new();
    for (kind, tally) in [
        ("lost", &lost),
        ("duplicated", &duplicated),
        ("misrouted", &misrouted),
        ("bad hook run", &bad_hooks),
        ("other", &other),
    ] {
        for d in &tally.details {
            details.push(format!("{kind}: {d}"));
        }
        if tally.count > tally.details.len() {
            details.push(format!(
                "{kind}: ... and {} more",
                tally.count - tally.details.len()
            ));
        }
    }
    // Where to look, for the first problem ids: the chaos around them, the log lines.
    let mut ids: Vec<&str> = Vec::new();
    for d in [&lost, &duplicated, &misrouted, &bad_hooks]
        .iter()
        .flat_map(|t| t.details.iter())
    {
        if let Some(id) = expected.by_id.keys().find(|id| d.contains(id.as_str()))
            && !ids.contains(&id.as_str())
            && ids.len() < 3
        {
            ids.push(id);
        }
    }
    for id in ids {
        details.push(trace(cluster, expected, id));
    }
    Report {
        summary,
        ok,
        details,
        notes,
        dir: cluster.root.clone(),
    }
}

/// Files under `dir` whose name holds `id`, or which are mesync's own logs or state (not
/// a queue file, not the harness's logs) and name it inside: `path` or `path: N lines`.
fn find_id(dir: &Path, id: &str, depth: usize, found: &mut Vec<String>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if depth < 4 {
                find_id(&path, id, depth + 1, found);
            }
        } else if name.contains(id) {
            found.push(path.display().to_string());
        } else if depth > 0 && (name.ends_with(".log") || name.ends_with(".jsonl")) {
            let n = fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(id))
                .count();
            if n > 0 {
                found.push(format!("{}: {n} lines", path.display()));
            }
        }
    }
}

/// A note on the dot-files left in a queue (debris of writes cut by a SIGKILL, which
/// mesync removes once they are an hour old).
fn dot_files(host: &str, queue: &str, names: &[String]) -> String {
    format!(
        "{host}/{queue} holds {} dot-files (debris of interrupted writes, removed after an hour), such as {:?}",
        names.len(),
        &names[..names.len().min(2)]
    )
}

/// The chaos in the 10 s after a message was dropped and the log lines naming it.
fn trace(cluster: &Cluster, expected: &Expected, id: &str) -> String {
    let mut out = format!("trace of {id}:");
    if let Some(d) = expected.by_id.get(id) {
        let from = d.at.saturating_sub(Duration::from_secs(1));
        let to = d.at + Duration::from_secs(10);
        out.push_str(&format!(
            "\n  chaos from +{:.3}s to +{:.3}s (chaos.log):",
            from.as_secs_f64(),
            to.as_secs_f64()
        ));
        for (at, text) in &cluster.events.entries {
            if *at >= from && *at <= to {
                out.push_str(&format!("\n    +{:.3}s {text}", at.as_secs_f64()));
            }
        }
    }
    // Where it is now: file names holding the id, and the mesync state files naming it
    // (the hub's accepted.log, the agents' state/ledger.jsonl...).
    let mut found = Vec::new();
    find_id(&cluster.root, id, 0, &mut found);
    out.push_str("\n  files under the run dir with it in their name or, for state files, content:");
    for f in &found {
        out.push_str(&format!("\n    {f}"));
    }
    for node in &cluster.nodes {
        let text = fs::read_to_string(&node.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(id)).collect();
        if lines.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "\n  {} ({} lines name it):",
            node.log.display(),
            lines.len()
        ));
        for l in lines.iter().take(12) {
            out.push_str(&format!("\n    {l}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dropped(seq: u64, source: usize, target: Option<usize>) -> Dropped {
        let mut rng = Rng::new(seq + 1);
        Dropped {
            seq,
            id: rng.uuid(),
            source,
            target,
            priority: "normal",
            at: Duration::from_millis(seq * 100),
        }
    }

    fn put(cluster: &Cluster, host: usize, name_prefix: &str, d: &Dropped, body: Option<&str>) {
        let names = |h: usize| cluster.nodes[h].name.clone();
        let message = json!({
            "id": d.id,
            "type": MESSAGE_TYPE,
            "source": names(d.source),
            "target": d.target.map(names),
            "priority": d.priority,
            "created_at": "2024-01-01T00:00:00.000000+00:00",
            "payload": {"seq": d.seq},
        });
        let text = body.map_or(message.to_string(), str::to_string);
        let path = cluster.nodes[host]
            .dir
            .join("inbox")
            .join(format!("{name_prefix}_{}.json", d.id));
        fs::write(path, text).unwrap();
    }

    fn hooks(cluster: &Cluster, host: usize, runs: &[(&Dropped, u32)]) {
        let text: String = runs
            .iter()
            .map(|(d, attempt)| format!("{} {attempt}\n", d.id))
            .collect();
        fs::write(&cluster.nodes[host].hook_log, text).unwrap();
    }

    /// The checker finds each kind of problem it is meant to find, and nothing else.
    #[test]
    fn the_checker_counts_lost_duplicated_misrouted_and_bad_hook_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let cluster = Cluster::new(Path::new("/bin/false"), tmp.path(), 3, false).unwrap();
        // m1: a1 broadcast (a2, a3); m2: a1 -> a2; m3: a3 -> a1; m4: a1 -> a3.
        let m1 = dropped(0, 1, None);
        let m2 = dropped(1, 1, Some(2));
        let m3 = dropped(2, 3, Some(1));
        let m4 = dropped(3, 1, Some(3));
        let ledger = vec![m1.clone(), m2.clone(), m3.clone(), m4.clone()];
        // a1: m3, and its own broadcast m1 (misrouted, and its hook never ran).
        put(&cluster, 1, "20240101T000000", &m3, None);
        put(&cluster, 1, "20240101T000000", &m1, None);
        hooks(&cluster, 1, &[(&m3, 1), (&m3, 2)]);
        // a2: m1, and m2 twice; m2's hook twice with attempt 1.
        put(&cluster, 2, "20240101T000000", &m1, None);
        put(&cluster, 2, "20240101T000000", &m2, None);
        put(&cluster, 2, "20240101T000001", &m2, None);
        hooks(&cluster, 2, &[(&m1, 1), (&m2, 1), (&m2, 1)]);
        // a3: m1 lost; m4 torn.
        put(&cluster, 3, "20240101T000000", &m4, Some("{\"id\": \"tor"));
        hooks(&cluster, 3, &[(&m4, 1)]);

        let expected = Expected::new(&ledger, 3);
        assert_eq!(expected.total, 5);
        let opts = Options::new(true, 7);
        let report = check(&cluster, &ledger, &expected, &opts, &ChaosStats::default());
        assert_eq!(
            report.summary,
            "torture: seed=7 kills=0 freezes=0 messages=4 deliveries=4 lost=1 duplicated=1 misrouted=1 hook_reruns=1 bad_hook_runs=3",
            "{:#?}",
            report.details
        );
        assert!(!report.ok);
        assert!(
            report
                .details
                .iter()
                .any(|d| d.contains("is not whole JSON")),
            "{:#?}",
            report.details
        );
    }

    #[test]
    fn the_same_seed_makes_the_same_choices() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        let xs: Vec<u64> = (0..100).map(|_| a.below(1000)).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.below(1000)).collect();
        assert_eq!(xs, ys);
        let id = Rng::new(1).uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4", "version 4: {id}");
    }
}
