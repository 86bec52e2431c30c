//! Real devices (feature `devices`): cameras through nokhwa, microphones and speakers through
//! cpal. They adapt platform callbacks to the media layer's push/pull types and hold no policy.
//!
//! "No device" is a normal outcome: [`enumerate`] returns an empty list, and a failed open is an
//! error the caller turns into [`super::NoDevice`]. Devices never read the clock themselves:
//! the driver passes its session clock as a [`SessionClock`].
//!
//! On macOS, nokhwa needs camera permission first (`nokhwa::nokhwa_initialize`); mobile hosts do
//! not use this module at all: they push frames through [`super::push_source`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{ApiBackend, CameraIndex, RequestedFormat, RequestedFormatType};

use super::error::{MediaError, Result};
use super::frame::{AudioFrame, FRAME_SAMPLES, FRAME_US, SAMPLE_RATE, VideoFrame};
use super::source::{FramePusher, RealTimeGate};

/// How far a microphone or speaker may run ahead of the clock to make up a stall (see
/// [`RealTimeGate`]). Beyond it the device is delivering (or asking for) audio faster than real
/// time: ALSA's `null` device has no clock and ran at about 70 times real time here. Its
/// callback is then paced, one frame's sleep after each callback that had a frame too many, and
/// the frames
/// too many are dropped (capture) or not taken from the call (playback), so such a device
/// neither spins a core nor floods the echo canceller, the encoder or the link.
const AHEAD_CREDIT_US: u64 = 1_000_000;

/// Paces a device callback that is ahead of real time (see [`AHEAD_CREDIT_US`]), and warns
/// once, without naming the device.
#[derive(Debug)]
struct DevicePacer {
    gate: RealTimeGate,
    what: &'static str,
    warned: bool,
    /// A frame was refused in this callback.
    refused: bool,
}

impl DevicePacer {
    fn new(what: &'static str) -> Self {
        DevicePacer {
            gate: RealTimeGate::new(FRAME_US, AHEAD_CREDIT_US),
            what,
            warned: false,
            refused: false,
        }
    }

    /// Whether the frame at `now_us` is within real time.
    fn admit(&mut self, now_us: u64) -> bool {
        if self.gate.admit(now_us) {
            return true;
        }
        self.refused = true;
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                device = self.what,
                "the audio device runs faster than real time (a device with no clock, such as \
                 ALSA's null device): it is paced to real time and the excess is dropped"
            );
        }
        false
    }

    /// At the end of a callback that had a frame too many: sleeps one frame, on the device's
    /// own thread (only a device with no clock of its own gets here), so it does not spin.
    fn pace(&mut self) {
        if std::mem::take(&mut self.refused) {
            std::thread::sleep(std::time::Duration::from_micros(FRAME_US));
        }
    }
}

/// The session clock (microseconds since the session epoch), supplied by the driver.
pub type SessionClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// What a device does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// A video capture device.
    Camera,
    /// An audio input.
    Microphone,
    /// An audio output.
    Speaker,
}

/// One device found by [`enumerate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its kind.
    pub kind: DeviceKind,
    /// Stable identifier to pass to `open` (camera index, or cpal device id).
    pub id: String,
    /// Human-readable name for the device picker.
    pub name: String,
}

fn dev_err(e: impl std::fmt::Display) -> MediaError {
    MediaError::Device(e.to_string())
}

/// All cameras, microphones and speakers; empty when there are none (never an error).
pub fn enumerate() -> Vec<DeviceInfo> {
    let mut out = Vec::new();
    if let Ok(cams) = nokhwa::query(ApiBackend::Auto) {
        for c in cams {
            out.push(DeviceInfo {
                kind: DeviceKind::Camera,
                id: c.index().to_string(),
                name: c.human_name(),
            });
        }
    }
    let host = cpal::default_host();
    let describe = |d: &cpal::Device, kind| DeviceInfo {
        kind,
        id: d.id().map(|i| i.to_string()).unwrap_or_default(),
        name: d
            .description()
            .map(|x| x.name().to_string())
            .unwrap_or_else(|_| "unknown".into()),
    };
    if let Ok(devs) = host.input_devices() {
        out.extend(devs.map(|d| describe(&d, DeviceKind::Microphone)));
    }
    if let Ok(devs) = host.output_devices() {
        out.extend(devs.map(|d| describe(&d, DeviceKind::Speaker)));
    }
    out
}

fn find_device(id: Option<&str>, input: bool) -> Result<cpal::Device> {
    let host = cpal::default_host();
    match id {
        None => if input {
            host.default_input_device()
        } else {
            host.default_output_device()
        }
        .ok_or_else(|| MediaError::Device("no default audio device".into())),
        Some(want) => {
            let devs = if input {
                host.input_devices().map_err(dev_err)?.collect::<Vec<_>>()
            } else {
                host.output_devices().map_err(dev_err)?.collect::<Vec<_>>()
            };
            devs.into_iter()
                .find(|d| d.id().is_ok_and(|i| i.to_string() == want))
                .ok_or_else(|| MediaError::Device(format!("no audio device {want}")))
        }
    }
}

