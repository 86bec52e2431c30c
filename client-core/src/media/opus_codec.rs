//! Opus over libopus: 48 kHz mono, VoIP application, 20 ms frames, in-band FEC and DTX.

use super::error::{MediaError, Result};
use super::frame::{AudioFrame, FRAME_SAMPLES, SAMPLE_RATE};

/// Largest Opus packet we produce (bytes); far above 20 ms at 510 kbps.
const MAX_PACKET: usize = 1500;

/// Opus encoder settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpusConfig {
    /// Target bitrate in bits per second (6000..=510000). Always set explicitly: libopus'
    /// automatic choice is far higher than a call needs.
    pub bitrate_bps: u32,
    /// In-band forward error correction (LBRR): each packet also carries a coarse copy of the
    /// previous frame, which [`OpusDecoder::decode_fec`] recovers.
    pub fec: bool,
    /// Discontinuous transmission: near-silent frames become 1 to 2 byte packets
    /// (see [`is_dtx_packet`]).
    pub dtx: bool,
    /// Expected packet loss in percent (0..=100); FEC spends bits in proportion.
    pub packet_loss_pct: u8,
}

impl Default for OpusConfig {
    fn default() -> Self {
        Self {
            bitrate_bps: 32_000,
            fec: true,
            dtx: true,
            packet_loss_pct: 10,
        }
    }
}

/// True for a DTX packet (no speech: 1 or 2 bytes, just a TOC). The driver may skip sending it.
pub fn is_dtx_packet(packet: &[u8]) -> bool {
    packet.len() <= 2
}

/// Opus encoder, one 20 ms mono frame in, one packet out.
pub struct OpusEncoder {
    inner: opus::Encoder,
    config: OpusConfig,
}

impl std::fmt::Debug for OpusEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusEncoder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl OpusEncoder {
    /// A new encoder.
    ///
    /// # Errors
    /// [`MediaError::InvalidConfig`] for out-of-range settings, [`MediaError::Opus`] if libopus
    /// refuses them.
    pub fn new(config: OpusConfig) -> Result<Self> {
        let inner = opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)?;
        let mut enc = Self { inner, config };
        enc.apply(config)?;
        Ok(enc)
    }

    fn apply(&mut self, c: OpusConfig) -> Result<()> {
        if !(6_000..=510_000).contains(&c.bitrate_bps) || c.packet_loss_pct > 100 {
            return Err(MediaError::InvalidConfig(format!(
                "Opus bitrate {} (6000..=510000) or loss {}% (0..=100) out of range",
                c.bitrate_bps, c.packet_loss_pct
            )));
        }
        self.inner
            .set_bitrate(opus::Bitrate::Bits(c.bitrate_bps as i32))?;
        self.inner.set_inband_fec(c.fec)?;
        self.inner.set_dtx(c.dtx)?;
        self.inner
            .set_packet_loss_perc(i32::from(c.packet_loss_pct))?;
        self.config = c;
        Ok(())
    }

    /// The current settings.
    pub fn config(&self) -> &OpusConfig {
        &self.config
    }

    /// Changes the bitrate at once.
    ///
    /// # Errors
    /// As [`OpusEncoder::new`].
    pub fn set_bitrate(&mut self, bps: u32) -> Result<()> {
        self.apply(OpusConfig {
            bitrate_bps: bps,
            ..self.config
        })
    }

    /// Changes the expected packet loss (drives how much FEC is sent).
    ///
    /// # Errors
    /// As [`OpusEncoder::new`].
    pub fn set_packet_loss_pct(&mut self, pct: u8) -> Result<()> {
        self.apply(OpusConfig {
            packet_loss_pct: pct,
            ..self.config
        })
    }

    /// Encodes one 20 ms frame into a packet (possibly a tiny DTX packet).
    ///
    /// # Errors
    /// [`MediaError::Opus`] if libopus fails.
    pub fn encode(&mut self, frame: &AudioFrame) -> Result<Vec<u8>> {
        let mut out = vec![0u8; MAX_PACKET];
        let n = self.inner.encode(&frame.samples[..], &mut out)?;
        out.truncate(n);
        Ok(out)
    }
}

/// What the playout buffer needs from an audio decoder (implemented by [`OpusDecoder`]; tests
/// substitute a fake). Every method produces exactly one 20 ms frame.
pub trait AudioDecoder {
    /// Decodes `packet`.
    ///
    /// # Errors
    /// On a corrupt packet or one that is not 20 ms long.
    fn decode(&mut self, packet: &[u8], out: &mut [i16; FRAME_SAMPLES]) -> Result<()>;
    /// Recovers the frame *before* `next_packet` from the FEC data in `next_packet` (falls back
    /// to concealment when it carries none). Afterwards decode `next_packet` normally.
    ///
    /// # Errors
    /// On a corrupt packet.
    fn decode_fec(&mut self, next_packet: &[u8], out: &mut [i16; FRAME_SAMPLES]) -> Result<()>;
    /// Packet-loss concealment: extrapolates one frame from the decoder's history.
    ///
    /// # Errors
    /// If the decoder fails.
    fn conceal(&mut self, out: &mut [i16; FRAME_SAMPLES]) -> Result<()>;
}

/// Opus decoder to 48 kHz mono.
pub struct OpusDecoder {
    inner: opus::Decoder,
}

impl std::fmt::Debug for OpusDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusDecoder").finish_non_exhaustive()
    }
}

impl OpusDecoder {
    /// A new decoder.
    ///
    /// # Errors
    /// [`MediaError::Opus`] if libopus cannot be created.
    pub fn new() -> Result<Self> {
        Ok(Self {
            inner: opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)?,
        })
    }

    /// Decodes a packet into a new frame stamped `capture_us`.
    ///
    /// # Errors
    /// As [`AudioDecoder::decode`].
    pub fn decode_frame(&mut self, packet: &[u8], capture_us: u64) -> Result<AudioFrame> {
        let mut f = AudioFrame::silence(capture_us);
        self.decode(packet, &mut f.samples)?;
        Ok(f)
    }

    fn run(&mut self, packet: &[u8], out: &mut [i16; FRAME_SAMPLES], fec: bool) -> Result<()> {
        let n = self.inner.decode(packet, &mut out[..], fec)?;
        if n != FRAME_SAMPLES {
            return Err(MediaError::OpusFrameSize(n));
        }
        Ok(())
    }
}

impl AudioDecoder for OpusDecoder {
    fn decode(&mut self, packet: &[u8], out: &mut [i16; FRAME_SAMPLES]) -> Result<()> {
        if packet.is_empty() {
            return Err(MediaError::OpusFrameSize(0));
        }
        // A packet longer than 20 ms fails with "buffer too small" rather than overflowing.
        self.run(packet, out, false)
    }

    fn decode_fec(&mut self, next_packet: &[u8], out: &mut [i16; FRAME_SAMPLES]) -> Result<()> {
        self.run(next_packet, out, true)
    }

    fn conceal(&mut self, out: &mut [i16; FRAME_SAMPLES]) -> Result<()> {
        self.run(&[], out, false)
    }
}
