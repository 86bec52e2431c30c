//! Call statistics: what a peer connection's WebRTC stats say, turned into the once-a-second
//! [`StatsReport`] the UI shows and the server receives as telemetry.
//!
//! Two steps: [`RawStats::from_report`] reads the counters out of a `webrtc` stats report (the
//! only part that knows that crate), and [`StatsTracker::sample`] turns two successive readings
//! into rates and percentages (pure, time passed in, unit-tested). webrtc 0.21 does not wire its
//! sender-side figures from receiver reports (remote RTT, fraction and packets lost at the far
//! end, outbound target bitrate: all read 0, as measured here), so inbound loss is measured on the
//! receiving side, outbound loss comes from the peer's reception reports as the engine reads
//! them ([`SentLoss`]), and inbound jitter comes in RTP clock units.

use std::time::Instant;

use bedside_protocol::{CandidatePairType, StatsReport, TransportProtocol, VideoStats};

use crate::engine::SentLoss;
use rtc::peer_connection::transport::RTCIceServerTransportProtocol;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use webrtc::peer_connection::{RTCIceCandidateType, RTCStatsReport, RTCStatsReportEntry};

/// Counters read from one stats report.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RawStats {
    /// Current round-trip time of the nominated candidate pair, seconds.
    pub rtt_secs: Option<f64>,
    pub candidate_pair: Option<CandidatePairType>,
    /// How the selected pair carries media (for a relay pair: how we reach the relay).
    pub transport: Option<TransportProtocol>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub audio_packets_received: u64,
    pub audio_packets_lost: i64,
    /// Interarrival jitter of received audio, in RTP clock units (48 kHz).
    pub audio_jitter: f64,
    pub video_packets_received: u64,
    pub video_packets_lost: i64,
    pub video_bytes_received: u64,
    pub nacks_sent: u64,
    pub plis_sent: u64,
    /// From the media pipeline, which decodes: frames decoded so far, their size, and the
    /// audio playout buffer.
    pub frames_decoded: u64,
    pub frame_width: u32,
    pub frame_height: u32,
    pub audio_buffer_ms: Option<u32>,
    /// What the peer's reception reports say about what we send it.
    pub sent: SentLoss,
}

/// The transport of a local candidate: its own protocol, or for a relay candidate the protocol
/// to the relay. webrtc 0.21's TURN client speaks only UDP, so a relay over TCP or TLS is one
/// of the engine's shims ([`crate::turn_tcp`]): the candidate's TURN URL then names the shim's
/// local address, which `stream_relays` maps to TCP or TLS.
pub fn candidate_transport(
    candidate_type: RTCIceCandidateType,
    protocol: &str,
    relay_protocol: RTCIceServerTransportProtocol,
    url: &str,
    stream_relays: &[(std::net::SocketAddr, TransportProtocol)],
) -> Option<TransportProtocol> {
    if candidate_type == RTCIceCandidateType::Relay {
        let shim = stream_relays
            .iter()
            .find(|(addr, _)| url_names(url, addr))
            .map(|(_, t)| *t);
        return shim.or(match relay_protocol {
            RTCIceServerTransportProtocol::Tcp => Some(TransportProtocol::Tcp),
            RTCIceServerTransportProtocol::Tls => Some(TransportProtocol::Tls),
            // The crate's TURN client reaches its server over UDP only.
            _ => Some(TransportProtocol::Udp),
        });
    }
    match protocol.to_ascii_lowercase().as_str() {
        "udp" => Some(TransportProtocol::Udp),
        "tcp" => Some(TransportProtocol::Tcp),
        "" => None,
        _ => Some(TransportProtocol::Other),
    }
}

/// Whether a TURN URL (`turn:host:port?...`) names `addr`.
fn url_names(url: &str, addr: &std::net::SocketAddr) -> bool {
    let rest = url.split_once(':').map_or("", |(_, r)| r);
    let hostport = rest.split('?').next().unwrap_or("");
    hostport == addr.to_string()
}

