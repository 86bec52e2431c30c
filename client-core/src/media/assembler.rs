//! H.264 access units from RTP packets, each one handed out the moment its last packet (the RTP
//! marker bit) arrives.
//!
//! Why not webrtc-rs's `SampleBuilder` (rtc-media 0.21, `io/sample_builder`): it returns a
//! complete frame only once the packet *after* it is in (`BuildError::PendingTimestampPacket`:
//! it wants the next timestamp to compute the sample's duration). On a 30 fps call that packet
//! is the next frame's first one, so every frame waited about one frame interval before it was
//! decoded: `cargo xtask bench-call` measured glass-to-glass p50 45 ms with it, and the bench
//! figures in ARCHITECTURE.md after this change. The duration is of no use to a decoder.
//!
//! What it keeps from the builder's loss handling, so the pipeline's decisions stay the same:
//! - a gap in sequence numbers is waited for (a NACK retransmission may fill it) until the
//!   packets held span more than [`MAX_PACKETS`] numbers or [`MAX_DELAY`] of RTP time; then the
//!   incomplete frame is dropped and the next frame reports how many packets were dropped
//!   before it ([`AccessUnit::dropped_before`]), which freezes the picture until a keyframe;
//! - padding-only packets (no payload: Chromium's bandwidth probes) take sequence numbers but
//!   are not loss ([`AccessUnit::padding_before`] counts them apart);
//! - packets that do not begin a frame where one must begin (the start was lost) are dropped and
//!   counted as dropped; at the very start of a stream, before anything came out, they are held
//!   as long as a gap (the first packets may arrive reordered).
//!
//! Sans-IO: no clock is read; time is the packets' RTP timestamps.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use rtc::rtp::Packet;

/// The most sequence numbers held while waiting for a missing packet.
pub const MAX_PACKETS: i64 = 256;
/// The most RTP time held while waiting for a missing packet.
pub const MAX_DELAY: Duration = Duration::from_millis(500);
const CLOCK_RATE: u64 = 90_000;
const START_CODE: &[u8] = &[0, 0, 0, 1];
const STAP_A: u8 = 24;
const FU_A: u8 = 28;
const FU_START: u8 = 0x80;
const FU_END: u8 = 0x40;
/// A packet this far (in sequence numbers) from the expected one is a new stream, not a late or
/// early packet: start over from it.
const RESYNC_DISTANCE: i64 = 4 * MAX_PACKETS;

/// One complete access unit, Annex-B.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUnit {
    pub data: Bytes,
    pub rtp_timestamp: u32,
    /// Media packets lost or thrown away (an incomplete frame's) since the previous unit.
    pub dropped_before: u32,
    /// Padding-only packets since the previous unit (not loss).
    pub padding_before: u32,
}

/// Reassembles one H.264 RTP stream (RFC 6184, packetization modes 0 and 1) into access units.
pub struct FrameAssembler {
    /// Held packets by extended sequence number.
    packets: BTreeMap<i64, Packet>,
    /// Extended sequence number of the first packet not yet consumed.
    next: Option<i64>,
    /// The timestamp of a frame given up on: its remaining packets are dropped too.
    abandoned: Option<u32>,
    /// Some packet was consumed: one before `next` is late. Until then an earlier packet (the
    /// stream's first ones reordered) moves `next` back.
    started: bool,
    dropped: u32,
    padding: u32,
}

impl Default for FrameAssembler {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameAssembler {
    pub fn new() -> Self {
        FrameAssembler {
            packets: BTreeMap::new(),
            next: None,
            abandoned: None,
            started: false,
            dropped: 0,
            padding: 0,
        }
    }

    /// Takes one received packet (any order, duplicates ignored).
    pub fn push(&mut self, packet: Packet) {
        let seq = packet.header.sequence_number;
        let Some(next) = self.next else {
            let ext = i64::from(seq) + (1 << 32);
            self.next = Some(ext);
            self.packets.insert(ext, packet);
            return;
        };
        // The extended number closest to the expected one.
        let delta = i64::from(seq.wrapping_sub(next as u16) as i16);
        let ext = next + delta;
        if delta.abs() > RESYNC_DISTANCE {
            self.dropped += self.packets.len() as u32;
            self.packets.clear();
            self.abandoned = None;
            self.started = false;
            self.next = Some(ext);
        } else if delta < 0 {
            if self.started {
                return; // Already consumed or given up on (a late retransmission, a duplicate).
            }
            self.next = Some(ext);
        }
        self.packets.entry(ext).or_insert(packet);
    }

