//! Call quality as a doctor would judge it, from one [`StatsReport`]: good, fair or poor.
//!
//! Defined once and shared: the desktop's quality light, the server's dashboard and its "calls
//! poor" alert all call [`score`], so an operator sees the same verdict as the doctor. The
//! thresholds follow what is audible and visible in a consultation: above 5% loss or a 400 ms
//! round trip speech breaks up and turns overlap (poor); above 1% loss, a 200 ms round trip, or
//! video under 10 frames per second the call is usable but visibly worse (fair).

use serde::{Deserialize, Serialize};

use crate::StatsReport;

/// Above this loss (percent, either way we know of) a call is poor.
pub const POOR_LOSS_PCT: f64 = 5.0;
/// Above this round-trip time (ms) a call is poor.
pub const POOR_RTT_MS: f64 = 400.0;
/// Above this loss (percent) a call is at best fair.
pub const FAIR_LOSS_PCT: f64 = 1.0;
/// Above this round-trip time (ms) a call is at best fair.
pub const FAIR_RTT_MS: f64 = 200.0;
/// Received video under this frame rate makes a (not audio-only) call at best fair.
pub const FAIR_MIN_FPS: f64 = 10.0;

/// The verdict, worst last (so `max` of several is the worst).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    Good,
    Fair,
    Poor,
}

impl Quality {
    /// The name shown and sent: `good`, `fair`, `poor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Good => "good",
            Quality::Fair => "fair",
            Quality::Poor => "poor",
        }
    }
}

/// Whether the network under this sample is poor: loss on the way to us above
/// [`POOR_LOSS_PCT`], or a round trip above [`POOR_RTT_MS`].
pub fn network_poor(s: &StatsReport) -> bool {
    s.loss_in_pct.is_some_and(|l| l > POOR_LOSS_PCT) || s.rtt_ms.is_some_and(|r| r > POOR_RTT_MS)
}

/// The score of one sample. `audio_only` says whether the call is audio-only now (then a
/// halting or absent picture does not count against it).
pub fn score(s: &StatsReport, audio_only: bool) -> Quality {
    if network_poor(s) {
        return Quality::Poor;
    }
    let fair = s.loss_in_pct.is_some_and(|l| l > FAIR_LOSS_PCT)
        || s.rtt_ms.is_some_and(|r| r > FAIR_RTT_MS)
        || (!audio_only
            && s.video_received
                .as_ref()
                .is_some_and(|v| v.fps < FAIR_MIN_FPS));
    if fair { Quality::Fair } else { Quality::Good }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VideoStats;

    fn sample(rtt: f64, loss: f64, fps: f64) -> StatsReport {
        StatsReport {
            rtt_ms: Some(rtt),
            loss_in_pct: Some(loss),
            video_received: Some(VideoStats {
                fps,
                ..VideoStats::default()
            }),
            ..StatsReport::default()
        }
    }

    #[test]
    fn thresholds() {
        assert_eq!(score(&sample(20.0, 0.0, 30.0), false), Quality::Good);
        assert_eq!(score(&sample(250.0, 0.0, 30.0), false), Quality::Fair);
        assert_eq!(score(&sample(20.0, 2.0, 30.0), false), Quality::Fair);
        assert_eq!(score(&sample(20.0, 0.0, 5.0), false), Quality::Fair);
        assert_eq!(score(&sample(20.0, 0.0, 5.0), true), Quality::Good);
        assert_eq!(score(&sample(450.0, 0.0, 30.0), true), Quality::Poor);
        assert_eq!(score(&sample(20.0, 6.0, 30.0), false), Quality::Poor);
        assert_eq!(score(&StatsReport::default(), false), Quality::Good);
        assert!(Quality::Poor > Quality::Fair && Quality::Fair > Quality::Good);
    }
}