/// Picks a 48 kHz f32 configuration with as few channels as the device allows.
fn stream_config(device: &cpal::Device, input: bool) -> Result<cpal::StreamConfig> {
    let ranges: Vec<_> = if input {
        device.supported_input_configs().map_err(dev_err)?.collect()
    } else {
        device
            .supported_output_configs()
            .map_err(dev_err)?
            .collect()
    };
    let best = ranges
        .into_iter()
        .filter(|r| {
            r.sample_format() == cpal::SampleFormat::F32
                && r.min_sample_rate() <= SAMPLE_RATE
                && r.max_sample_rate() >= SAMPLE_RATE
        })
        .min_by_key(|r| r.channels())
        .ok_or_else(|| MediaError::Device("device offers no 48 kHz f32 format".into()))?;
    Ok(cpal::StreamConfig {
        channels: best.channels(),
        sample_rate: SAMPLE_RATE,
        buffer_size: cpal::BufferSize::Default,
    })
}

/// A running microphone pushing 20 ms frames; capture stops when dropped.
pub struct Microphone {
    _stream: cpal::Stream,
}

impl std::fmt::Debug for Microphone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Microphone").finish_non_exhaustive()
    }
}

impl Microphone {
    /// Opens the microphone `id` (or the default one), downmixes to mono and pushes 20 ms frames
    /// stamped by `clock`.
    ///
    /// # Errors
    /// [`MediaError::Device`] when there is no such device or it cannot run at 48 kHz.
    pub fn open(
        id: Option<&str>,
        pusher: FramePusher<AudioFrame>,
        clock: SessionClock,
    ) -> Result<Self> {
        let device = find_device(id, true)?;
        let config = stream_config(&device, true)?;
        let channels = usize::from(config.channels.max(1));
        let mut pending: Vec<i16> = Vec::with_capacity(FRAME_SAMPLES * 2);
        let mut pacer = DevicePacer::new("microphone");
        let err_pusher = pusher.clone();
        pusher.set_device_present(true);
        let stream = device
            .build_input_stream::<f32, _, _>(
                config,
                move |data, _| {
                    for chunk in data.chunks(channels) {
                        let mono = chunk.iter().sum::<f32>() / chunk.len() as f32;
                        pending.push((mono.clamp(-1.0, 1.0) * 32767.0) as i16);
                    }
                    while pending.len() >= FRAME_SAMPLES {
                        let now = clock();
                        if !pacer.admit(now) {
                            pending.drain(..FRAME_SAMPLES);
                            continue;
                        }
                        // The frame's first sample was captured this long before the callback.
                        let age = (pending.len() as u64 * 1_000_000) / u64::from(SAMPLE_RATE);
                        if let Ok(f) = AudioFrame::from_slice(
                            &pending[..FRAME_SAMPLES],
                            now.saturating_sub(age),
                        ) {
                            pusher.push(f);
                        }
                        pending.drain(..FRAME_SAMPLES);
                    }
                    pacer.pace();
                },
                move |err| {
                    tracing::debug!(error = %err, "microphone stream error");
                    err_pusher.set_device_present(false);
                },
                None,
            )
            .map_err(dev_err)?;
        stream.play().map_err(dev_err)?;
        Ok(Self { _stream: stream })
    }
}

/// A running speaker pulling 20 ms frames; playback stops when dropped.
pub struct Speaker {
    _stream: cpal::Stream,
}

impl std::fmt::Debug for Speaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Speaker").finish_non_exhaustive()
    }
}

impl Speaker {
    /// Opens the speaker `id` (or the default one). Whenever it needs audio it calls
    /// `pull(now_us)` for the next 20 ms frame (typically `AudioPlayoutBuffer::pull`) and plays
    /// it on every channel. `pull` runs on the audio thread: it must not block.
    ///
    /// # Errors
    /// [`MediaError::Device`] when there is no such device or it cannot run at 48 kHz.
    pub fn open(
        id: Option<&str>,
        mut pull: impl FnMut(u64) -> AudioFrame + Send + 'static,
        clock: SessionClock,
    ) -> Result<Self> {
        let device = find_device(id, false)?;
        let config = stream_config(&device, false)?;
        let channels = usize::from(config.channels.max(1));
        let mut current: Option<AudioFrame> = None;
        let mut pos = 0usize;
        let mut pacer = DevicePacer::new("speaker");
        let stream = device
            .build_output_stream::<f32, _, _>(
                config,
                move |data, _| {
                    for chunk in data.chunks_mut(channels) {
                        if current.is_none() || pos >= FRAME_SAMPLES {
                            let now = clock();
                            // Too fast: silence, and the call's audio and the echo reference
                            // are left for real time.
                            current = Some(if pacer.admit(now) {
                                pull(now)
                            } else {
                                AudioFrame::silence(now)
                            });
                            pos = 0;
                        }
                        let s = current.as_ref().map_or(0, |f| f.samples[pos]);
                        pos += 1;
                        chunk.fill(f32::from(s) / 32768.0);
                    }
                    pacer.pace();
                },
                |_err| {},
                None,
            )
            .map_err(dev_err)?;
        stream.play().map_err(dev_err)?;
        Ok(Self { _stream: stream })
    }
}

