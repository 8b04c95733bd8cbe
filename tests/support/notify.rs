//! The service manager's side of sd_notify: a NOTIFY_SOCKET that tests bind and read.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{TIMEOUT, wait_until};

/// Every line sent to a NOTIFY_SOCKET, with when it came, read by a thread of its own as it
/// comes: a sender that pings every 200 ms must never find the socket's queue full (it
/// would block, as it would with a service manager that stopped reading).
pub struct Notifications {
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    path: PathBuf,
}

impl Notifications {
    pub fn listen(path: &Path) -> Notifications {
        let socket = UnixDatagram::bind(path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (into, stopped) = (Arc::clone(&seen), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let at = Instant::now();
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    let mut seen = into.lock().unwrap_or_else(|p| p.into_inner());
                    seen.extend(text.lines().map(|l| (at, l.to_string())));
                }
            }
        });
        Notifications {
            seen,
            stop,
            path: path.to_path_buf(),
        }
    }

    /// The value for NOTIFY_SOCKET.
    pub fn socket(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    pub fn lines(&self) -> Vec<(Instant, String)> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn len(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Waits until a line from index `from` on starts with `prefix`; returns its index.
    pub fn wait_line(&self, from: usize, prefix: &str, what: &str) -> usize {
        let lines = self.wait_for(from, TIMEOUT, what, |n| find_in(n, prefix));
        find(&lines, from, prefix).expect("found by wait_for")
    }

    /// Whether a line from index `from` on starts with `prefix`.
    pub fn has(&self, from: usize, prefix: &str) -> bool {
        find(&self.lines(), from, prefix).is_some()
    }

    /// Waits until `cond` holds for the lines from index `from` on; returns them all.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        mut cond: impl FnMut(&[(Instant, String)]) -> bool,
    ) -> Vec<(Instant, String)> {
        wait_until(timeout, what, || cond(&self.lines()[from..]));
        self.lines()
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if std::thread::panicking() {
            eprintln!("----- notifications on {} -----", self.path.display());
            for (_, line) in self.lines() {
                eprintln!("{line}");
            }
        }
    }
}

pub fn find_in(lines: &[(Instant, String)], prefix: &str) -> bool {
    find(lines, 0, prefix).is_some()
}

/// The index of the first line at or after `from` that starts with `prefix`.
pub fn find(lines: &[(Instant, String)], from: usize, prefix: &str) -> Option<usize> {
    (from..lines.len()).find(|&i| lines[i].1.starts_with(prefix))
}