    /// The next complete access unit, if there is one. Call until `None` after each push.
    pub fn pop(&mut self) -> Option<AccessUnit> {
        loop {
            let next = self.next?;
            let Some(head) = self.packets.get(&next) else {
                // A gap: wait for it unless waiting has gone on too long.
                let (&first, _) = self.packets.first_key_value()?;
                if !self.held_too_long() {
                    return None;
                }
                self.dropped += (first - next) as u32;
                self.next = Some(first);
                self.started = true;
                continue;
            };
            if head.payload.is_empty() {
                self.padding += 1;
                self.consume(next);
                continue;
            }
            let timestamp = head.header.timestamp;
            if self.abandoned == Some(timestamp) || !starts_nal_unit(&head.payload) {
                // At the very start the frame's first packets may still come (reordered).
                if !self.started && !self.held_too_long() {
                    return None;
                }
                self.dropped += 1;
                self.consume(next);
                continue;
            }
            self.abandoned = None;
            // Walk the frame: it ends at the marker bit, or just before a packet of another
            // timestamp (a sender that sets no marker).
            let mut end = next;
            let complete = loop {
                match self.packets.get(&end) {
                    None => break false,
                    Some(p) if p.header.timestamp != timestamp => {
                        end -= 1;
                        break true;
                    }
                    Some(p) if p.header.marker => break true,
                    Some(_) => end += 1,
                }
            };
            if !complete {
                if !self.held_too_long() {
                    return None;
                }
                // Give up on this frame: its packets held so far and the missing ones.
                self.abandoned = Some(timestamp);
                let present = self.packets.range(next..end).count() as u32;
                self.dropped += present;
                for seq in next..end {
                    self.packets.remove(&seq);
                }
                self.next = Some(end);
                self.started = true;
                continue;
            }
            match self.depacketize(next, end) {
                Some(data) => {
                    return Some(AccessUnit {
                        data,
                        rtp_timestamp: timestamp,
                        dropped_before: std::mem::take(&mut self.dropped),
                        padding_before: std::mem::take(&mut self.padding),
                    });
                }
                None => self.dropped += (end - next + 1) as u32,
            }
        }
    }

    /// Removes packets `first..=last` and writes their NAL units as Annex-B into one buffer (the
    /// only copy of the frame's bytes). `None` for a malformed payload.
    fn depacketize(&mut self, first: i64, last: i64) -> Option<Bytes> {
        self.next = Some(last + 1);
        self.started = true;
        let packets: Vec<Packet> = (first..=last)
            .filter_map(|seq| self.packets.remove(&seq))
            .collect();
        let size: usize = packets.iter().map(|p| p.payload.len() + 8).sum();
        let mut out = Vec::with_capacity(size);
        let mut in_fragment = false;
        for payload in packets
            .iter()
            .map(|p| &p.payload[..])
            .filter(|p| !p.is_empty())
        {
            let nal_type = payload[0] & 0x1F;
            match nal_type {
                1..=23 => {
                    out.extend_from_slice(START_CODE);
                    out.extend_from_slice(payload);
                }
                STAP_A => {
                    let mut rest = &payload[1..];
                    while rest.len() >= 2 {
                        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                        let nal = rest.get(2..2 + len)?;
                        out.extend_from_slice(START_CODE);
                        out.extend_from_slice(nal);
                        rest = &rest[2 + len..];
                    }
                }
                FU_A => {
                    let fu = *payload.get(1)?;
                    if fu & FU_START != 0 {
                        out.extend_from_slice(START_CODE);
                        out.push((payload[0] & 0xE0) | (fu & 0x1F));
                        in_fragment = true;
                    } else if !in_fragment {
                        return None; // A fragment without its start.
                    }
                    out.extend_from_slice(&payload[2..]);
                    if fu & FU_END != 0 {
                        in_fragment = false;
                    }
                }
                _ => return None,
            }
        }
        (!out.is_empty() && !in_fragment).then(|| Bytes::from(out))
    }

    fn consume(&mut self, seq: i64) {
        self.packets.remove(&seq);
        self.next = Some(seq + 1);
        self.started = true;
    }

