//! Capped exponential backoff with jitter, for retrying the hub and hooks.

use std::time::Duration;

/// Delays that double from `min` up to `max`, each shifted by up to ±20 % so that many
/// agents cut off together do not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The delay before the next try; the one after is twice as long, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = 0.8 + 0.4 * fastrand::f64();
        base.mul_f64(jitter).min(self.max)
    }

    /// After a success, start again from `min`.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(400) && delays[0] <= Duration::from_millis(600));
        assert!(
            delays[1] >= Duration::from_millis(800) && delays[1] <= Duration::from_millis(1200)
        );
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(30)));
        assert!(delays[9] >= Duration::from_secs(24));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(600));
    }
}
