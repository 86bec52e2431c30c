//! The client object: commands in, pushed capture in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bedside_client_core::call::UserCommand;
use bedside_client_core::driver::{self, ClientHandle, ClientOptions};
use bedside_client_core::engine::EngineSettings;
use bedside_client_core::media::frame::{AudioFrame, FRAME_SAMPLES, Rotation, VideoFrame};
use bedside_client_core::media::source::{FramePusher, push_source};
use bedside_client_core::pipeline::{MediaSources, wall_us};
use bedside_protocol::JoinAuth;

use crate::error::BedsideError;
use crate::listener::{ClientListener, ListenerHandle, ListenerSlot, dispatch, dispatch_audio};
use crate::types::ClientOptionsFfi;

/// Pushed video frames queued at most (newest wins).
const VIDEO_QUEUE: usize = 2;
/// Pushed 20 ms audio frames queued at most.
const AUDIO_QUEUE: usize = 10;

/// One patient's connection to a clinic. Every method returns at once; what happens is reported
/// to the [`ClientListener`]. Dropping the client leaves the consultation and stops its threads.
#[derive(uniffi::Object)]
pub struct BedsideClient {
    handle: ClientHandle,
    /// Replaced when the app switches cameras.
    video: Mutex<FramePusher<VideoFrame>>,
    audio: FramePusher<AudioFrame>,
    listeners: Arc<ListenerSlot>,
    /// Stops the audio delivery thread.
    stop_audio: Arc<AtomicBool>,
    runtime: Option<tokio::runtime::Runtime>,
}

