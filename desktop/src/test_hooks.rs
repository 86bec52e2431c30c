//! What the end-to-end test (`tests/e2e_xvfb.rs`) drives the real binary with: a small JSON
//! status written twice a second (no names, no secrets), admitting whoever waits, and sharing
//! the entire screen once connected, each through the same command path as the buttons.
//!
//! Only with the `test-hooks` feature, which only the desktop's own tests enable (through the
//! crate's dev-dependency on itself): the app a doctor installs has none of it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bedside_client_core::call::{CallState, UserCommand};
use bedside_client_core::pipeline::SendStats;
use bedside_protocol::ParticipantId;

use crate::model::{AppModel, UiCommand};
use crate::share;

/// The test flags of one run (`--status-file`, `--auto-admit`, `--share-screen`).
#[derive(Debug, Default)]
pub struct TestHooks {
    status_file: Option<PathBuf>,
    auto_admit: bool,
    share_screen: bool,
    admitted: HashSet<ParticipantId>,
    status_written: Option<Instant>,
}

impl TestHooks {
    pub fn new(status_file: Option<PathBuf>, auto_admit: bool, share_screen: bool) -> Self {
        TestHooks {
            status_file,
            auto_admit,
            share_screen,
            ..Default::default()
        }
    }

    /// A new call starts: whoever waits in it has not been admitted yet.
    pub fn session_started(&mut self) {
        self.admitted.clear();
    }

    /// The commands this frame, before the view's: admit each newcomer once; share the screen
    /// once connected (once per run).
    pub fn commands(&mut self, model: &AppModel) -> Vec<UiCommand> {
        let mut out = Vec::new();
        if self.auto_admit && matches!(model.call_state, CallState::WaitingForPeers) {
            for p in &model.waiting {
                if self.admitted.insert(p.participant_id.clone()) {
                    out.push(UiCommand::Call(UserCommand::Admit(
                        p.participant_id.clone(),
                    )));
                }
            }
        }
        if self.share_screen && matches!(model.call_state, CallState::Connected) {
            self.share_screen = false;
            out.push(UiCommand::ShareScreen(share::ENTIRE_SCREEN.into()));
        }
        out
    }

    /// Writes the status at most twice a second (to a temporary file, then renamed, so a
    /// reader never sees half of it), with what the call's send path counted.
    pub fn write_status(
        &mut self,
        model: &AppModel,
        sent: Option<&SendStats>,
        ctx: &egui::Context,
    ) {
        let Some(path) = &self.status_file else {
            return;
        };
        if self
            .status_written
            .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
        {
            return;
        }
        self.status_written = Some(Instant::now());
        let mut body = model.status_json();
        if let (Some(sent), Some(map)) = (sent, body.as_object_mut()) {
            let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            map.insert(
                "audio_frames_encoded".into(),
                n(&sent.audio_frames_encoded).into(),
            );
            map.insert(
                "audio_frames_too_fast".into(),
                n(&sent.audio_frames_too_fast).into(),
            );
            map.insert(
                "video_frames_encoded".into(),
                n(&sent.video_frames_encoded).into(),
            );
        }
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, body.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .is_err()
        {
            tracing::warn!("could not write the status file");
        }
        ctx.request_repaint_after(Duration::from_millis(500));
    }
}
