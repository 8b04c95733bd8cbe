//! Starting the real `mesync` binary as a hub or an agent, for benchmarks.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::project_root;

/// Builds the release binary and returns its path.
pub fn build_release() -> Result<PathBuf, String> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--bin", "mesync"])
        .current_dir(project_root())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("cargo build --release failed".into());
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| project_root().join("target"));
    Ok(target.join("release").join("mesync"))
}

/// A child process killed when dropped.
pub struct Proc(Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `mesync` command with no setting inherited from the caller.
fn command(binary: &Path) -> Command {
    let mut command = Command::new(binary);
    mesync::service::clear_inherited_settings(&mut command);
    command.env("RUST_LOG", "warn,mesync=info");
    command
}

/// Starts a hub on an ephemeral loopback port; returns it and its address.
pub fn start_hub(binary: &Path, data_dir: &Path) -> Result<(Proc, String), String> {
    start_hub_with(binary, data_dir, None)
}

/// [`start_hub`] with a config file (for `[hub]` settings such as TLS or the connection cap).
pub fn start_hub_with(
    binary: &Path,
    data_dir: &Path,
    config: Option<&Path>,
) -> Result<(Proc, String), String> {
    let mut command = command(binary);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let mut child = command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the hub: {e}"))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let rest = line
                .split("listening on http://")
                .nth(1)
                .or_else(|| line.split("listening on https://").nth(1));
            if let Some(rest) = rest {
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let proc = Proc(child);
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| "the hub did not say where it listens".to_string())?;
    Ok((proc, addr))
}

/// Starts an agent with its own base dir.
pub fn start_agent(binary: &Path, base: &Path, host: &str, addr: &str) -> Result<Proc, String> {
    start_agent_as(binary, base, host, addr, None)
}

/// [`start_agent`] as the user and group `user` when given, its base dir made theirs.
pub fn start_agent_as(
    binary: &Path,
    base: &Path,
    host: &str,
    addr: &str,
    user: Option<(u32, u32)>,
) -> Result<Proc, String> {
    use std::os::unix::process::CommandExt;
    for dir in ["", "outbox", "inbox", "sent", "failed", "hooks", "state"] {
        let path = base.join(dir);
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let mut command = command(binary);
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
    let child = command
        .arg("start")
        .env("MESYNC_BASE_DIR", base)
        .env("MESYNC_HOST_ID", host)
        .env("MESYNC_SERVER_URL", format!("http://{addr}"))
        .env("HOME", base)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start agent {host}: {e}"))?;
    Ok(Proc(child))
}

/// A plain HTTP GET with short timeouts; the body of a 200.
pub use crate::torture::http_get;

/// Polls `check` until it holds or `timeout` passes.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!("timed out waiting for {what}"))
}
