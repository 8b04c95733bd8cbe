//! Wall-clock steps, seen by comparing the wall clock with the monotonic clock, so that a
//! clock set forward does not make `sent/` files look older than they are and get purged
//! early. A step backward only makes files look younger: they are purged late, never
//! wrongly, so it needs no correction.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A difference between the two clocks smaller than this is scheduling noise, not a step.
const STEP_THRESHOLD: f64 = 2.0;
/// Steps remembered; older ones matter only for files older than them.
const MAX_STEPS: usize = 64;

/// Seconds since the Unix epoch on the wall clock.
pub fn wall_seconds(at: SystemTime) -> f64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Watches for forward steps of the wall clock during the agent's life.
#[derive(Debug, Clone)]
pub struct ClockWatch {
    last_wall: f64,
    last_mono: Instant,
    /// (wall time just after the step, seconds it jumped forward)
    steps: Vec<(f64, f64)>,
}

impl Default for ClockWatch {
    fn default() -> ClockWatch {
        ClockWatch::new(wall_seconds(SystemTime::now()), Instant::now())
    }
}

impl ClockWatch {
    pub fn new(wall: f64, mono: Instant) -> ClockWatch {
        ClockWatch {
            last_wall: wall,
            last_mono: mono,
            steps: Vec::new(),
        }
    }

    /// Takes a reading of both clocks; notes a forward step if the wall clock ran ahead.
    pub fn observe(&mut self, wall: f64, mono: Instant) {
        let mono_elapsed = mono.duration_since(self.last_mono).as_secs_f64();
        let jump = (wall - self.last_wall) - mono_elapsed;
        if jump > STEP_THRESHOLD {
            tracing::warn!(
                seconds = jump,
                "the wall clock jumped forward; file ages are corrected for it"
            );
            self.steps.push((wall, jump));
            if self.steps.len() > MAX_STEPS {
                self.steps.remove(0);
            }
        } else if jump < -STEP_THRESHOLD {
            tracing::warn!(seconds = -jump, "the wall clock jumped backward");
        }
        self.last_wall = wall;
        self.last_mono = mono;
    }

    /// The age at `now` of something stamped `stamp` by the wall clock, less the forward
    /// steps that happened after it.
    pub fn age(&self, now: f64, stamp: f64) -> Duration {
        let stepped: f64 = self
            .steps
            .iter()
            .filter(|(at, _)| *at > stamp)
            .map(|(_, jump)| jump)
            .sum();
        Duration::from_secs_f64((now - stamp - stepped).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forward_step_does_not_age_older_files() {
        let start = Instant::now();
        let mut watch = ClockWatch::new(1000.0, start);
        // 10 s pass, but the wall clock shows an hour and 10 s.
        watch.observe(1000.0 + 3610.0, start + Duration::from_secs(10));
        let now = 1000.0 + 3610.0;
        // A file stamped before the step is 10 s old, not an hour and 10 s.
        assert_eq!(watch.age(now, 1000.0).as_secs(), 3610 - 3600);
        // A file stamped after the step is aged normally.
        assert_eq!(watch.age(now + 5.0, now).as_secs(), 5);
    }

    #[test]
    fn small_drift_and_backward_steps_change_nothing() {
        let start = Instant::now();
        let mut watch = ClockWatch::new(1000.0, start);
        watch.observe(1001.5, start + Duration::from_secs(1));
        watch.observe(-2000.0, start + Duration::from_secs(2));
        assert_eq!(watch.age(1100.0, 1000.0).as_secs(), 100);
    }
}