#[uniffi::export]
impl BedsideClient {
    /// A client for the clinic at `server_url` (`wss://clinic.example/ws`). It owns its own
    /// runtime (two worker threads) and does nothing until [`BedsideClient::join_with_invite`].
    #[uniffi::constructor]
    pub fn new(server_url: String, options: ClientOptionsFfi) -> Result<Arc<Self>, BedsideError> {
        if !(server_url.starts_with("ws://") || server_url.starts_with("wss://")) {
            return Err(BedsideError::invalid(format!(
                "server URL must start with ws:// or wss://, got {server_url:?}"
            )));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bedside")
            .enable_all()
            .build()
            .map_err(BedsideError::internal)?;
        let mut core = ClientOptions::new(server_url);
        core.engine = EngineSettings {
            udp_addrs: options.udp_addrs,
            relay_only: options.relay_only,
            ..EngineSettings::default()
        };
        core.video.width = options.video_width;
        core.video.height = options.video_height;
        core.video.bitrate_bps = options.video_bitrate_bps;
        let (video, video_source) = push_source::<VideoFrame>(VIDEO_QUEUE);
        let (audio, audio_source) = push_source::<AudioFrame>(AUDIO_QUEUE);
        let sources = MediaSources {
            video: Box::new(video_source),
            audio: Box::new(audio_source),
        };
        let client = {
            let _entered = runtime.enter();
            driver::start(core, sources)?
        };
        let listeners = Arc::new(ListenerSlot::default());
        let stop_audio = Arc::new(AtomicBool::new(false));
        {
            let (audio, slot, stop) = (
                client.received.audio().clone(),
                listeners.clone(),
                stop_audio.clone(),
            );
            std::thread::Builder::new()
                .name("bedside-audio-out".into())
                .spawn(move || dispatch_audio(audio, slot, stop))
                .map_err(BedsideError::internal)?;
        }
        runtime.spawn(dispatch(client.events, client.received, listeners.clone()));
        Ok(Arc::new(BedsideClient {
            handle: client.handle,
            video: Mutex::new(video),
            audio,
            listeners,
            stop_audio,
            runtime: Some(runtime),
        }))
    }

    /// Installs `listener` (replacing any other) until the returned handle is dropped or
    /// cancelled. Keep the handle.
    pub fn set_listener(&self, listener: Arc<dyn ClientListener>) -> Arc<ListenerHandle> {
        Arc::new(self.listeners.install(listener))
    }

    /// Joins the consultation as a patient with the invite code from the link.
    pub fn join_with_invite(&self, code: String, display_name: Option<String>) {
        // Never the code or the name: the logs hold no patient data.
        tracing::info!("joining a consultation with an invite code");
        self.handle.send(UserCommand::Join {
            auth: JoinAuth::InviteCode { code },
            display_name,
        });
    }

    pub fn leave(&self) {
        self.handle.send(UserCommand::Leave);
    }

    pub fn set_muted(&self, muted: bool) {
        self.handle.send(UserCommand::SetMicrophoneMuted(muted));
    }

    pub fn set_camera_enabled(&self, enabled: bool) {
        self.handle.send(UserCommand::SetCameraEnabled(enabled));
    }

    pub fn set_audio_only(&self, audio_only: bool) {
        self.handle.send(UserCommand::SetAudioOnly(audio_only));
    }

    /// The OS reported a network change (Wi-Fi to cellular...): client-core reconnects now.
    pub fn network_changed(&self) {
        self.handle.send(UserCommand::NetworkChanged);
    }

    /// The app went to (or came back from) the background. In the background no video is sent
    /// (the system takes the camera) while audio goes on, given the platform's background audio
    /// mode (iOS `voip`/`audio`, an Android foreground service); coming back resumes video and
    /// checks the signaling link at once.
    pub fn app_backgrounded(&self, backgrounded: bool) {
        self.handle.send(UserCommand::SetBackgrounded(backgrounded));
    }

    /// Sends a chat line to the clinicians in the call, end to end over the data channel
    /// (nothing is stored). It comes back through `on_chat` (outgoing) once on its way, or
    /// `on_chat_not_delivered` when nobody is connected.
    ///
    /// # Errors
    /// `InvalidArgument` for blank text or text over 4096 bytes.
    pub fn send_chat(&self, text: String) -> Result<(), BedsideError> {
        bedside_protocol::chat::check_chat_text(&text).map_err(BedsideError::invalid)?;
        self.handle.send(UserCommand::SendChat(text));
        Ok(())
    }

    /// The app switched cameras (front to back): frames still queued from the old camera are
    /// dropped and the next one sent is a keyframe. Push the new camera's frames as before.
    pub fn switch_camera(&self) {
        let (pusher, source) = push_source::<VideoFrame>(VIDEO_QUEUE);
        *self.video.lock().unwrap_or_else(|p| p.into_inner()) = pusher;
        self.handle.set_video_source(Box::new(source));
    }

    /// One captured camera picture, I420 tightly packed (`y`: width*height bytes, `u` and `v`:
    /// width/2*height/2 each; even dimensions), to be displayed rotated clockwise by
    /// `rotation_degrees` (0, 90, 180 or 270). Frames of another size than the encoder's are
    /// scaled. Call from the capture thread; never blocks.
    pub fn push_video_frame(
        &self,
        width: u32,
        height: u32,
        y: Vec<u8>,
        u: Vec<u8>,
        v: Vec<u8>,
        rotation_degrees: u16,
    ) -> Result<(), BedsideError> {
        let rotation = Rotation::from_degrees(rotation_degrees).ok_or_else(|| {
            BedsideError::invalid(format!(
                "rotation must be 0, 90, 180 or 270, got {rotation_degrees}"
            ))
        })?;
        let mut frame = VideoFrame::new(width, height, y, u, v, wall_us())?;
        frame.rotation = rotation;
        self.video
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(frame);
        Ok(())
    }

    /// 20 ms of microphone audio: exactly 960 samples, 48 kHz mono. Never blocks.
    pub fn push_audio_samples(&self, samples: Vec<i16>) -> Result<(), BedsideError> {
        if samples.len() != FRAME_SAMPLES {
            return Err(BedsideError::invalid(format!(
                "audio must come in {FRAME_SAMPLES} samples, got {}",
                samples.len()
            )));
        }
        self.audio
            .push(AudioFrame::from_slice(&samples, wall_us())?);
        Ok(())
    }

    /// Whether a camera is open (`false`: permission revoked, camera taken by another app).
    /// Pushing a frame also marks it present.
    pub fn set_camera_present(&self, present: bool) {
        self.video
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_device_present(present);
    }

    /// Whether a microphone is open. Pushing samples also marks it present.
    pub fn set_microphone_present(&self, present: bool) {
        self.audio.set_device_present(present);
    }
}

impl Drop for BedsideClient {
    /// Sends `Leave` and stops the runtime without waiting (the drop may happen on one of its
    /// own threads). To leave cleanly, call `leave()` and wait for `Ended` before dropping.
    fn drop(&mut self) {
        self.handle.send(UserCommand::Leave);
        self.stop_audio.store(true, Ordering::Relaxed);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::default_client_options;

    fn client() -> Arc<BedsideClient> {
        BedsideClient::new("ws://127.0.0.1:9/ws".into(), default_client_options()).unwrap()
    }

    #[test]
    fn bad_arguments_are_invalid_argument_errors() {
        let err = BedsideClient::new("https://x".into(), default_client_options()).err();
        assert!(matches!(err, Some(BedsideError::InvalidArgument { .. })));
        let c = client();
        let plane = |n: usize| vec![0u8; n];
        assert!(
            c.push_video_frame(4, 2, plane(8), plane(2), plane(2), 90)
                .is_ok()
        );
        for (w, h, y, rot) in [(4, 2, 7, 0), (3, 2, 6, 0), (4, 2, 8, 45)] {
            let r = c.push_video_frame(w, h, plane(y), plane(2), plane(2), rot);
            assert!(
                matches!(r, Err(BedsideError::InvalidArgument { .. })),
                "{w}x{h} {y} {rot}"
            );
        }
        assert!(c.push_audio_samples(vec![0; 960]).is_ok());
        assert!(matches!(
            c.send_chat("  ".into()),
            Err(BedsideError::InvalidArgument { .. })
        ));
        assert!(matches!(
            c.send_chat("x".repeat(5000)),
            Err(BedsideError::InvalidArgument { .. })
        ));
        assert!(c.send_chat("hello".into()).is_ok());
        assert!(matches!(
            c.push_audio_samples(vec![0; 959]),
            Err(BedsideError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn commands_before_join_and_drop_do_not_panic() {
        let c = client();
        c.set_muted(true);
        c.set_camera_enabled(false);
        c.set_audio_only(true);
        c.network_changed();
        c.app_backgrounded(true);
        c.switch_camera();
        c.set_camera_present(false);
        c.leave();
        drop(c);
    }
}
