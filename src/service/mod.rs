//! Living under a service manager: readiness and status, the watchdog (sent only while the
//! main loops are alive, see [`liveness`]), listeners handed over by socket activation, and
//! where logs go. systemd's pieces are in `systemd.rs`; elsewhere (macOS under launchd)
//! `other.rs` makes them no-ops, so the rest of the code calls the same functions everywhere.

pub mod liveness;

#[cfg_attr(target_os = "linux", path = "systemd.rs")]
#[cfg_attr(not(target_os = "linux"), path = "other.rs")]
mod platform;

pub use liveness::{Heartbeat, Liveness, report};
pub use platform::{
    inherited_listeners, journal_layer, ready, reloading, status, stderr_is_journal, stopping,
    watchdog, watchdog_interval,
};

/// Variables of the environment that change what mesync does, besides every `MESYNC_*`:
/// where it logs, whether it talks to a service manager, which sockets it takes.
const SETTINGS_ENV: [&str; 10] = [
    "RUST_LOG",
    "STATE_DIRECTORY",
    "JOURNAL_STREAM",
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "NO_COLOR",
];

/// Keeps `cmd` (a `mesync` to be started by tests, benchmarks or the demo's callers) from
/// inheriting any setting from the caller's environment.
pub fn clear_inherited_settings(cmd: &mut std::process::Command) {
    for (key, _) in std::env::vars_os() {
        if let Some(key) = key.to_str()
            && (key.starts_with("MESYNC_") || SETTINGS_ENV.contains(&key))
        {
            cmd.env_remove(key);
        }
    }
}
