//! What idle long-polls cost the hub: `cargo xtask idle [--short] [--hub BINARY]`, and
//! row 4 of `cargo xtask bench`.
//!
//! - Light hosts (see `light`) join one hub in steps (5,000, 10,000, 20,000 in the full
//!   mode); at each step, once every poll waits at the hub, its RSS is read. The slope
//!   between the steps is what one more idle long-poll costs, whatever the hub's fixed
//!   start-up memory.
//! - The hub's CPU over one long-poll period at 10,000 polls (utime + stime from
//!   /proc/PID/stat): idle means no messages, not no requests, so every poll is answered
//!   and renewed once inside the window.
//! - The same steps over TLS.
//! - Real `mesync start` agents, a few hundred (each is a process of several MiB, so
//!   thousands do not fit a small machine), in two steps: the slope per agent, and how many
//!   connections each holds at the hub.
//!
//! The largest step is cut to what the open-file limit allows (the hub keeps some
//! descriptors back for its store), and the row says so.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::light::{self, Fleet, Transport};
use crate::procs::{Proc, build_release, start_hub_with};

/// The sizes of one run.
pub struct Sizes {
    /// Light hosts after each step.
    light: &'static [usize],
    /// Light hosts over TLS after each step.
    tls: &'static [usize],
    /// Real agents after each step.
    agents: &'static [usize],
    /// The count at which the CPU is measured.
    cpu_at: usize,
    /// How long each light host's long-poll waits: the agents' default (three times the
    /// default `http_timeout` of 10 s).
    wait: Duration,
    /// How long the CPU is measured.
    cpu_window: Duration,
}

pub const FULL: Sizes = Sizes {
    light: &[5_000, 10_000, 20_000],
    tls: &[5_000, 10_000],
    agents: &[150, 300],
    cpu_at: 10_000,
    wait: Duration::from_secs(30),
    // One long-poll period, plus a little: each poll is renewed once inside it.
    cpu_window: Duration::from_secs(32),
};

pub const SHORT: Sizes = Sizes {
    light: &[250, 500],
    tls: &[100, 200],
    agents: &[2, 4],
    cpu_at: 500,
    wait: Duration::from_secs(30),
    cpu_window: Duration::from_secs(2),
};

/// File descriptors the hub keeps back from connections (`RESERVED_FDS` in its `conn`).
const HUB_RESERVED_FDS: usize = 256;
/// Descriptors left for everything but the light hosts' connections, on each side.
const FD_MARGIN: usize = 64;