/// A running camera pushing I420 frames from its own thread; stops when dropped.
pub struct CameraCapture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for CameraCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CameraCapture").finish_non_exhaustive()
    }
}

impl CameraCapture {
    /// Opens camera number `index` at its highest frame rate and pushes decoded frames stamped
    /// by `clock`. When the camera fails later, the pusher reports the device gone.
    ///
    /// # Errors
    /// [`MediaError::Device`] when the camera cannot be opened.
    pub fn open(index: u32, pusher: FramePusher<VideoFrame>, clock: SessionClock) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bedside-camera".into())
            .spawn(move || {
                let format = RequestedFormat::new::<RgbFormat>(
                    RequestedFormatType::AbsoluteHighestFrameRate,
                );
                let mut cam = match nokhwa::Camera::new(CameraIndex::Index(index), format)
                    .and_then(|mut c| c.open_stream().map(|()| c))
                {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(dev_err(e)));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                pusher.set_device_present(true);
                while !stop2.load(Ordering::Relaxed) {
                    let frame = cam.frame().and_then(|b| b.decode_image::<RgbFormat>());
                    match frame {
                        Ok(img) => {
                            let (w, h) = img.dimensions();
                            if let Ok(f) = VideoFrame::from_rgb(w, h, img.as_raw(), clock()) {
                                pusher.push(f);
                            }
                        }
                        Err(_) => {
                            pusher.set_device_present(false);
                            break;
                        }
                    }
                }
                let _ = cam.stop_stream();
            })
            .map_err(dev_err)?;
        match ready_rx.recv_timeout(std::time::Duration::from_micros(FRAME_US * 250)) {
            Ok(Ok(())) => Ok(Self {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                Err(MediaError::Device("camera did not open within 5 s".into()))
            }
        }
    }
}

impl Drop for CameraCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The picked camera as the call's [`super::VideoSource`]: capture runs while this lives
/// (hand it to `ClientHandle::set_video_source`).
pub struct CameraSource {
    _capture: CameraCapture,
    frames: super::source::PushedSource<VideoFrame>,
}

impl std::fmt::Debug for CameraSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CameraSource").finish_non_exhaustive()
    }
}

impl super::VideoSource for CameraSource {
    fn poll_video(&mut self, _now_us: u64) -> super::Capture<VideoFrame> {
        self.frames.poll()
    }
}

/// Opens camera `id` (an id from [`enumerate`]) for the call, stamping frames with `clock`.
///
/// # Errors
/// [`MediaError::Device`] for an id that is not a camera index, or a camera that will not open.
pub fn open_camera(id: &str, clock: SessionClock) -> Result<CameraSource> {
    let index: u32 = id
        .parse()
        .map_err(|_| MediaError::Device(format!("no camera {id}")))?;
    let (pusher, frames) = super::push_source(4);
    let capture = CameraCapture::open(index, pusher, clock)?;
    Ok(CameraSource {
        _capture: capture,
        frames,
    })
}

/// The picked microphone as the call's [`super::AudioSource`]: capture runs while this lives.
pub struct MicrophoneSource {
    _microphone: Microphone,
    frames: super::source::PushedSource<AudioFrame>,
}

impl std::fmt::Debug for MicrophoneSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicrophoneSource").finish_non_exhaustive()
    }
}

impl super::AudioSource for MicrophoneSource {
    fn poll_audio(&mut self, _now_us: u64) -> super::Capture<AudioFrame> {
        self.frames.poll()
    }
}

/// Opens microphone `id` (or the default one) for the call.
///
/// # Errors
/// [`MediaError::Device`] when there is no such microphone or it cannot run at 48 kHz.
pub fn open_microphone(id: Option<&str>, clock: SessionClock) -> Result<MicrophoneSource> {
    let (pusher, frames) = super::push_source(10);
    let microphone = Microphone::open(id, pusher, clock)?;
    Ok(MicrophoneSource {
        _microphone: microphone,
        frames,
    })
}

/// Plays the call's decoded audio (`Received::audio`) on speaker `id` (or the default one)
/// until the returned [`Speaker`] is dropped; silence when nothing is queued.
///
/// # Errors
/// [`MediaError::Device`] when there is no such speaker or it cannot run at 48 kHz.
pub fn open_speaker(
    id: Option<&str>,
    audio: Arc<super::PlayedAudio>,
    clock: SessionClock,
) -> Result<Speaker> {
    Speaker::open(
        id,
        move |now_us| {
            audio.pop().unwrap_or_else(|| AudioFrame {
                samples: Box::new([0; FRAME_SAMPLES]),
                capture_us: now_us,
            })
        },
        clock,
    )
}