    /// The held packets span more than [`MAX_PACKETS`] numbers or [`MAX_DELAY`].
    fn held_too_long(&self) -> bool {
        let (Some(next), Some((&last, newest))) = (self.next, self.packets.last_key_value()) else {
            return false;
        };
        if last - next >= MAX_PACKETS {
            return true;
        }
        let oldest = self
            .packets
            .values()
            .next()
            .map_or(0, |p| p.header.timestamp);
        let span = newest.header.timestamp.wrapping_sub(oldest) as i32;
        i64::from(span) > (CLOCK_RATE * MAX_DELAY.as_millis() as u64 / 1000) as i64
    }
}

/// The payload begins a NAL unit: anything but a FU-A fragment without its start bit.
fn starts_nal_unit(payload: &[u8]) -> bool {
    match payload {
        [] | [_] => false,
        [b0, fu, ..] if b0 & 0x1F == FU_A => fu & FU_START != 0,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtp::codec::h264::H264Payloader;
    use rtc::rtp::packetizer::{Packetizer, new_packetizer};
    use rtc::rtp::sequence::{Sequencer, new_fixed_sequencer};
    use std::time::Instant;

    /// `frames` access units (an SPS, a PPS and a 3,000-byte slice each, so the slice is split
    /// into FU-A fragments) packetized as webrtc does, 33 ms apart, the first sequence number
    /// `first_seq`.
    fn packetized(frames: usize, first_seq: u16) -> (Vec<Vec<Packet>>, Vec<Vec<u8>>) {
        let start = Instant::now();
        let sequencer: Box<dyn Sequencer> = Box::new(new_fixed_sequencer(first_seq));
        let mut packetizer = new_packetizer(
            start,
            1200,
            125,
            7,
            Box::new(H264Payloader::default()),
            sequencer,
            90_000,
        );
        let mut units = Vec::new();
        let packets = (0..frames)
            .map(|i| {
                let mut au = vec![0, 0, 0, 1, 0x67, 0x42, 0xc0, 0x1f, 0, 0, 0, 1, 0x68, 0xce];
                au.extend_from_slice(&[0, 0, 0, 1, 0x41]);
                au.extend((0..3000).map(|b| (b * 7 + i) as u8 | 1));
                units.push(au.clone());
                packetizer.packetize(start, &Bytes::from(au), 3000).unwrap()
            })
            .collect();
        (packets, units)
    }

    fn drain(a: &mut FrameAssembler) -> Vec<AccessUnit> {
        std::iter::from_fn(|| a.pop()).collect()
    }

    /// The webrtc-rs sample builder handed a frame out only when the next frame's first packet
    /// arrived; here it comes out with its own last packet, byte for byte what was sent.
    #[test]
    fn a_frame_comes_out_when_its_last_packet_arrives() {
        let (frames, units) = packetized(3, 100);
        let mut a = FrameAssembler::new();
        for (packets, unit) in frames.into_iter().zip(units) {
            let n = packets.len();
            assert!(n >= 3, "the slice is fragmented");
            for (i, p) in packets.into_iter().enumerate() {
                a.push(p);
                let out = drain(&mut a);
                if i + 1 < n {
                    assert!(out.is_empty(), "packet {i} of {n}");
                } else {
                    assert_eq!(out.len(), 1);
                    assert_eq!(&out[0].data[..], &unit[..]);
                    assert_eq!((out[0].dropped_before, out[0].padding_before), (0, 0));
                }
            }
        }
    }

    /// Why this module exists: webrtc-rs's `SampleBuilder` (as the pipeline used it) gives a
    /// frame out only when the next frame's first packet arrives, however complete the frame
    /// was. If a new version stops holding frames, this fails and the builder could come back.
    #[test]
    fn the_webrtc_sample_builder_holds_a_complete_frame_until_the_next_packet() {
        use rtc::media::io::sample_builder::SampleBuilder;
        use rtc::rtp::codec::h264::H264Packet;
        let (frames, _) = packetized(2, 500);
        let now = Instant::now();
        let mut builder = SampleBuilder::new(256, H264Packet::default(), 90_000)
            .with_max_time_delay(Duration::from_millis(500));
        let mut frames = frames.into_iter();
        for p in frames.next().unwrap() {
            builder.push(now, p);
            assert!(builder.pop(now).is_none(), "held while complete");
        }
        builder.push(now, frames.next().unwrap().remove(0));
        assert!(
            builder.pop(now).is_some(),
            "out with the next frame's first packet"
        );
    }

    /// Reordered and duplicated packets, across the sequence number wrap: every frame once.
    /// (The first frame arrives in order: where a stream begins only the order of its first
    /// packets tells; after a frame, the next one begins right after its last packet.)
    #[test]
    fn reordered_and_duplicated_packets_across_the_wrap() {
        let (frames, units) = packetized(4, 65_530);
        let mut a = FrameAssembler::new();
        let mut out = Vec::new();
        for (i, mut packets) in frames.into_iter().enumerate() {
            if i > 0 {
                packets.reverse();
            }
            let again = packets[0].clone();
            for p in packets {
                a.push(p);
                out.extend(drain(&mut a));
            }
            a.push(again);
            out.extend(drain(&mut a));
        }
        let data: Vec<_> = out.iter().map(|u| u.data.to_vec()).collect();
        assert_eq!(data, units);
        assert!(out.iter().all(|u| u.dropped_before == 0));
    }

    /// A lost packet is waited for: its retransmission completes the frame with no loss
    /// reported. One that never comes is given up on after `MAX_DELAY` of RTP time, and the
    /// first frame after it says packets were dropped.
    #[test]
    fn a_gap_is_waited_for_then_given_up_on() {
        let (frames, _) = packetized(30, 1000);
        let mut a = FrameAssembler::new();
        let mut out = Vec::new();
        let mut late = None;
        for (i, packets) in frames.into_iter().enumerate() {
            for (j, p) in packets.into_iter().enumerate() {
                match (i, j) {
                    (1, 1) => late = Some(p), // Retransmitted after frame 2.
                    (5, 1) => {}              // Lost for good.
                    _ => a.push(p),
                }
                out.extend(drain(&mut a));
            }
            if i == 2 {
                assert_eq!(out.len(), 1, "frames 1 and 2 wait for the gap");
                a.push(late.take().unwrap());
                out.extend(drain(&mut a));
                assert_eq!(out.len(), 3);
            }
        }
        let timestamps: Vec<u32> = out.iter().map(|u| u.rtp_timestamp).collect();
        let dropped: Vec<u32> = out.iter().map(|u| u.dropped_before).collect();
        assert_eq!(dropped.iter().filter(|d| **d > 0).count(), 1, "{dropped:?}");
        let first_after = dropped.iter().position(|d| *d > 0).unwrap();
        // Frame 5 never came out; every other frame did, in order.
        assert_eq!(out.len(), 29);
        assert_eq!(first_after, 5);
        assert!(
            timestamps
                .windows(2)
                .all(|w| w[1].wrapping_sub(w[0]) < 1 << 31)
        );
        // Given up on once the held packets spanned more than MAX_DELAY: about 15 frames.
        assert!(dropped[5] >= 1);
    }

    /// Padding-only packets between frames are counted apart and are not loss.
    #[test]
    fn padding_only_packets_are_not_loss() {
        let (frames, _) = packetized(3, 7);
        let mut a = FrameAssembler::new();
        let mut out = Vec::new();
        let mut seq = 7u16;
        for packets in frames {
            let ts = packets[0].header.timestamp;
            for mut p in packets {
                p.header.sequence_number = seq;
                seq = seq.wrapping_add(1);
                a.push(p);
            }
            a.push(Packet {
                header: rtc::rtp::header::Header {
                    sequence_number: seq,
                    timestamp: ts,
                    padding: true,
                    ..Default::default()
                },
                payload: Bytes::new(),
            });
            seq = seq.wrapping_add(1);
            out.extend(drain(&mut a));
        }
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|u| u.dropped_before == 0));
        assert_eq!(out[1].padding_before + out[2].padding_before, 2);
    }

    /// A stream that starts over with far-away sequence numbers (a new sender) is followed,
    /// not ignored as late.
    #[test]
    fn a_new_sequence_base_starts_over() {
        let (first, _) = packetized(2, 10);
        let (second, units) = packetized(2, 40_000);
        let mut a = FrameAssembler::new();
        let mut out = Vec::new();
        for p in first.into_iter().chain(second).flatten() {
            a.push(p);
            out.extend(drain(&mut a));
        }
        assert_eq!(out.len(), 4);
        assert_eq!(&out[3].data[..], &units[1][..]);
    }
}