/// `cargo xtask idle [--short] [--hub BINARY]`: only this measurement, against the hub
/// built from this tree or the binary given (to compare two builds in one sitting).
pub fn cli(args: &[String]) -> Result<(), String> {
    const USAGE: &str =
        "usage: cargo xtask idle [--short] [--hub BINARY] [--only light|tls|agents]";
    let mut sizes = &FULL;
    let mut binary = None;
    let mut only = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--short" => sizes = &SHORT,
            "--hub" => binary = Some(PathBuf::from(args.next().ok_or(USAGE)?)),
            "--only" => match args.next().map(String::as_str) {
                Some(case @ ("light" | "tls" | "agents")) => only = Some(case),
                _ => return Err(USAGE.into()),
            },
            _ => return Err(USAGE.into()),
        }
    }
    let binary = match binary {
        Some(binary) => binary,
        None => build_release()?,
    };
    light::raise_fd_limit();
    let parent = crate::project_root().join("target").join("bench");
    fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("idle.")
        .tempdir_in(&parent)
        .map_err(|e| format!("cannot create a directory in {}: {e}", parent.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    println!("mesync idle long-polls, hub {}", binary.display());
    let rows = runtime.block_on(rows(&binary, tmp.path(), sizes, only))?;
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    for (label, value) in &rows {
        println!("{label:<width$}  {value}");
    }
    Ok(())
}

/// Measures everything; the table's rows, labels numbered as row 4 of the bench.
/// Measures every case, or the one named; the table's rows, labelled as row 4 of the bench.
pub async fn rows(
    binary: &Path,
    root: &Path,
    sizes: &Sizes,
    only: Option<&str>,
) -> Result<Vec<(String, String)>, String> {
    let most = most_connections();
    let wanted = |case: &str| only.is_none_or(|only| only == case);
    let mut rows = Vec::new();
    if wanted("light") {
        let plain = light_steps(binary, &root.join("plain"), sizes, false, most).await?;
        rows.push((
            "4. idle long-polls, light hosts".to_string(),
            plain.describe("poll"),
        ));
        if let Some(cpu) = &plain.cpu {
            rows.push((
                format!("   idle CPU at {} long-polls", thousands(sizes.cpu_at)),
                cpu.describe(),
            ));
        }
    }
    if wanted("tls") {
        let tls = light_steps(binary, &root.join("tls"), sizes, true, most).await?;
        rows.push((
            "   idle long-polls over TLS".to_string(),
            tls.describe("poll"),
        ));
    }
    if wanted("agents") {
        let agents = agent_steps(binary, &root.join("agents"), sizes, most).await?;
        let mut value = agents.describe("agent");
        if let Some(cpu) = &agents.cpu {
            value.push_str(&format!("; CPU {}", cpu.describe()));
        }
        rows.push(("   idle real agents (mesync start)".to_string(), value));
    }
    Ok(rows)
}

/// What one series of steps measured.
struct Steps {
    /// The hub's RSS before the first step.
    empty: u64,
    /// (count, RSS, connections open at the hub) after each step.
    points: Vec<(usize, u64, usize)>,
    /// Steps cut to what the open-file limit allows: (asked, measured).
    cut: Option<(usize, usize)>,
    cpu: Option<Cpu>,
}

impl Steps {
    fn describe(&self, unit: &str) -> String {
        let mut text = format!("hub RSS {} with none", mib(self.empty));
        for (count, rss, _) in &self.points {
            text.push_str(&format!("; {}: {}", thousands(*count), mib(*rss)));
        }
        if let Some(slope) = slope(&self.points) {
            let (first, last) = (self.points[0].0, self.points[self.points.len() - 1].0);
            text.push_str(&format!(
                "; {:.1} KiB per {unit} ({} -> {})",
                slope / 1024.0,
                thousands(first),
                thousands(last)
            ));
        }
        if let Some(&(count, _, connections)) = self.points.last()
            && unit == "agent"
        {
            text.push_str(&format!(
                ", {:.1} connections per agent",
                connections as f64 / count as f64
            ));
        }
        if let Some((asked, measured)) = self.cut {
            text.push_str(&format!(
                " [{} cut to {}: the open-file limit]",
                thousands(asked),
                thousands(measured)
            ));
        }
        text
    }
}

/// The hub's CPU over a window.
struct Cpu {
    percent: f64,
    window: Duration,
    renewed: bool,
}

impl Cpu {
    fn describe(&self) -> String {
        let what = if self.renewed {
            "every poll answered and renewed once"
        } else {
            "shorter than a poll"
        };
        format!(
            "{:.2} % of a core over {:.0} s ({what})",
            self.percent,
            self.window.as_secs_f64()
        )
    }
}

/// The most connections both this process and the hub can hold, from the open-file limit
/// (which both raise to the hard limit).
fn most_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed to it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return usize::MAX;
    }
    let hard = usize::try_from(limit.rlim_max.min(1 << 20)).unwrap_or(usize::MAX);
    hard.saturating_sub(HUB_RESERVED_FDS + FD_MARGIN)
}

