//! Reconnection backoff with full jitter (the policy of LiveKit's `reconnect_strategy.rs`, with
//! the random source taken as an argument so tests are deterministic).

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter: attempt `n` waits a uniformly random time in
/// `[0, min(cap, base * 2^n)]`. The first attempt (`n = 0`) after a loss waits at most `base`,
/// so a brief blip costs almost nothing, while a server outage does not see every client retry
/// in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The upper bound of the wait before attempt `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before attempt `attempt`, drawn from `rng`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt).as_micros() as u64;
        Duration::from_micros(rng.random_range(0..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let b = Backoff::default();
        let ceilings: Vec<u128> = (0..8).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(b.ceiling(u32::MAX), b.cap);
    }

    #[test]
    fn delays_stay_under_the_ceiling_and_spread_out() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(1);
        for attempt in 0..10 {
            let samples: Vec<Duration> = (0..200).map(|_| b.delay(attempt, &mut rng)).collect();
            assert!(samples.iter().all(|d| *d <= b.ceiling(attempt)));
            let min = samples.iter().min().unwrap();
            let max = samples.iter().max().unwrap();
            // Full jitter: the spread covers most of [0, ceiling].
            assert!(*max - *min > b.ceiling(attempt) / 2, "attempt {attempt}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let b = Backoff::default();
        let a: Vec<_> = {
            let mut rng = StdRng::seed_from_u64(9);
            (0..5).map(|n| b.delay(n, &mut rng)).collect()
        };
        let c: Vec<_> = {
            let mut rng = StdRng::seed_from_u64(9);
            (0..5).map(|n| b.delay(n, &mut rng)).collect()
        };
        assert_eq!(a, c);
    }
}
