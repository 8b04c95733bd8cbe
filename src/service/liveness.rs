//! Whether the loops that do the service's work are alive, so that WATCHDOG=1 means more
//! than "the runtime still runs a timer".
//!
//! Each main loop holds a [`Heartbeat`]. Before a step that could hang (a disk write, a call
//! to the hub, a hook) or a timed wait, it says by when it will be back
//! ([`Heartbeat::busy_for`]); while it waits for work that may never come (its own channel,
//! a wake-up), it is [`Heartbeat::idle`], alive by definition. A loop more than [`MARGIN`]
//! past the time it gave is stuck, and [`report`] withholds WATCHDOG=1 until it is back, so
//! that the service manager restarts the service. The runtime needs no heartbeat of its
//! own: [`report`] runs on it, so a stuck runtime sends nothing at all.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

/// How far past its deadline a loop may be before it counts as stuck: room for a loaded
/// machine to be late in waking it up.
pub const MARGIN: Duration = Duration::from_secs(5);

/// The longest one step on the disk (a group commit, reading an outbox file, writing a
/// pulled batch) may take before the disk counts as stuck. Generous: a healthy disk that is
/// busy flushing other programs' data can take many seconds.
pub const DISK_BOUND: Duration = Duration::from_secs(60);

/// How often the status line is refreshed when there is no watchdog to keep pace with.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// The heartbeats of one process's main loops.
#[derive(Clone, Default)]
pub struct Liveness {
    loops: Arc<Mutex<Vec<Arc<Beat>>>>,
}

/// One loop's word on when it will be back; clones (for the blocking work a loop hands off)
/// speak for the same loop. Dropped during a panic, it is stuck: a loop that died never
/// comes back.
#[derive(Clone)]
pub struct Heartbeat(Arc<Beat>);

struct Beat {
    name: &'static str,
    state: Mutex<State>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// Waiting for work: alive however long it takes.
    Idle,
    /// Working (or sleeping) since `since`, back by `due`.
    Busy { since: Instant, due: Instant },
}

/// A loop past its deadline by more than [`MARGIN`].
#[derive(Debug, Clone, PartialEq)]
pub struct Stuck {
    pub name: &'static str,
    /// When it went busy.
    pub since: Instant,
    /// When it said it would be back.
    pub due: Instant,
}

impl Liveness {
    /// A heartbeat for the loop `name` (as logs and the status line call it), idle at first.
    pub fn heartbeat(&self, name: &'static str) -> Heartbeat {
        let beat = Arc::new(Beat {
            name,
            state: Mutex::new(State::Idle),
        });
        lock(&self.loops).push(Arc::clone(&beat));
        Heartbeat(beat)
    }

    /// The loop most overdue, if one is stuck.
    pub fn stuck(&self) -> Option<Stuck> {
        self.stuck_at(Instant::now())
    }

    fn stuck_at(&self, now: Instant) -> Option<Stuck> {
        lock(&self.loops)
            .iter()
            .filter_map(|beat| match *lock(&beat.state) {
                State::Busy { since, due } if now > due + MARGIN => Some(Stuck {
                    name: beat.name,
                    since,
                    due,
                }),
                _ => None,
            })
            .min_by_key(|stuck| stuck.due)
    }
}

impl Heartbeat {
    /// About to do something that ends, or to sleep, within `bound`.
    pub fn busy_for(&self, bound: Duration) {
        let now = Instant::now();
        // A bound too far away to compute is as good as none: idle.
        self.set(match now.checked_add(bound) {
            Some(due) => State::Busy { since: now, due },
            None => State::Idle,
        });
    }

    /// About to wait for work, which may not come for a long time.
    pub fn idle(&self) {
        self.set(State::Idle);
    }

    fn set(&self, state: State) {
        *lock(&self.0.state) = state;
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let now = Instant::now();
            self.set(State::Busy {
                since: now,
                due: now,
            });
        }
    }
}

/// The heartbeats hold no invariant a panic could break.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Stuck {
    /// "commit thread stuck since 2025-01-01T12:00:00Z (1m 5s, due back 5s ago)".
    fn describe(&self, now: Instant) -> String {
        let wall = SystemTime::now() - now.saturating_duration_since(self.since);
        let secs = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs()));
        format!(
            "{} stuck since {} ({}, due back {} ago)",
            self.name,
            humantime::format_rfc3339_seconds(wall),
            secs(now.saturating_duration_since(self.since)),
            secs(now.saturating_duration_since(self.due)),
        )
    }
}