/// Writes the hub's config: a connection cap that lets every step in, and TLS when asked.
/// Returns the config file and, with TLS, the client configuration that trusts the hub.
fn hub_config(root: &Path, most: usize, tls: bool) -> Result<(PathBuf, Option<Transport>), String> {
    fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut text = format!("[hub]\nmax_connections = {}\n", most + FD_MARGIN);
    let mut transport = None;
    if tls {
        let dir = root.join("tls");
        let (ca, hub) = mesync::tls::ca::init(&dir, &[], mesync::tls::ca::DEFAULT_DAYS)
            .map_err(|e| e.to_string())?;
        text.push_str(&format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            hub.cert.display().to_string(),
            hub.key.display().to_string()
        ));
        let files = mesync::tls::ClientFiles {
            ca_file: Some(ca.cert),
            ..Default::default()
        };
        let config = mesync::tls::client_config(&files).map_err(|e| e.to_string())?;
        transport = Some(Transport::tls(config));
    }
    let path = root.join("hub.toml");
    fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path, transport))
}

/// Light hosts in steps, plain or over TLS.
async fn light_steps(
    binary: &Path,
    root: &Path,
    sizes: &Sizes,
    tls: bool,
    most: usize,
) -> Result<Steps, String> {
    let (config, transport) = hub_config(root, most, tls)?;
    let transport = transport.unwrap_or(Transport::Plain);
    let (hub, addr) = start_hub_with(binary, &root.join("hub"), Some(&config))?;
    let pid = hub.pid();
    let asked = if tls { sizes.tls } else { sizes.light };
    let mut steps = Steps {
        empty: settled_rss(pid).await?,
        points: Vec::new(),
        cut: None,
        cpu: None,
    };
    let mut fleets = Vec::new();
    let mut joined = 0;
    for (step, &wanted) in asked.iter().enumerate() {
        let count = wanted.min(most);
        if count < wanted {
            steps.cut = Some((wanted, count));
        }
        if count <= joined {
            continue;
        }
        let started = Instant::now();
        let prefix = format!("idle{step}-");
        let wait = sizes.wait.as_secs();
        fleets.push(Fleet::start_over(&transport, &addr, &prefix, count - joined, wait).await?);
        joined = count;
        let connections = polls_waiting(&transport, &addr, count).await?;
        let rss = settled_rss(pid).await?;
        eprintln!(
            "idle{}: {count} long-polls waiting after {:.1} s, hub RSS {}",
            if tls { " over TLS" } else { "" },
            started.elapsed().as_secs_f64(),
            mib(rss)
        );
        steps.points.push((count, rss, connections));
        if let Ok(dump) = std::env::var("IDLE_DUMP") {
            let _ = fs::copy(
                format!("/proc/{pid}/smaps"),
                format!("{dump}.{count}.smaps"),
            );
            let _ = fs::copy(
                format!("/proc/{pid}/status"),
                format!("{dump}.{count}.status"),
            );
        }
        if !tls && count == sizes.cpu_at {
            steps.cpu = Some(cpu(pid, sizes.cpu_window, sizes.wait).await?);
        }
    }
    drop(fleets);
    drop(hub);
    Ok(steps)
}

/// Real agents in steps.
async fn agent_steps(
    binary: &Path,
    root: &Path,
    sizes: &Sizes,
    most: usize,
) -> Result<Steps, String> {
    let (config, _) = hub_config(root, most, false)?;
    let (hub, addr) = start_hub_with(binary, &root.join("hub"), Some(&config))?;
    let pid = hub.pid();
    let user = agent_user();
    if user.is_some() {
        let bench = crate::project_root().join("target");
        open_to_others(root, &bench)?;
    }
    let mut steps = Steps {
        empty: settled_rss(pid).await?,
        points: Vec::new(),
        cut: None,
        cpu: None,
    };
    let mut agents: Vec<Proc> = Vec::new();
    for &count in sizes.agents {
        let started = Instant::now();
        while agents.len() < count {
            let host = format!("agent{}", agents.len());
            agents.push(crate::procs::start_agent_as(
                binary,
                &root.join(&host),
                &host,
                &addr,
                user,
            )?);
        }
        let connections = polls_waiting(&Transport::Plain, &addr, count).await?;
        let rss = settled_rss(pid).await?;
        eprintln!(
            "idle: {count} agents long-polling after {:.1} s ({connections} connections), hub RSS {}",
            started.elapsed().as_secs_f64(),
            mib(rss)
        );
        steps.points.push((count, rss, connections));
    }
    steps.cpu = Some(cpu(pid, sizes.cpu_window, sizes.wait).await?);
    drop(agents);
    drop(hub);
    Ok(steps)
}

