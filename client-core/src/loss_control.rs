//! The loss-based half of congestion control, told apart from loss the path has anyway.
//!
//! webrtc 0.21's GCC backs off whenever more than 10% of packets are lost (draft-ietf-rmcat-gcc
//! §5.5). That is right when our own sending overflows a queue, and wrong on a path that loses
//! packets whatever we send (radio interference, a bad Wi-Fi link): there, backing off loses the
//! same share of fewer packets, the rate falls to the floor and video goes for nothing. Measured
//! in the lab at 20% random loss: 1.5 Mbps to the 80 kbps floor in 10 s, audio-only for the rest
//! of the call.
//!
//! This controller keeps the draft's rule but applies it to the loss *above* the path's inherent
//! loss: the lowest loss seen over the last ten seconds (one-second buckets), provided the rate
//! varied over them by a fifth or more. Loss that our rate causes goes away when the rate drops,
//! so a backed-off second brings the inherent estimate down to it and the rule bites again; loss
//! that stays at every rate is the path's, and only what exceeds it counts. Without the rate
//! varying there is no evidence either way, and all loss counts (otherwise a rate held in the
//! draft's dead band would teach the controller its own congestion as inherent, and it would
//! ratchet up). Inherent loss is capped at 25%: beyond that the path is treated as congested
//! whatever the cause. The delay-based half and the delivery guard (`pacer.rs`) still catch
//! congestion that queues rather than drops.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Excess loss below which the rate may climb.
const LOW_EXCESS: f64 = 0.02;
/// Excess loss above which the rate backs off.
const HIGH_EXCESS: f64 = 0.10;
/// At most one change per this interval (the draft's pace).
const INTERVAL: Duration = Duration::from_millis(200);
/// The loss history is kept in buckets this long...
const BUCKET: Duration = Duration::from_secs(1);
/// ...this many of them...
const BUCKETS: usize = 10;
/// ...and a bucket with fewer packets than this says too little to count.
const BUCKET_MIN_PACKETS: usize = 20;
/// Inherent loss is never taken to be more than this.
const INHERENT_MAX: f64 = 0.25;
/// Loss is learned as inherent only when the highest rate over the buckets is at least this
/// many times the lowest.
const RATE_SPREAD_MIN: f64 = 1.2;

/// See the module docs.
#[derive(Debug)]
pub struct LossControl {
    target: f64,
    min: f64,
    max: f64,
    /// Exponentially weighted loss of the feedback batches.
    average: Option<f64>,
    last_change: Option<Instant>,
    /// The bucket being filled.
    bucket: Option<Bucket>,
    /// (target rate, loss fraction) of the last full buckets, oldest first.
    history: VecDeque<(f64, f64)>,
}

impl LossControl {
    /// A controller starting at `initial` bits per second, held within `min..=max`.
    pub fn new(initial: f64, min: f64, max: f64) -> Self {
        Self {
            target: initial.clamp(min, max),
            min,
            max,
            average: None,
            last_change: None,
            bucket: None,
            history: VecDeque::with_capacity(BUCKETS + 1),
        }
    }

    /// The loss-based target, bits per second.
    pub fn target(&self) -> f64 {
        self.target
    }

    /// The smoothed loss fraction, once feedback has arrived.
    pub fn average_loss(&self) -> Option<f64> {
        self.average
    }

    /// The loss the path has whatever we send: the lowest of the last buckets, at most 25%;
    /// 0 while the rate has not varied enough over them to tell.
    pub fn inherent_loss(&self) -> f64 {
        let rates = self.history.iter().map(|(rate, _)| *rate);
        let (Some(low), Some(high)) = (rates.clone().reduce(f64::min), rates.reduce(f64::max))
        else {
            return 0.0;
        };
        if high < RATE_SPREAD_MIN * low {
            return 0.0;
        }
        self.history
            .iter()
            .map(|(_, loss)| *loss)
            .fold(INHERENT_MAX, f64::min)
    }

    /// Folds in one batch of feedback at `now`: `lost` of `total` packets did not arrive.
    pub fn update(&mut self, now: Instant, lost: usize, total: usize) -> f64 {
        if total == 0 {
            return self.target;
        }
        self.record(now, lost, total);
        let sample = lost as f64 / total as f64;
        let average = self.average.map_or(sample, |a| 0.8 * a + 0.2 * sample);
        self.average = Some(average);
        if self
            .last_change
            .is_some_and(|last| now.saturating_duration_since(last) < INTERVAL)
        {
            return self.target;
        }
        let inherent = self.inherent_loss();
        let excess_average = (average - inherent).max(0.0);
        let excess_sample = (sample - inherent).max(0.0);
        if excess_average.max(excess_sample) < LOW_EXCESS {
            self.target = (self.target * 1.05).clamp(self.min, self.max);
            self.last_change = Some(now);
        } else if excess_average.min(excess_sample) > HIGH_EXCESS {
            self.target = (self.target * (1.0 - 0.5 * excess_average)).clamp(self.min, self.max);
            self.last_change = Some(now);
        }
        self.target
    }