impl RawStats {
    /// The counters of `report`; `stream_relays` are the peer's TURN-over-TCP/TLS shims (their
    /// local addresses and what they carry over).
    pub fn from_report(
        report: &RTCStatsReport,
        stream_relays: &[(std::net::SocketAddr, TransportProtocol)],
    ) -> Self {
        let mut raw = RawStats::default();
        let pairs: Vec<_> = report.candidate_pairs().collect();
        let selected = report
            .transport()
            .map(|t| t.selected_candidate_pair_id.as_str());
        let pair = pick_pair(
            &pairs
                .iter()
                .map(|p| (p.stats.id.as_str(), p.nominated, p.bytes_received))
                .collect::<Vec<_>>(),
            selected,
        )
        .map(|i| pairs[i]);
        if let Some(pair) = pair {
            if pair.current_round_trip_time > 0.0 {
                raw.rtt_secs = Some(pair.current_round_trip_time);
            }
            raw.bytes_sent = pair.bytes_sent;
            raw.bytes_received = pair.bytes_received;
            // webrtc 0.21 names the pair's candidates `candidate:X` but files the entries under
            // `RTCLocalIceCandidate_candidate:X` (and `RTCRemoteIceCandidate_...`): accept either.
            let of = |id: &str, local: bool| {
                report.iter().find_map(|entry| {
                    match entry {
                        RTCStatsReportEntry::LocalCandidate(c) if local => Some(c),
                        RTCStatsReportEntry::RemoteCandidate(c) if !local => Some(c),
                        _ => None,
                    }
                    .filter(|_| entry.id() == id || entry.id().strip_suffix(id).is_some())
                })
            };
            let local = of(pair.local_candidate_id.as_str(), true);
            raw.candidate_pair = pair_type(
                local.map(|c| c.candidate_type),
                of(pair.remote_candidate_id.as_str(), false).map(|c| c.candidate_type),
            );
            if let Some(c) = local {
                raw.transport = candidate_transport(
                    c.candidate_type,
                    &c.protocol,
                    c.relay_protocol,
                    &c.url,
                    stream_relays,
                );
            }
        }
        for inbound in report.inbound_rtp_streams() {
            let received = &inbound.received_rtp_stream_stats;
            match received.rtp_stream_stats.kind {
                RtpCodecKind::Audio => {
                    raw.audio_packets_received += received.packets_received;
                    raw.audio_packets_lost += received.packets_lost;
                    raw.audio_jitter = raw.audio_jitter.max(received.jitter);
                }
                _ => {
                    raw.video_packets_received += received.packets_received;
                    raw.video_packets_lost += received.packets_lost;
                    raw.video_bytes_received += inbound.bytes_received;
                }
            }
            raw.nacks_sent += u64::from(inbound.nack_count);
            raw.plis_sent += u64::from(inbound.pli_count);
        }
        raw
    }
}

/// Turns successive [`RawStats`] into a [`StatsReport`].
#[derive(Debug, Default)]
pub struct StatsTracker {
    prev: Option<(Instant, RawStats)>,
}

fn loss_pct(received: u64, lost: i64) -> Option<f64> {
    let lost = lost.max(0) as f64;
    let total = received as f64 + lost;
    (total > 0.0).then(|| 100.0 * lost / total)
}

/// Loss on what we send between two readings of the peer's reception reports, over the streams
/// reported in both (RFC 3550 A.3: expected = growth of the extended highest sequence number).
fn sent_loss_pct(before: &SentLoss, after: &SentLoss) -> Option<f64> {
    let (mut expected, mut lost) = (0u64, 0i64);
    for (b, a) in [(before.audio, after.audio), (before.video, after.video)] {
        if let (Some(b), Some(a)) = (b, a) {
            let e = a.highest_sequence.saturating_sub(b.highest_sequence);
            expected += e;
            lost += (a.packets_lost - b.packets_lost).clamp(0, e as i64);
        }
    }
    (expected > 0).then(|| 100.0 * lost as f64 / expected as f64)
}