/// The user agents run as: when the bench runs as root, `nobody`. File watchers (inotify
/// instances) are limited per user, 128 by default: hundreds of agents under the bench's
/// own user would take them from everything else that user runs. (Past the limit an agent
/// goes on with its periodic scan, which changes nothing at the hub.)
fn agent_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no memory effects; getpwnam returns a pointer into static storage
    // that is read at once, before any other call could overwrite it.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let entry = libc::getpwnam(c"nobody".as_ptr());
        if entry.is_null() {
            return None;
        }
        Some(((*entry).pw_uid, (*entry).pw_gid))
    }
}

/// Lets other users reach `dir` (and its parents below `top`): a temporary directory is
/// private to its owner, and the agents run as another user.
fn open_to_others(dir: &Path, top: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    for dir in dir
        .ancestors()
        .take_while(|d| d.starts_with(top) && *d != top)
    {
        let meta = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o011 != 0o011 {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o011))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    Ok(())
}

/// Waits until `count` long-polls wait at the hub; returns the connections open then.
async fn polls_waiting(transport: &Transport, addr: &str, count: usize) -> Result<usize, String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let text = metrics(transport, addr).await;
        let polls = metric(&text, "mesync_long_polls_open");
        if polls >= count {
            return Ok(metric(&text, "mesync_connections_open").saturating_sub(1));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {polls} of {count} long-polls reached the hub in 300 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics(transport: &Transport, addr: &str) -> String {
    match light::get_over(transport, addr, "/metrics").await {
        Ok((200, body)) => String::from_utf8_lossy(&body).into_owned(),
        _ => String::new(),
    }
}

/// One unlabelled value of a Prometheus text.
fn metric(text: &str, name: &str) -> usize {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The hub's RSS once the last requests have been answered and freed.
async fn settled_rss(pid: u32) -> Result<u64, String> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    rss_bytes(pid)
}

/// The hub's CPU over `window`; `renewed` when the window covers a whole long-poll.
async fn cpu(pid: u32, window: Duration, wait: Duration) -> Result<Cpu, String> {
    let before = cpu_ticks(pid)?;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let ticks = cpu_ticks(pid)? - before;
    let seconds = started.elapsed().as_secs_f64();
    // SAFETY: sysconf has no memory effects.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(Cpu {
        percent: ticks as f64 / per_second / seconds * 100.0,
        window,
        renewed: window >= wait,
    })
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(field(11) + field(12))
}

fn rss_bytes(pid: u32) -> Result<u64, String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| "no VmRSS in /proc".to_string())
}

/// The least-squares slope of RSS over count, in bytes per connection.
fn slope(points: &[(usize, u64, usize)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0 as f64).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1 as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for &(x, y, _) in points {
        num += (x as f64 - mean_x) * (y as f64 - mean_y);
        den += (x as f64 - mean_x).powi(2);
    }
    (den > 0.0).then(|| num / den)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// 20000 as "20,000".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_is_the_cost_of_one_more() {
        let points = [
            (5_000, 50_000_000 + 45_000_000, 0),
            (10_000, 50_000_000 + 90_000_000, 0),
            (20_000, 50_000_000 + 180_000_000, 0),
        ];
        let slope = slope(&points).unwrap();
        assert!((slope - 9_000.0).abs() < 1e-6, "{slope}");
        assert!(super::slope(&points[..1]).is_none());
    }

    #[test]
    fn counts_read_as_people_write_them() {
        assert_eq!(thousands(500), "500");
        assert_eq!(thousands(19_680), "19,680");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }
}
