//! Audio processing on the microphone path (feature `devices`): echo cancellation, noise
//! suppression and automatic gain, with what the speaker plays as the echo reference.
//!
//! The processing is libwebrtc's audio processing module (AEC3, NS, AGC2 and the high-pass
//! filter) through `sonora` 0.2, a pure-Rust port of it. Why this crate:
//! - `webrtc-audio-processing` (the bindings to the C++ module) does not build on Debian 12: it
//!   needs the system library at 2.1 or newer (Debian has 0.3), and its `bundled` feature needs
//!   meson and a newer abseil than Debian's.
//! - `nnnoiseless` (RNNoise, about 54 µs per 480-sample frame here) only suppresses noise: a
//!   laptop's speaker heard by its own microphone is not noise to it, so the patient would
//!   still hear themselves. Echo is the problem a doctor on laptop speakers has.
//! - `sonora` does all three in one module and builds from the Rust registry alone. Its cost,
//!   measured by `cargo bench -p bedside-client-core --bench apm --features devices`, is printed
//!   per 10 ms frame (render + capture); see ARCHITECTURE.md for the figure on this machine.
//!
//! How it is wired: [`EchoPath`] is shared by the speaker and the microphone. The speaker's
//! audio thread hands every frame it plays to [`EchoPath::played`] (a non-blocking send into a
//! bounded queue; a full queue drops the frame rather than stall playback). The microphone's
//! [`ProcessedMicrophone`] owns the [`AudioProcessor`]; before it cleans each captured 20 ms
//! frame it feeds the processor every render frame played since, in order, so render and
//! capture stay on one thread and the processor needs no lock. AEC3 finds the delay between
//! speaker and microphone itself (its delay estimator), so none is configured.
//!
//! The processor is synchronous and reads no clock: tests drive it with a simulated room
//! (`client-core/tests/apm.rs`).

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use sonora::config::{EchoCanceller, GainController2, NoiseSuppression};
use sonora::{AudioProcessing, Config, StreamConfig};

use super::error::{MediaError, Result};
use super::frame::{AudioFrame, FRAME_SAMPLES, SAMPLE_RATE};
use super::source::{AudioSource, Capture};

/// Samples in one 10 ms frame at 48 kHz: the unit the audio processing module works in.
pub const APM_FRAME_SAMPLES: usize = (SAMPLE_RATE as usize) / 100;

/// Render frames (10 ms each) queued between the speaker and the microphone: 1 s. More means
/// the microphone stopped polling; the oldest are then lost, and the canceller re-converges.
const RENDER_QUEUE: usize = 100;

type RenderFrame = [f32; APM_FRAME_SAMPLES];

/// Which parts of the module run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApmConfig {
    /// Echo cancellation (AEC3) against the speaker's output.
    pub echo_cancellation: bool,
    /// Stationary noise suppression.
    pub noise_suppression: bool,
    /// Automatic gain (AGC2: adaptive digital gain and a limiter).
    pub automatic_gain: bool,
}

impl Default for ApmConfig {
    /// Everything on: what a doctor on laptop speakers needs.
    fn default() -> Self {
        ApmConfig {
            echo_cancellation: true,
            noise_suppression: true,
            automatic_gain: true,
        }
    }
}

/// Figures the module reports about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ApmStats {
    /// Echo return loss enhancement, dB, as AEC3 estimates it.
    pub erle_db: Option<f64>,
    /// The speaker-to-microphone delay AEC3 found, ms.
    pub delay_ms: Option<i32>,
    /// Render frames lost because the queue was full.
    pub render_dropped: u64,
}

#[derive(Debug, Default)]
struct PathState {
    tx: Option<SyncSender<RenderFrame>>,
    dropped: u64,
}

/// The echo reference shared by a speaker and a microphone. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct EchoPath {
    state: Arc<Mutex<PathState>>,
}

impl EchoPath {
    /// A path with no processor attached yet: played frames are discarded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tells the processor this frame is being played now. Called on the speaker's audio
    /// thread: it never blocks (a contended lock or a full queue drops the frame).
    pub fn played(&self, frame: &AudioFrame) {
        let Ok(mut state) = self.state.try_lock() else {
            return;
        };
        let Some(tx) = state.tx.clone() else {
            return;
        };
        for half in frame.samples.chunks_exact(APM_FRAME_SAMPLES) {
            let mut out = [0f32; APM_FRAME_SAMPLES];
            for (o, s) in out.iter_mut().zip(half) {
                *o = f32::from(*s) / 32768.0;
            }
            match tx.try_send(out) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => state.dropped += 1,
                Err(TrySendError::Disconnected(_)) => {
                    state.tx = None;
                    return;
                }
            }
        }
    }

    fn attach(&self) -> Receiver<RenderFrame> {
        let (tx, rx) = sync_channel(RENDER_QUEUE);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // A newer microphone replaces the old one's processor.
        state.tx = Some(tx);
        rx
    }

    fn dropped(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.dropped)
    }
}

/// libwebrtc's audio processing module for one microphone, fed by an [`EchoPath`].
pub struct AudioProcessor {
    apm: AudioProcessing,
    render: Receiver<RenderFrame>,
    path: EchoPath,
    scratch_in: [f32; APM_FRAME_SAMPLES],
    scratch_out: [f32; APM_FRAME_SAMPLES],
}

