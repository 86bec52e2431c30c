//! The eframe app: drains events into the model at the start of each frame, uploads the newest
//! remote frame if there is one, draws the view, and carries out the commands it returned.
//! Anything slow (server start-up, HTTP, the call client) runs on the tokio runtime.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use bedside_client_core::call::{CallState, UserCommand};
use bedside_client_core::driver::ClientHandle;
use bedside_client_core::media::LatestFrame;
use bedside_client_core::pipeline::{Received, SendStats};
use bedside_protocol::ParticipantId;
use tokio::sync::oneshot;

use crate::clinic::{self, AppMsg, DoctorJoin, NetOptions, UiSender};
use crate::model::{AppModel, UiCommand};
use crate::video::i420_to_image;
use crate::view::{Drafts, VideoView, view};

/// How the app was started (from the command line).
pub struct AppOptions {
    /// Where the local clinic keeps its store.
    pub data_dir: PathBuf,
    /// Start a local clinic and a simulated patient at once.
    pub demo: bool,
    /// Join this consultation at once (ws URL, token, invite code).
    pub connect: Option<DoctorJoin>,
    pub net: NetOptions,
    /// Where to write a small JSON status (no names, no secrets) twice a second, for tests.
    pub status_file: Option<PathBuf>,
    /// Testing only: admit whoever waits, through the same command path as the Admit button.
    pub auto_admit: bool,
}

struct Session {
    handle: ClientHandle,
    received: Received,
    sent: Arc<SendStats>,
    /// The self view's last frame uploaded.
    preview_seen: u64,
}

struct RemoteSink {
    peer: ParticipantId,
    sink: Arc<LatestFrame>,
    seen: u64,
}

pub struct DesktopApp {
    rt: tokio::runtime::Handle,
    ctx: egui::Context,
    options: AppOptions,
    rx: Receiver<AppMsg>,
    ui_tx: UiSender,
    model: AppModel,
    drafts: Drafts,
    video: VideoView,
    session: Option<Session>,
    remote: Option<RemoteSink>,
    clinic_stop: Option<oneshot::Sender<()>>,
    admitted: HashSet<ParticipantId>,
    status_written: Option<Instant>,
}