impl StatsTracker {
    /// The report for the interval since the previous sample (totals on the first).
    pub fn sample(&mut self, now: Instant, raw: RawStats) -> StatsReport {
        let (dt, base) = match self.prev {
            Some((at, prev)) => (now.duration_since(at).as_secs_f64(), prev),
            None => (0.0, RawStats::default()),
        };
        self.prev = Some((now, raw));
        let received = (raw.audio_packets_received + raw.video_packets_received)
            .saturating_sub(base.audio_packets_received + base.video_packets_received);
        let lost = (raw.audio_packets_lost + raw.video_packets_lost)
            - (base.audio_packets_lost + base.video_packets_lost);
        let loss_out_pct = sent_loss_pct(&base.sent, &raw.sent);
        let rate = |bytes: u64, base: u64| {
            (dt > 0.0).then(|| bytes.saturating_sub(base) as f64 * 8.0 / dt / 1000.0)
        };
        StatsReport {
            rtt_ms: raw.rtt_secs.map(|s| s * 1000.0),
            loss_in_pct: loss_pct(received, lost),
            loss_out_pct,
            audio_jitter_ms: (raw.audio_packets_received > 0)
                .then(|| raw.audio_jitter / 48_000.0 * 1000.0),
            candidate_pair: raw.candidate_pair,
            transport: raw.transport,
            video_received: rate(raw.video_bytes_received, base.video_bytes_received).map(|kbps| {
                VideoStats {
                    bitrate_kbps: kbps,
                    width: raw.frame_width,
                    height: raw.frame_height,
                    fps: raw.frames_decoded.saturating_sub(base.frames_decoded) as f64 / dt,
                }
            }),
            audio_buffer_ms: raw.audio_buffer_ms.map(f64::from),
            ..Default::default()
        }
    }
}

/// A pair's type as the call reports it: `relay` when either end is a relay candidate (media
/// goes through a TURN server, ours or the peer's), else the local candidate's type.
fn pair_type(
    local: Option<RTCIceCandidateType>,
    remote: Option<RTCIceCandidateType>,
) -> Option<CandidatePairType> {
    if remote == Some(RTCIceCandidateType::Relay) {
        return Some(CandidatePairType::Relay);
    }
    match local? {
        RTCIceCandidateType::Host => Some(CandidatePairType::Host),
        RTCIceCandidateType::Srflx => Some(CandidatePairType::Srflx),
        RTCIceCandidateType::Prflx => Some(CandidatePairType::Prflx),
        RTCIceCandidateType::Relay => Some(CandidatePairType::Relay),
        _ => None,
    }
}

