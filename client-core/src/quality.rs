//! The quality ladder: turns the congestion controller's bandwidth estimate into what the video
//! encoder should do: a bitrate inside a rung (resolution and frame rate), a rung down or up,
//! or audio-only when video cannot be carried usefully, and back.
//!
//! Pure and sans-IO: estimates come in with their time; nothing reads the clock. Hysteresis is
//! asymmetric on purpose: stepping down is fast (a congested link hurts audio too), stepping up
//! is slow (a recovering link is probed, not trusted).
//!
//! The video budget is `0.85 x estimate - audio`: with GCC the pacer caps all RTP at the
//! estimate (audio too, so video must leave it room), and audio is protected first.

use std::time::{Duration, Instant};

/// One step of the ladder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rung {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// Below this budget the rung is not usable.
    pub min_kbps: u32,
    /// The most bitrate this rung uses.
    pub max_kbps: u32,
}

/// From best to worst. Below the last rung's `min_kbps`, the call goes audio-only.
pub const LADDER: &[Rung] = &[
    Rung {
        width: 1280,
        height: 720,
        fps: 30,
        min_kbps: 900,
        max_kbps: 1800,
    },
    Rung {
        width: 960,
        height: 540,
        fps: 30,
        min_kbps: 550,
        max_kbps: 1000,
    },
    Rung {
        width: 640,
        height: 360,
        fps: 30,
        min_kbps: 300,
        max_kbps: 600,
    },
    Rung {
        width: 640,
        height: 360,
        fps: 15,
        min_kbps: 180,
        max_kbps: 350,
    },
    Rung {
        width: 320,
        height: 180,
        fps: 15,
        min_kbps: 80,
        max_kbps: 200,
    },
];

/// What the encoder should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VideoTarget {
    Video {
        rung: usize,
        bitrate_kbps: u32,
    },
    /// The estimate cannot carry usable video: send audio only.
    AudioOnly,
}

#[derive(Clone, Debug)]
pub struct QualityConfig {
    /// Bitrate reserved for audio (Opus with FEC), kbps.
    pub audio_kbps: u32,
    /// Share of the estimate the call may use.
    pub headroom: f64,
    /// How long the budget must stay below a rung before stepping down.
    pub down_after: Duration,
    /// How long the budget must stay above the next rung (with margin) before stepping up.
    pub up_after: Duration,
    /// How long the budget must stay below the last rung before going audio-only.
    pub audio_only_after: Duration,
    /// How long the budget must allow the last rung (with margin) before video comes back.
    pub video_back_after: Duration,
    /// Stepping up needs this much more than the next rung's minimum.
    pub up_margin: f64,
    /// Audio-only because of the network, video is tried again (a probe) after this, then
    /// after twice as long each time a probe fails, up to `max_probe_interval`.
    pub probe_after: Duration,
    pub max_probe_interval: Duration,
    /// How long a probe sends the last rung before it is judged.
    pub probe_window: Duration,
}

impl Default for QualityConfig {
    fn default() -> Self {
        QualityConfig {
            audio_kbps: 40,
            headroom: 0.85,
            down_after: Duration::from_millis(500),
            up_after: Duration::from_secs(4),
            audio_only_after: Duration::from_millis(1000),
            video_back_after: Duration::from_secs(3),
            up_margin: 1.25,
            probe_after: Duration::from_secs(3),
            max_probe_interval: Duration::from_secs(30),
            probe_window: Duration::from_secs(6),
        }
    }
}

/// Follows the estimate down and up the [`LADDER`].
#[derive(Debug)]
pub struct QualityController {
    config: QualityConfig,
    /// The best rung allowed (what the camera or the configuration gives).
    top: usize,
    target: VideoTarget,
    /// Since when the budget has been pointing down (or up).
    down_since: Option<Instant>,
    up_since: Option<Instant>,
    /// Since when the budget has been too small for even the last rung.
    starved_since: Option<Instant>,
    probe: Probe,
    /// How long the next audio-only spell waits before its first probe: doubled by every
    /// failed probe and every fall back to audio-only, reset once video has held for
    /// `max_probe_interval` (so a flapping link does not flap video).
    probe_interval: Duration,
    /// Since when video has been on without a fall back to audio-only.
    video_since: Option<Instant>,
}

