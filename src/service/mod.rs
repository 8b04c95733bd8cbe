//! Living under a service manager: readiness and status, the watchdog, listeners handed
//! over by socket activation, and where logs go. systemd's pieces are in `systemd.rs`;
//! elsewhere (macOS under launchd) `other.rs` makes them no-ops, so the rest of the code
//! calls the same functions everywhere.

#[cfg_attr(target_os = "linux", path = "systemd.rs")]
#[cfg_attr(not(target_os = "linux"), path = "other.rs")]
mod platform;

pub use platform::{
    inherited_listeners, journal_layer, ready, reloading, status, stderr_is_journal, stopping,
    watchdog, watchdog_interval,
};
