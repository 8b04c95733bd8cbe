//! systemd: sd_notify(3) messages, sd_listen_fds(3) sockets and the journal, through the
//! `sd-notify` and `tracing-journald` crates. Every notification is a no-op when there is
//! no `NOTIFY_SOCKET` (not started by systemd).

use std::net::TcpListener;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::error::{Error, Result};

fn send(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::debug!(%err, "cannot notify the service manager");
    }
}

/// READY=1, with a first status line.
pub fn ready(text: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(text)]);
}

/// STATUS=..., the line `systemctl status` shows.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// STOPPING=1.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// RELOADING=1 (READY=1 follows once the new configuration is in place).
pub fn reloading() {
    send(&[NotifyState::Reloading, NotifyState::Status("reloading")]);
}

/// WATCHDOG=1, with the status line in the same message.
pub fn watchdog(text: &str) {
    send(&[NotifyState::Watchdog, NotifyState::Status(text)]);
}

/// How often to send WATCHDOG=1: half the interval systemd set (`WATCHDOG_USEC`), so that
/// one late ping is not a restart. `None` when there is no watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// The listening sockets systemd passed (`LISTEN_FDS`/`LISTEN_PID`, named by
/// `LISTEN_FDNAMES`), made non-blocking for tokio. Empty when none were passed: the caller
/// binds its own.
pub fn inherited_listeners() -> Result<Vec<TcpListener>> {
    // SAFETY: the variables are removed (so that hooks and other children do not inherit
    // them) while no other thread reads the environment: this runs at start-up, before
    // the runtime's threads exist.
    let fds: Vec<(RawFd, String)> = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
        .map_err(|e| Error::Config(format!("socket activation: {e}")))?
        .collect();
    fds.into_iter()
        .map(|(fd, name)| {
            // SAFETY: systemd hands these descriptors to this process, which owns them from
            // here on; each is wrapped once.
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            listener
                .set_nonblocking(true)
                .map_err(|e| Error::Config(format!("socket activation: descriptor {fd}: {e}")))?;
            let addr = listener.local_addr().map_err(|e| {
                Error::Config(format!(
                    "socket activation: descriptor {fd} ({name}) is not a TCP listener: {e}"
                ))
            })?;
            tracing::info!(fd, %name, %addr, "listening socket passed by the service manager");
            Ok(listener)
        })
        .collect()
}

/// True when stderr is the journal: `JOURNAL_STREAM` names stderr's device and inode.
pub fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().is_ok_and(|d| d == meta.dev())
        && ino.parse::<u64>().is_ok_and(|i| i == meta.ino())
}

/// A tracing layer writing to the journal with structured fields, if the journal is there.
pub fn journal_layer() -> Option<tracing_journald::Layer> {
    use tracing_journald::{Priority, PriorityMappings};
    tracing_journald::layer()
        .ok()
        // Event fields become MESYNC_ID, MESYNC_TYPE, MESYNC_HOST, ...: a namespace of
        // their own, so `journalctl MESYNC_ID=<id>` finds every line about a message.
        .map(|layer| {
            layer
                .with_syslog_identifier("mesync".into())
                .with_field_prefix(Some("MESYNC".into()))
                // syslog's meaning of the levels (info is 6, debug 7), which `journalctl -p`
                // filters by; the crate's default shifts them one step up.
                .with_priority_mappings(PriorityMappings {
                    info: Priority::Informational,
                    debug: Priority::Debug,
                    ..PriorityMappings::new()
                })
        })
}