/// Trying video again while audio-only. Without video on the wire the estimate has little to
/// go on (a few audio packets a report, where one loss reads as 20%), so waiting for it to
/// recover by itself can wait forever; the probe puts the last rung on the wire and lets the
/// estimate follow what the link really carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    Idle,
    /// The next probe starts at `at`; a failure doubles `interval`.
    Waiting {
        at: Instant,
        interval: Duration,
    },
    /// Video is on the last rung until `until`, whatever the estimate says meanwhile.
    Running {
        until: Instant,
        interval: Duration,
    },
}

impl QualityController {
    /// Starts at, and never climbs above, `rung` (0 is the best).
    pub fn new(config: QualityConfig, rung: usize) -> Self {
        let rung = rung.min(LADDER.len() - 1);
        QualityController {
            top: rung,
            target: VideoTarget::Video {
                rung,
                bitrate_kbps: LADDER[rung].max_kbps,
            },
            down_since: None,
            up_since: None,
            starved_since: None,
            probe: Probe::Idle,
            probe_interval: config.probe_after,
            video_since: None,
            config,
        }
    }

    pub fn target(&self) -> VideoTarget {
        self.target
    }

    /// The best rung a `width` x `height` source can fill.
    pub fn top_rung_for(width: u32, height: u32) -> usize {
        LADDER
            .iter()
            .position(|r| r.width <= width && r.height <= height)
            .unwrap_or(LADDER.len() - 1)
    }

    /// The video budget an estimate leaves, kbps.
    pub fn budget(&self, estimate_kbps: u32) -> u32 {
        ((estimate_kbps as f64 * self.config.headroom) as u32)
            .saturating_sub(self.config.audio_kbps)
    }