impl std::fmt::Debug for AudioProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioProcessor").finish_non_exhaustive()
    }
}

impl AudioProcessor {
    /// A processor for 48 kHz mono, taking its echo reference from `path` (replacing any
    /// processor attached to it before).
    pub fn new(config: ApmConfig, path: &EchoPath) -> Self {
        let apm_config = Config {
            echo_canceller: config.echo_cancellation.then(EchoCanceller::default),
            noise_suppression: config.noise_suppression.then(NoiseSuppression::default),
            gain_controller2: config.automatic_gain.then(GainController2::default),
            ..Default::default()
        };
        let stream = StreamConfig::new(SAMPLE_RATE, 1);
        let apm = AudioProcessing::builder()
            .config(apm_config)
            .capture_config(stream)
            .render_config(stream)
            .build();
        AudioProcessor {
            apm,
            render: path.attach(),
            path: path.clone(),
            scratch_in: [0.0; APM_FRAME_SAMPLES],
            scratch_out: [0.0; APM_FRAME_SAMPLES],
        }
    }

    /// Feeds the processor every render frame played since the last call.
    fn drain_render(&mut self) -> Result<()> {
        while let Ok(frame) = self.render.try_recv() {
            self.apm
                .process_render_f32(&[&frame], &mut [&mut self.scratch_out])
                .map_err(|e| MediaError::Audio(format!("echo reference: {e:?}")))?;
        }
        Ok(())
    }

    /// Cleans one captured 20 ms frame in place (two 10 ms steps).
    ///
    /// # Errors
    /// [`MediaError::Audio`] if the module rejects a frame (it does not for 48 kHz mono); the
    /// frame is then left as captured.
    pub fn process(&mut self, frame: &mut AudioFrame) -> Result<()> {
        self.drain_render()?;
        for half in frame.samples.chunks_exact_mut(APM_FRAME_SAMPLES) {
            for (i, s) in self.scratch_in.iter_mut().zip(half.iter()) {
                *i = f32::from(*s) / 32768.0;
            }
            self.apm
                .process_capture_f32(&[&self.scratch_in], &mut [&mut self.scratch_out])
                .map_err(|e| MediaError::Audio(format!("microphone: {e:?}")))?;
            for (s, o) in half.iter_mut().zip(self.scratch_out.iter()) {
                *s = (o.clamp(-1.0, 1.0) * 32767.0) as i16;
            }
        }
        Ok(())
    }

    /// What the module reports about itself.
    pub fn stats(&self) -> ApmStats {
        let s = self.apm.statistics();
        ApmStats {
            erle_db: s.echo_return_loss_enhancement,
            delay_ms: s.delay_median_ms,
            render_dropped: self.path.dropped(),
        }
    }
}

const _: () = assert!(FRAME_SAMPLES == 2 * APM_FRAME_SAMPLES);

/// A microphone (any [`AudioSource`]) whose frames go through an [`AudioProcessor`].
#[derive(Debug)]
pub struct ProcessedMicrophone<S> {
    inner: S,
    processor: AudioProcessor,
}

impl<S: AudioSource> ProcessedMicrophone<S> {
    /// Wraps `inner`, cancelling the echo of what `path`'s speaker plays.
    pub fn new(inner: S, config: ApmConfig, path: &EchoPath) -> Self {
        ProcessedMicrophone {
            inner,
            processor: AudioProcessor::new(config, path),
        }
    }

    /// The processor's own figures.
    pub fn stats(&self) -> ApmStats {
        self.processor.stats()
    }
}

impl<S: AudioSource> AudioSource for ProcessedMicrophone<S> {
    fn poll_audio(&mut self, now_us: u64) -> Capture<AudioFrame> {
        match self.inner.poll_audio(now_us) {
            Capture::Frame(mut f) => {
                // On an error the frame goes out as captured: better heard with echo than lost.
                if let Err(e) = self.processor.process(&mut f) {
                    tracing::warn!(error = %e, "audio processing failed for a frame");
                }
                Capture::Frame(f)
            }
            other => other,
        }
    }
}

/// Opens microphone `id` (or the default one) with echo cancellation, noise suppression and
/// automatic gain, the echo reference being what `path`'s speaker plays.
///
/// # Errors
/// [`MediaError::Device`] when there is no such microphone or it cannot run at 48 kHz.
pub fn open_processed_microphone(
    id: Option<&str>,
    clock: super::devices::SessionClock,
    path: &EchoPath,
) -> Result<ProcessedMicrophone<super::devices::MicrophoneSource>> {
    let mic = super::devices::open_microphone(id, clock)?;
    Ok(ProcessedMicrophone::new(mic, ApmConfig::default(), path))
}

/// Like [`super::devices::open_speaker`], and every frame played is also handed to `path` as
/// the echo reference.
///
/// # Errors
/// [`MediaError::Device`] when there is no such speaker or it cannot run at 48 kHz.
pub fn open_speaker_with_reference(
    id: Option<&str>,
    audio: Arc<super::PlayedAudio>,
    clock: super::devices::SessionClock,
    path: EchoPath,
) -> Result<super::devices::Speaker> {
    super::devices::Speaker::open(
        id,
        move |now_us| {
            let frame = audio.pop().unwrap_or_else(|| AudioFrame {
                samples: Box::new([0; FRAME_SAMPLES]),
                capture_us: now_us,
            });
            path.played(&frame);
            frame
        },
        clock,
    )
}
