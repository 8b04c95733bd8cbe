//! Systems without systemd (macOS under launchd): nothing to notify, no inherited sockets,
//! no journal. launchd needs none of these; it reads stderr and restarts on exit.

use std::net::TcpListener;
use std::time::Duration;

use crate::error::Result;

pub fn ready(_text: &str) {}

pub fn status(_text: &str) {}

pub fn stopping() {}

pub fn reloading() {}

pub fn watchdog(_text: &str) {}

pub fn watchdog_interval() -> Option<Duration> {
    None
}

pub fn inherited_listeners() -> Result<Vec<TcpListener>> {
    Ok(Vec::new())
}

pub fn stderr_is_journal() -> bool {
    false
}

/// Never a layer here; the type only has to be a tracing layer.
pub fn journal_layer() -> Option<tracing_subscriber::layer::Identity> {
    None
}