    /// A new bandwidth estimate. Returns the new target when it changed.
    pub fn handle_estimate(&mut self, now: Instant, estimate_kbps: u32) -> Option<VideoTarget> {
        let budget = self.budget(estimate_kbps);
        let last = LADDER.len() - 1;
        // Starvation is timed from when it began, whatever rungs were passed on the way down.
        let starved = if budget < LADDER[last].min_kbps {
            held(&mut self.starved_since, now, self.config.audio_only_after)
        } else {
            self.starved_since = None;
            false
        };
        let probe_video = VideoTarget::Video {
            rung: last,
            bitrate_kbps: LADDER[last].min_kbps,
        };
        let next = match (self.target, self.probe) {
            (VideoTarget::Video { .. }, Probe::Running { until, interval }) => {
                if budget >= LADDER[last].min_kbps {
                    // The link carries video again: the probe worked.
                    self.probe = Probe::Idle;
                    self.starved_since = None;
                    VideoTarget::Video {
                        rung: last,
                        bitrate_kbps: budget.min(LADDER[last].max_kbps),
                    }
                } else if now >= until {
                    let interval = (interval * 2).min(self.config.max_probe_interval);
                    self.probe_interval = interval;
                    self.probe = Probe::Waiting {
                        at: now + interval,
                        interval,
                    };
                    VideoTarget::AudioOnly
                } else {
                    self.starved_since = None;
                    probe_video
                }
            }
            (VideoTarget::Video { .. }, _) if starved => {
                let interval = self.probe_interval;
                self.probe = Probe::Waiting {
                    at: now + interval,
                    interval,
                };
                self.probe_interval = (interval * 2).min(self.config.max_probe_interval);
                VideoTarget::AudioOnly
            }
            (VideoTarget::AudioOnly, probe) => {
                let back = (LADDER[last].min_kbps as f64 * self.config.up_margin) as u32;
                if budget >= back && held(&mut self.up_since, now, self.config.video_back_after) {
                    self.probe = Probe::Idle;
                    VideoTarget::Video {
                        rung: last,
                        bitrate_kbps: budget.min(LADDER[last].max_kbps),
                    }
                } else {
                    if budget < back {
                        self.up_since = None;
                    }
                    match probe {
                        Probe::Waiting { at, interval } if now >= at => {
                            self.probe = Probe::Running {
                                until: now + self.config.probe_window,
                                interval,
                            };
                            probe_video
                        }
                        _ => VideoTarget::AudioOnly,
                    }
                }
            }
            (VideoTarget::Video { rung, .. }, _) => {
                let cur = LADDER[rung];
                if budget < cur.min_kbps {
                    self.up_since = None;
                    if rung < last && held(&mut self.down_since, now, self.config.down_after) {
                        // Skip straight to the rung the budget fits (a collapse is not walked
                        // down one step per interval).
                        match (rung..LADDER.len()).find(|&r| budget >= LADDER[r].min_kbps) {
                            Some(r) => VideoTarget::Video {
                                rung: r,
                                bitrate_kbps: budget.min(LADDER[r].max_kbps),
                            },
                            None => VideoTarget::Video {
                                rung: last,
                                bitrate_kbps: budget.max(1).min(LADDER[last].max_kbps),
                            },
                        }
                    } else {
                        // Meanwhile, squeeze the bitrate inside the rung.
                        VideoTarget::Video {
                            rung,
                            bitrate_kbps: budget.max(cur.min_kbps / 2),
                        }
                    }
                } else {
                    self.down_since = None;
                    let up = rung.checked_sub(1).filter(|&r| {
                        r >= self.top
                            && budget as f64 >= LADDER[r].min_kbps as f64 * self.config.up_margin
                    });
                    match up {
                        Some(r) if held(&mut self.up_since, now, self.config.up_after) => {
                            VideoTarget::Video {
                                rung: r,
                                bitrate_kbps: budget.min(LADDER[r].max_kbps),
                            }
                        }
                        Some(_) => VideoTarget::Video {
                            rung,
                            bitrate_kbps: budget.min(cur.max_kbps),
                        },
                        None => {
                            self.up_since = None;
                            VideoTarget::Video {
                                rung,
                                bitrate_kbps: budget.min(cur.max_kbps),
                            }
                        }
                    }
                }
            }
        };
        if rung_of(next) != rung_of(self.target) {
            self.down_since = None;
            self.up_since = None;
        }
        match next {
            VideoTarget::AudioOnly => self.video_since = None,
            VideoTarget::Video { .. } => {
                if held(&mut self.video_since, now, self.config.max_probe_interval) {
                    self.probe_interval = self.config.probe_after;
                }
            }
        }
        // Bitrate wiggles under 10% inside a rung are not worth retuning the encoder for.
        let changed = match (next, self.target) {
            (
                VideoTarget::Video {
                    rung: a,
                    bitrate_kbps: x,
                },
                VideoTarget::Video {
                    rung: b,
                    bitrate_kbps: y,
                },
            ) => a != b || x.abs_diff(y) * 10 > y,
            (a, b) => a != b,
        };
        if changed {
            self.target = next;
        }
        changed.then_some(next)
    }
}

fn rung_of(t: VideoTarget) -> Option<usize> {
    match t {
        VideoTarget::Video { rung, .. } => Some(rung),
        VideoTarget::AudioOnly => None,
    }
}

/// Whether a condition that started at `*since` (or now) has held for `wait`.
fn held(since: &mut Option<Instant>, now: Instant, wait: Duration) -> bool {
    let start = *since.get_or_insert(now);
    now.duration_since(start) >= wait
}