    /// A new path: what was learned about the old one's loss no longer holds.
    pub fn forget_path(&mut self) {
        self.history.clear();
        self.bucket = None;
        self.average = None;
    }

    fn record(&mut self, now: Instant, lost: usize, total: usize) {
        let b = self.bucket.get_or_insert(Bucket::new(now));
        if now.saturating_duration_since(b.started) >= BUCKET {
            if b.total >= BUCKET_MIN_PACKETS {
                let rate = b.rate_sum / b.updates as f64;
                self.history
                    .push_back((rate, b.lost as f64 / b.total as f64));
                if self.history.len() > BUCKETS {
                    self.history.pop_front();
                }
            }
            *b = Bucket::new(now);
        }
        b.lost += lost;
        b.total += total;
        b.rate_sum += self.target;
        b.updates += 1;
    }
}

/// One second of feedback.
#[derive(Debug)]
struct Bucket {
    started: Instant,
    lost: usize,
    total: usize,
    /// Sum of the target over the updates, for its mean.
    rate_sum: f64,
    updates: usize,
}

impl Bucket {
    fn new(started: Instant) -> Self {
        Self {
            started,
            lost: 0,
            total: 0,
            rate_sum: 0.0,
            updates: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: f64 = 80_000.0;
    const MAX: f64 = 2_500_000.0;

    /// Feedback every 100 ms of 50 packets for `secs`, `loss(bitrate)` of them lost.
    fn run(c: &mut LossControl, t: &mut Instant, secs: f64, loss: impl Fn(f64) -> f64) -> f64 {
        for _ in 0..(secs * 10.0) as usize {
            *t += Duration::from_millis(100);
            let lost = (loss(c.target()) * 50.0).round() as usize;
            c.update(*t, lost, 50);
        }
        c.target()
    }

    #[test]
    fn random_loss_the_rate_does_not_cause_does_not_drag_the_rate_down() {
        let mut c = LossControl::new(1_500_000.0, MIN, MAX);
        let mut t = Instant::now();
        // 20% whatever we send: the first second backs off (nothing is known yet), then the
        // loss is learned as the path's and the rate climbs back.
        let after = run(&mut c, &mut t, 20.0, |_| 0.2);
        assert!((c.inherent_loss() - 0.2).abs() < 1e-9);
        assert!(after >= 1_500_000.0, "{after}");
    }

    #[test]
    fn random_loss_keeps_the_rate_when_each_batch_loses_a_different_share() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(7);
        let mut c = LossControl::new(1_500_000.0, MIN, MAX);
        let mut t = Instant::now();
        for second in 0..40 {
            for _ in 0..10 {
                t += Duration::from_millis(100);
                let lost = (0..50).filter(|_| rng.random_bool(0.2)).count();
                c.update(t, lost, 50);
            }
            if second >= 10 {
                assert!(c.target() >= 1_000_000.0, "{second} s: {}", c.target());
            }
        }
    }

    #[test]
    fn loss_the_rate_causes_still_backs_off() {
        let mut c = LossControl::new(1_500_000.0, MIN, MAX);
        let mut t = Instant::now();
        // A shallow queue on a 600 kbps link: above it, the excess is dropped.
        let overflow = |rate: f64| ((rate - 600_000.0) / rate).max(0.0);
        run(&mut c, &mut t, 10.0, overflow);
        // It probes above the link and is pushed back, so it hovers around it, never at the
        // 1.5 Mbps it started from, never at the floor, and it does not ratchet up by learning
        // its own overflow as the path's loss.
        for _ in 0..60 {
            let rate = run(&mut c, &mut t, 1.0, overflow);
            assert!((450_000.0..720_000.0).contains(&rate), "{rate}");
            assert!(c.inherent_loss() < 0.05, "{}", c.inherent_loss());
        }
    }

    #[test]
    fn heavy_loss_is_congestion_whatever_its_cause() {
        let mut c = LossControl::new(1_500_000.0, MIN, MAX);
        let mut t = Instant::now();
        let after = run(&mut c, &mut t, 15.0, |_| 0.5);
        assert!(c.inherent_loss() <= INHERENT_MAX);
        assert_eq!(after, MIN);
    }

    #[test]
    fn a_new_path_forgets_the_old_one_s_loss() {
        let mut c = LossControl::new(1_500_000.0, MIN, MAX);
        let mut t = Instant::now();
        run(&mut c, &mut t, 20.0, |_| 0.2);
        assert!(c.inherent_loss() > 0.15);
        c.forget_path();
        assert_eq!(c.inherent_loss(), 0.0);
        assert_eq!(c.average_loss(), None);
    }

    #[test]
    fn a_clean_path_is_probed_upwards_and_moderate_loss_holds() {
        let mut c = LossControl::new(500_000.0, MIN, MAX);
        let mut t = Instant::now();
        let up = run(&mut c, &mut t, 2.0, |_| 0.0);
        assert!(up > 600_000.0, "{up}");
        // 5% on a path that was clean: between the thresholds, the rate holds.
        let held = run(&mut c, &mut t, 2.0, |_| 0.06);
        assert_eq!(held, up);
    }
}