impl DesktopApp {
    pub fn new(ctx: egui::Context, rt: tokio::runtime::Handle, mut options: AppOptions) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let waker = ctx.clone();
        let ui_tx = UiSender::new(tx, move || waker.request_repaint());
        let connect = options.connect.take();
        let demo = options.demo;
        let mut app = DesktopApp {
            rt,
            ctx,
            options,
            rx,
            ui_tx,
            model: AppModel::default(),
            drafts: Drafts::default(),
            video: VideoView::default(),
            session: None,
            remote: None,
            clinic_stop: None,
            admitted: HashSet::new(),
            status_written: None,
        };
        if let Some(join) = connect {
            app.connect(join);
        } else if demo {
            app.execute(UiCommand::StartLocalClinic);
        }
        app
    }

    fn connect(&mut self, join: DoctorJoin) {
        self.model.busy = Some("Connecting to the clinic…".into());
        let (ui, net) = (self.ui_tx.clone(), self.options.net.clone());
        let demo = self.options.demo;
        self.rt.spawn(async move {
            if demo && let Some(code) = join.invite_code.clone() {
                clinic::spawn_demo_patient(join.ws_url.clone(), code, &net);
            }
            if let Err(e) = clinic::start_doctor(join, &net, &ui) {
                ui.send(AppMsg::Failed(format!("{e:#}")));
            }
        });
    }

    fn execute(&mut self, cmd: UiCommand) {
        match cmd {
            UiCommand::StartLocalClinic => {
                self.model.busy = Some("Starting the local clinic…".into());
                self.model.error = None;
                let (ui, net) = (self.ui_tx.clone(), self.options.net.clone());
                let data_dir = self.options.data_dir.clone();
                let demo = self.options.demo;
                self.rt.spawn(async move {
                    let result = async {
                        let join = clinic::start_local_clinic(data_dir, &ui).await?;
                        if demo && let Some(code) = join.invite_code.clone() {
                            clinic::spawn_demo_patient(join.ws_url.clone(), code, &net);
                        }
                        clinic::start_doctor(join, &net, &ui)
                    }
                    .await;
                    if let Err(e) = result {
                        ui.send(AppMsg::Failed(format!("{e:#}")));
                    }
                });
            }
            UiCommand::ConnectToClinic { ws_url, token } => {
                self.model.error = None;
                self.connect(DoctorJoin {
                    ws_url,
                    token,
                    invite_code: None,
                });
            }
            UiCommand::Copy(text) => self.ctx.copy_text(text),
            UiCommand::SendChat(text) => {
                if let Some(session) = &self.session {
                    session.handle.send(UserCommand::SendChat(text));
                }
            }
            UiCommand::Call(cmd) => {
                if let Some(session) = &self.session {
                    session.handle.send(cmd);
                }
            }
            UiCommand::Reset => {
                if let Some(session) = self.session.take() {
                    session.handle.send(UserCommand::Leave);
                }
                self.clinic_stop = None;
                self.remote = None;
                self.video = VideoView::default();
                self.admitted.clear();
                self.model = AppModel::default();
            }
        }
    }

    /// Applies everything the background tasks sent since the last frame. Never waits.
    fn drain(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                AppMsg::Session {
                    handle,
                    received,
                    sent,
                    clinic_label,
                    invite_code,
                } => {
                    let waker = self.ctx.clone();
                    sent.preview.set_waker(move || waker.request_repaint());
                    self.session = Some(Session {
                        handle,
                        received,
                        sent,
                        preview_seen: 0,
                    });
                    self.model.has_session = true;
                    self.model.clinic_label = Some(clinic_label);
                    self.model.invite_code = invite_code;
                    self.model.busy = Some("Joining…".into());
                }
                AppMsg::LocalClinic { stop } => self.clinic_stop = Some(stop),
                AppMsg::Event(event) => self.model.apply(event),
                AppMsg::Failed(message) => {
                    self.model.busy = None;
                    self.model.error = Some(message);
                }
            }
        }
    }

    /// Uploads the self view's newest frame if it changed.
    fn update_preview(&mut self) {
        let Some(session) = &mut self.session else {
            return;
        };
        let Some((seq, frame)) = session.sent.preview.newer_than(session.preview_seen) else {
            return;
        };
        session.preview_seen = seq;
        if show_frame(
            &self.ctx,
            &mut self.video.local,
            "self-view",
            frame.as_deref(),
        ) {
            self.model.self_frames_shown += 1;
        }
    }

    /// Uploads the remote participant's newest frame if it changed since the last one shown.
    fn update_video(&mut self) {
        let Some(peer) = self.model.remote().map(|p| p.participant_id.clone()) else {
            self.remote = None;
            self.video.remote = None;
            return;
        };
        if self.remote.as_ref().is_none_or(|r| r.peer != peer) {
            self.video.remote = None;
            self.remote = self
                .session
                .as_ref()
                .and_then(|s| s.received.video(&peer))
                .map(|sink| {
                    let waker = self.ctx.clone();
                    sink.set_waker(move || waker.request_repaint());
                    RemoteSink {
                        peer,
                        sink,
                        seen: 0,
                    }
                });
            if self.remote.is_none() {
                // The sink appears with the first media; look again soon.
                self.ctx.request_repaint_after(Duration::from_millis(250));
                return;
            }
        }
        let Some(remote) = &mut self.remote else {
            return;
        };
        if let Some((seq, frame)) = remote.sink.newer_than(remote.seen) {
            remote.seen = seq;
            if show_frame(
                &self.ctx,
                &mut self.video.remote,
                "remote-video",
                frame.as_deref(),
            ) {
                self.model.remote_frames_shown += 1;
                self.model.remote_size = frame.map(|f| (f.width(), f.height()));
            }
        }
    }

    fn auto_admit(&mut self) -> Vec<UiCommand> {
        if !self.options.auto_admit || !matches!(self.model.call_state, CallState::WaitingForPeers)
        {
            return Vec::new();
        }
        let mut out = Vec::new();
        for p in &self.model.waiting {
            if self.admitted.insert(p.participant_id.clone()) {
                out.push(UiCommand::Call(UserCommand::Admit(
                    p.participant_id.clone(),
                )));
            }
        }
        out
    }

    fn write_status(&mut self) {
        let Some(path) = &self.options.status_file else {
            return;
        };
        if self
            .status_written
            .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
        {
            return;
        }
        self.status_written = Some(Instant::now());
        let tmp = path.with_extension("tmp");
        let body = self.model.status_json().to_string();
        if std::fs::write(&tmp, body)
            .and_then(|()| std::fs::rename(&tmp, path))
            .is_err()
        {
            tracing::warn!("could not write the status file");
        }
        self.ctx.request_repaint_after(Duration::from_millis(500));
    }

    /// One frame, also usable without eframe (from a test harness).
    pub fn frame(&mut self, ui: &mut egui::Ui) {
        self.drain();
        self.update_video();
        self.update_preview();
        let mut commands = self.auto_admit();
        commands.extend(view(ui, &self.model, &mut self.drafts, &self.video));
        for cmd in commands {
            self.execute(cmd);
        }
        self.write_status();
        if self.model.screen() == crate::model::Screen::Consultation
            && !self.model.waiting.is_empty()
        {
            // The "waiting N s" counters tick.
            self.ctx.request_repaint_after(Duration::from_secs(1));
        }
    }

    pub fn model(&self) -> &AppModel {
        &self.model
    }
}

/// Uploads `frame` into the texture `slot` (created on first use), or empties the slot when
/// the video went away. True when a frame was uploaded.
fn show_frame(
    ctx: &egui::Context,
    slot: &mut Option<egui::TextureHandle>,
    name: &str,
    frame: Option<&bedside_client_core::media::VideoFrame>,
) -> bool {
    let Some(frame) = frame else {
        *slot = None;
        return false;
    };
    let image = i420_to_image(frame);
    match slot {
        Some(tex) => tex.set(image, egui::TextureOptions::LINEAR),
        None => *slot = Some(ctx.load_texture(name, image, egui::TextureOptions::LINEAR)),
    }
    true
}

impl eframe::App for DesktopApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.frame(ui);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        if let Some(session) = self.session.take() {
            session.handle.send(UserCommand::Leave);
        }
        self.clinic_stop = None;
    }
}