pub use crate::congestion::AudioRedundancy;

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds one estimate every 100 ms for `d`, as `estimate` gives it for the current target;
    /// returns the targets it changed to, and when.
    fn feed_with(
        q: &mut QualityController,
        t: &mut Instant,
        d: Duration,
        estimate: impl Fn(VideoTarget) -> u32,
    ) -> Vec<(Duration, VideoTarget)> {
        let start = *t;
        let mut changes = Vec::new();
        while *t < start + d {
            *t += Duration::from_millis(100);
            let kbps = estimate(q.target());
            if let Some(target) = q.handle_estimate(*t, kbps) {
                changes.push((t.duration_since(start), target));
            }
        }
        changes
    }

    /// A steady estimate of `kbps` for `d`.
    fn feed(
        q: &mut QualityController,
        t: &mut Instant,
        kbps: u32,
        d: Duration,
    ) -> Vec<(Duration, VideoTarget)> {
        feed_with(q, t, d, |_| kbps)
    }

    #[test]
    fn a_good_link_keeps_720p_at_full_rate() {
        let mut q = QualityController::new(QualityConfig::default(), 0);
        let mut t = Instant::now();
        feed(&mut q, &mut t, 3000, Duration::from_secs(10));
        assert_eq!(
            q.target(),
            VideoTarget::Video {
                rung: 0,
                bitrate_kbps: 1800
            }
        );
    }

    #[test]
    fn a_collapse_to_100_kbps_goes_audio_only_within_two_seconds() {
        let mut q = QualityController::new(QualityConfig::default(), 0);
        let mut t = Instant::now();
        feed(&mut q, &mut t, 3000, Duration::from_secs(2));
        let changes = feed(&mut q, &mut t, 100, Duration::from_secs(5));
        let audio_only = changes
            .iter()
            .find(|(_, target)| *target == VideoTarget::AudioOnly)
            .expect("went audio-only");
        assert!(audio_only.0 <= Duration::from_secs(2), "{changes:?}");
        // It went through the last rung on the way, not straight from 720p.
        assert!(
            changes
                .iter()
                .any(|(_, t)| matches!(t, VideoTarget::Video { rung: 4, .. }))
        );
    }

    #[test]
    fn video_comes_back_within_ten_seconds_of_recovery_and_climbs_slowly() {
        let mut q = QualityController::new(QualityConfig::default(), 0);
        let mut t = Instant::now();
        feed(&mut q, &mut t, 100, Duration::from_secs(3));
        assert_eq!(q.target(), VideoTarget::AudioOnly);
        let changes = feed(&mut q, &mut t, 2000, Duration::from_secs(30));
        let back = changes
            .iter()
            .find(|(_, t)| matches!(t, VideoTarget::Video { .. }))
            .expect("video came back");
        assert!(back.0 <= Duration::from_secs(10), "{changes:?}");
        // Each step up waited its turn: no two rung changes closer than `up_after`.
        let rung_changes: Vec<(Duration, usize)> = changes
            .iter()
            .filter_map(|(at, t)| rung_of(*t).map(|r| (*at, r)))
            .fold(Vec::new(), |mut v: Vec<(Duration, usize)>, (at, r)| {
                if v.last().is_none_or(|(_, last)| *last != r) {
                    v.push((at, r));
                }
                v
            });
        for w in rung_changes.windows(2) {
            assert!(
                w[1].0 - w[0].0 >= Duration::from_secs(4),
                "{rung_changes:?}"
            );
        }
        assert_eq!(
            rung_of(q.target()),
            Some(0),
            "back at 720p after 30 s of 2 Mbps"
        );
    }

    #[test]
    fn brief_dips_do_not_change_the_rung() {
        let mut q = QualityController::new(QualityConfig::default(), 0);
        let mut t = Instant::now();
        for _ in 0..20 {
            feed(&mut q, &mut t, 3000, Duration::from_millis(900));
            // 300 ms dips: shorter than `down_after`.
            feed(&mut q, &mut t, 700, Duration::from_millis(300));
        }
        assert_eq!(rung_of(q.target()), Some(0));
    }

    #[test]
    fn a_flapping_link_does_not_flap_video() {
        let mut q = QualityController::new(QualityConfig::default(), 4);
        let mut t = Instant::now();
        feed(&mut q, &mut t, 50, Duration::from_secs(3));
        assert_eq!(q.target(), VideoTarget::AudioOnly);
        // Good for 2 s, bad for 1 s, over and over: video may be tried, but the call does not
        // go back and forth between video and audio-only.
        let mut changes = Vec::new();
        for _ in 0..10 {
            changes.extend(feed(&mut q, &mut t, 2000, Duration::from_secs(2)));
            changes.extend(feed(&mut q, &mut t, 50, Duration::from_secs(1)));
        }
        let switches = changes
            .windows(2)
            .filter(|w| rung_of(w[0].1).is_some() != rung_of(w[1].1).is_some())
            .count();
        assert!(switches <= 2, "{changes:?}");
    }

    /// Feeds what a link of `link_kbps` lets the estimate say: while audio-only, only audio is
    /// on the wire and the estimate stays at `idle_kbps` whatever the link could carry.
    fn feed_link(
        q: &mut QualityController,
        t: &mut Instant,
        link_kbps: u32,
        idle_kbps: u32,
        d: Duration,
    ) -> Vec<(Duration, VideoTarget)> {
        feed_with(q, t, d, |target| match target {
            VideoTarget::AudioOnly => idle_kbps,
            VideoTarget::Video { .. } => link_kbps,
        })
    }

    #[test]
    fn a_probe_brings_video_back_when_audio_alone_cannot_show_the_recovery() {
        let mut q = QualityController::new(QualityConfig::default(), 0);
        let mut t = Instant::now();
        feed(&mut q, &mut t, 100, Duration::from_secs(3));
        assert_eq!(q.target(), VideoTarget::AudioOnly);
        // The link is back, but with audio alone the estimate stays at its floor.
        let changes = feed_link(&mut q, &mut t, 2000, 80, Duration::from_secs(20));
        let back = changes
            .iter()
            .find(|(_, t)| rung_of(*t).is_some())
            .expect("a probe started");
        assert!(back.0 <= Duration::from_secs(4), "{changes:?}");
        // The probe held: video stayed and climbed.
        assert!(
            rung_of(q.target()).is_some_and(|r| r < LADDER.len() - 1),
            "{changes:?}"
        );
    }

    #[test]
    fn a_long_collapse_is_probed_less_and_less_often() {
        let mut q = QualityController::new(QualityConfig::default(), 0);
        let mut t = Instant::now();
        let changes = feed_link(&mut q, &mut t, 100, 80, Duration::from_secs(120));
        let probes: Vec<Duration> = changes
            .windows(2)
            .filter(|w| w[0].1 == VideoTarget::AudioOnly && rung_of(w[1].1).is_some())
            .map(|w| w[1].0)
            .collect();
        // Every probe failed (the link cannot carry video) and the gaps between them grew, up
        // to the cap.
        assert!((3..=8).contains(&probes.len()), "{probes:?}");
        for w in probes.windows(3) {
            assert!(w[2] - w[1] >= w[1] - w[0], "{probes:?}");
        }
        assert_eq!(q.target(), VideoTarget::AudioOnly);
    }

    #[test]
    fn the_ladder_never_climbs_above_the_source() {
        let top = QualityController::top_rung_for(640, 360);
        assert_eq!(LADDER[top].height, 360);
        let mut q = QualityController::new(QualityConfig::default(), top);
        let mut t = Instant::now();
        feed(&mut q, &mut t, 5000, Duration::from_secs(30));
        assert_eq!(rung_of(q.target()), Some(top));
        assert_eq!(QualityController::top_rung_for(100, 100), LADDER.len() - 1);
    }

    #[test]
    fn small_bitrate_wiggles_do_not_retune_the_encoder() {
        let mut q = QualityController::new(QualityConfig::default(), 2);
        let mut t = Instant::now();
        feed(&mut q, &mut t, 800, Duration::from_secs(1));
        let changes = feed(&mut q, &mut t, 790, Duration::from_secs(1));
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn the_budget_leaves_room_for_audio() {
        let q = QualityController::new(QualityConfig::default(), 0);
        assert_eq!(q.budget(1000), 810);
        assert_eq!(q.budget(10), 0);
    }
}