/// Which of the candidate pairs `(stats id, nominated, bytes received)` media goes on: the one
/// the transport names as selected; else a nominated one; else the busiest. webrtc 0.21 marks
/// every pair it ever selected `nominated` and never clears it, so after a renomination (or a
/// switch of the path) two pairs read nominated and only the transport's
/// `selected_candidate_pair_id` says which is in use (measured here: a call moved from the relay
/// to a direct pair kept reporting `relay`).
fn pick_pair(pairs: &[(&str, bool, u64)], selected: Option<&str>) -> Option<usize> {
    let by_id = selected
        .filter(|id| !id.is_empty())
        .and_then(|id| pairs.iter().position(|p| p.0 == id));
    by_id
        .or_else(|| pairs.iter().position(|p| p.1))
        .or_else(|| (0..pairs.len()).max_by_key(|&i| pairs[i].2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_pair_in_use_is_the_one_the_transport_selected() {
        // Both pairs were selected once (the relay first, then the direct one).
        let pairs = [("relay-pair", true, 9_000), ("direct-pair", true, 1_000)];
        assert_eq!(pick_pair(&pairs, Some("direct-pair")), Some(1));
        assert_eq!(pick_pair(&pairs, Some("relay-pair")), Some(0));
        // Without a selection: a nominated pair, else the busiest.
        assert_eq!(pick_pair(&pairs, Some("")), Some(0));
        let none = [("a", false, 10), ("b", false, 20)];
        assert_eq!(pick_pair(&none, None), Some(1));
        assert_eq!(pick_pair(&[], None), None);
    }

    #[test]
    fn a_pair_with_a_relay_at_either_end_is_relayed() {
        use RTCIceCandidateType::{Host, Prflx, Relay};
        assert_eq!(
            pair_type(Some(Host), Some(Relay)),
            Some(CandidatePairType::Relay)
        );
        assert_eq!(
            pair_type(Some(Relay), Some(Host)),
            Some(CandidatePairType::Relay)
        );
        assert_eq!(
            pair_type(Some(Host), Some(Prflx)),
            Some(CandidatePairType::Host)
        );
        assert_eq!(pair_type(Some(Prflx), None), Some(CandidatePairType::Prflx));
        assert_eq!(pair_type(None, Some(Host)), None);
    }

    #[test]
    fn rates_and_loss_are_per_interval() {
        let t0 = Instant::now();
        let mut tracker = StatsTracker::default();
        let first = tracker.sample(
            t0,
            RawStats {
                rtt_secs: Some(0.042),
                candidate_pair: Some(CandidatePairType::Relay),
                audio_packets_received: 95,
                audio_packets_lost: 5,
                audio_jitter: 960.0,
                video_bytes_received: 1000,
                ..Default::default()
            },
        );
        assert_eq!(first.rtt_ms, Some(42.0));
        assert_eq!(first.candidate_pair, Some(CandidatePairType::Relay));
        assert_eq!(first.loss_in_pct, Some(5.0));
        assert_eq!(first.audio_jitter_ms, Some(20.0));
        assert_eq!(first.video_received, None, "no rate without an interval");

        // One second later: 100 more packets, none lost; 125 kB more video, 30 more frames.
        let second = tracker.sample(
            t0 + Duration::from_secs(1),
            RawStats {
                rtt_secs: Some(0.05),
                audio_packets_received: 195,
                audio_packets_lost: 5,
                video_bytes_received: 126_000,
                frames_decoded: 30,
                frame_width: 1280,
                frame_height: 720,
                audio_buffer_ms: Some(40),
                ..Default::default()
            },
        );
        assert_eq!(second.loss_in_pct, Some(0.0));
        let video = second.video_received.unwrap();
        assert_eq!(video.bitrate_kbps, 1000.0);
        assert_eq!((video.width, video.height, video.fps), (1280, 720, 30.0));
        assert_eq!(second.audio_buffer_ms, Some(40.0));
    }

    #[test]
    fn outbound_loss_comes_from_the_peer_s_reception_reports() {
        use crate::engine::StreamLoss;
        let report = |lost, seq| {
            Some(StreamLoss {
                packets_lost: lost,
                highest_sequence: seq,
            })
        };
        let t0 = Instant::now();
        let mut tracker = StatsTracker::default();
        // No report yet, then the first one: no interval to measure over.
        assert_eq!(tracker.sample(t0, RawStats::default()).loss_out_pct, None);
        let first = RawStats {
            sent: SentLoss {
                audio: report(2, 70_000),
                video: None,
            },
            ..Default::default()
        };
        let s = tracker.sample(t0 + Duration::from_secs(1), first);
        assert_eq!(s.loss_out_pct, None);
        // Audio: 50 expected, 5 lost. Video's first report only starts its interval.
        let second = RawStats {
            sent: SentLoss {
                audio: report(7, 70_050),
                video: report(0, 40_000),
            },
            ..Default::default()
        };
        let s = tracker.sample(t0 + Duration::from_secs(2), second);
        assert_eq!(s.loss_out_pct, Some(10.0));
        // Audio 50 expected, 0 lost; video 150 expected, 50 lost: 50 of 200.
        let third = RawStats {
            sent: SentLoss {
                audio: report(7, 70_100),
                video: report(50, 40_150),
            },
            ..Default::default()
        };
        let s = tracker.sample(t0 + Duration::from_secs(3), third);
        assert_eq!(s.loss_out_pct, Some(25.0));
    }

    #[test]
    fn nothing_received_means_no_loss_figure() {
        let mut tracker = StatsTracker::default();
        let r = tracker.sample(Instant::now(), RawStats::default());
        assert_eq!(r.loss_in_pct, None);
        assert_eq!(r.rtt_ms, None);
        assert_eq!(r.audio_jitter_ms, None);
    }

    #[test]
    fn the_transport_of_a_relay_pair_is_how_the_relay_is_reached() {
        let shim: std::net::SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let shims = [(shim, TransportProtocol::Tls)];
        let relay = |url: &str| {
            candidate_transport(
                RTCIceCandidateType::Relay,
                "udp",
                RTCIceServerTransportProtocol::Udp,
                url,
                &shims,
            )
        };
        assert_eq!(
            relay("turn:127.0.0.1:40001?transport=udp"),
            Some(TransportProtocol::Tls),
            "through a TLS shim"
        );
        assert_eq!(
            relay("turn:198.18.0.2:3478?transport=udp"),
            Some(TransportProtocol::Udp)
        );
        let host = |protocol: &str| {
            candidate_transport(
                RTCIceCandidateType::Host,
                protocol,
                RTCIceServerTransportProtocol::Unspecified,
                "",
                &shims,
            )
        };
        assert_eq!(host("tcp"), Some(TransportProtocol::Tcp));
        assert_eq!(host("udp"), Some(TransportProtocol::Udp));
        assert_eq!(host(""), None);
    }
}
