//! The agent's status file (`state/status.json`), which `mesync status` reads: whether the
//! agent runs, whether it reached the hub, when it last synced and the last error.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::message::Timestamp;
use crate::shortage::Shortage;
use crate::spool;

const FILE: &str = "status.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub running: bool,
    pub host_id: String,
    pub server_url: String,
    pub started_at: String,
    /// `None` until the first exchange with the hub.
    pub hub_reachable: Option<bool>,
    pub last_sync: Option<String>,
    pub last_error: Option<String>,
    /// Directories short of a resource now (the inbox, `state/`, `failed/`...).
    #[serde(default)]
    pub shortages: Vec<Shortage>,
}

impl Status {
    pub fn new(config: &Config) -> Status {
        Status {
            pid: std::process::id(),
            running: true,
            host_id: config.host_id.clone(),
            server_url: config.server_url.clone(),
            started_at: Timestamp::now().to_string(),
            hub_reachable: None,
            last_sync: None,
            last_error: None,
            shortages: Vec::new(),
        }
    }

    /// Notes an exchange with the hub; true when reachability changed (worth saving now).
    pub fn record(&mut self, result: Result<(), String>) -> bool {
        let before = self.hub_reachable;
        match result {
            Ok(()) => {
                self.hub_reachable = Some(true);
                self.last_sync = Some(Timestamp::now().to_string());
            }
            Err(err) => {
                self.hub_reachable = Some(false);
                self.last_error = Some(err);
            }
        }
        before != self.hub_reachable
    }

    /// Writes the status file. A failure is logged, never fatal: it is only a report.
    pub fn save(&self, state_dir: &Path) {
        let bytes = serde_json::to_vec_pretty(self).expect("a status serializes");
        if let Err(err) = spool::write_atomic(state_dir, FILE, &bytes) {
            tracing::debug!(%err, "cannot write the status file");
        }
    }

    /// Marks the agent stopped in the status file.
    pub fn stopped(&mut self, state_dir: &Path) {
        self.running = false;
        self.save(state_dir);
    }

    /// The status file, if the agent ever wrote one.
    pub fn load(state_dir: &Path) -> Option<Status> {
        let bytes = std::fs::read(state_dir.join(FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// True when the status says running and its process is alive.
    pub fn is_alive(&self) -> bool {
        self.running
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), None).is_ok()
    }
}