/// Keeps the service manager informed until `shutdown`: a status line from `status_line`,
/// and, under a watchdog, WATCHDOG=1 at half its interval while no loop of `liveness` is
/// stuck. When one is, the pings stop (systemd restarts the service once `WatchdogSec` has
/// passed), the status line says which loop and since when, and a warning is logged once.
pub async fn report(
    liveness: Liveness,
    shutdown: CancellationToken,
    status_line: impl Fn() -> String,
) {
    let watchdog = super::watchdog_interval();
    let every = watchdog.map_or(STATUS_EVERY, |w| w.min(STATUS_EVERY));
    let mut reported: Option<Stuck> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let now = Instant::now();
        match liveness.stuck_at(now) {
            Some(stuck) => {
                let text = stuck.describe(now);
                let same = reported
                    .as_ref()
                    .is_some_and(|r| r.name == stuck.name && r.since == stuck.since);
                if !same {
                    if watchdog.is_some() {
                        tracing::warn!(
                            "{text}; WATCHDOG=1 withheld, so that the service manager restarts mesync"
                        );
                    } else {
                        tracing::warn!("{text}");
                    }
                }
                let withheld = if watchdog.is_some() {
                    "; WATCHDOG=1 withheld"
                } else {
                    ""
                };
                super::status(&format!("{text}{withheld}"));
                reported = Some(stuck);
            }
            None => {
                if let Some(was) = reported.take() {
                    tracing::info!(name = was.name, "stuck loop is going again");
                }
                let line = status_line();
                match watchdog {
                    Some(_) => super::watchdog(&line),
                    None => super::status(&line),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn busy(heartbeat: &Heartbeat, since: Instant, bound: Duration) {
        heartbeat.set(State::Busy {
            since,
            due: since + bound,
        });
    }

    #[test]
    fn a_loop_past_its_deadline_by_more_than_the_margin_is_stuck() {
        let liveness = Liveness::default();
        let commit = liveness.heartbeat("commit thread");
        let t0 = Instant::now();
        busy(&commit, t0, 60 * SEC);
        assert_eq!(liveness.stuck_at(t0 + 30 * SEC), None, "within its bound");
        assert_eq!(
            liveness.stuck_at(t0 + 60 * SEC + MARGIN),
            None,
            "late by no more than the margin"
        );
        let stuck = liveness.stuck_at(t0 + 60 * SEC + MARGIN + SEC);
        assert_eq!(
            stuck,
            Some(Stuck {
                name: "commit thread",
                since: t0,
                due: t0 + 60 * SEC,
            })
        );
        assert!(
            stuck
                .unwrap()
                .describe(t0 + 66 * SEC)
                .contains("commit thread stuck since"),
        );
    }

    #[test]
    fn an_idle_loop_is_alive_however_long_it_waits() {
        let liveness = Liveness::default();
        let runner = liveness.heartbeat("hook runner");
        let t0 = Instant::now();
        busy(&runner, t0, SEC);
        runner.idle();
        assert_eq!(liveness.stuck_at(t0 + 86_400 * SEC), None);
    }

    #[test]
    fn a_loop_that_comes_back_is_alive_again() {
        let liveness = Liveness::default();
        let inbox = liveness.heartbeat("inbox puller");
        let t0 = Instant::now();
        busy(&inbox, t0, 10 * SEC);
        let late = t0 + 20 * SEC;
        assert!(liveness.stuck_at(late).is_some());
        // Back, and on to its next step with a new deadline.
        busy(&inbox, late, 10 * SEC);
        assert_eq!(liveness.stuck_at(late + SEC), None);
    }

    #[test]
    fn the_most_overdue_of_several_loops_is_named() {
        let liveness = Liveness::default();
        let outbox = liveness.heartbeat("outbox sender");
        let inbox = liveness.heartbeat("inbox puller");
        let _runner = liveness.heartbeat("hook runner");
        let t0 = Instant::now();
        busy(&outbox, t0 + 5 * SEC, SEC);
        busy(&inbox, t0, SEC);
        let stuck = liveness.stuck_at(t0 + 20 * SEC).expect("two are stuck");
        assert_eq!(stuck.name, "inbox puller");
    }

    #[test]
    fn a_loop_that_died_of_a_panic_is_stuck() {
        let liveness = Liveness::default();
        let heartbeat = liveness.heartbeat("outbox sender");
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            heartbeat.idle();
            panic!("a bug");
        }));
        assert!(died.is_err());
        assert!(liveness.stuck_at(Instant::now() + MARGIN + SEC).is_some());
    }

    #[test]
    fn a_loop_that_returned_is_not_stuck() {
        let liveness = Liveness::default();
        let heartbeat = liveness.heartbeat("hook runner");
        heartbeat.idle();
        drop(heartbeat);
        assert_eq!(liveness.stuck_at(Instant::now() + 3600 * SEC), None);
    }
}
