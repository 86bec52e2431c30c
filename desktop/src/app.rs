//! The eframe app: drains events into the model at the start of each frame, uploads each other
//! participant's newest frame where there is one, draws the view, and carries out the commands it returned.
//! Anything slow (server start-up, HTTP, the call client) runs on the tokio runtime.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use bedside_client_core::call::UserCommand;
use bedside_client_core::driver::ClientHandle;
use bedside_client_core::media::LatestFrame;
use bedside_client_core::pipeline::{Received, SendStats};
use bedside_protocol::ParticipantId;
use tokio::sync::oneshot;

use crate::clinic::{self, AdminApi, AppMsg, DoctorJoin, NetOptions, UiSender};
use crate::devices::{self, DeviceLists};
use crate::model::{AppModel, UiCommand};
use crate::settings::{self, SecretStore, Settings, SettingsFile};
use crate::share;
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
    /// What the end-to-end test drives the app with (feature `test-hooks`).
    #[cfg(feature = "test-hooks")]
    pub test_hooks: crate::test_hooks::TestHooks,
    /// Where the settings file lives.
    pub settings_dir: PathBuf,
    /// Where the doctor's token is remembered.
    pub secrets: Arc<dyn SecretStore>,
    /// Sign in to this remote clinic at once: its address and a doctor credential.
    pub sign_in: Option<(String, String)>,
    /// Once signed in, open this consultation (a link from the clinic's schedule).
    pub open_consultation: Option<bedside_protocol::ConsultationId>,
}

struct Session {
    handle: ClientHandle,
    received: Received,
    sent: Arc<SendStats>,
    /// The self view's last frame uploaded.
    preview_seen: u64,
}

/// One participant's decoded video, and the newest frame of it uploaded so far.
struct RemoteSink {
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
    /// The number of the latest session started ([`clinic::start_doctor`]); messages of
    /// earlier ones are ignored.
    session_number: u64,
    /// Every other participant's video (a tile each in a group consult).
    remote: HashMap<ParticipantId, RemoteSink>,
    clinic_stop: Option<oneshot::Sender<()>>,
    /// The local clinic's administration API (today's consultations).
    admin: Option<AdminApi>,
    consultations_fetched: Option<Instant>,
    settings_file: SettingsFile,
    settings: Settings,
    /// Keeps the speaker playing; dropping it stops the playback thread.
    speaker: Option<std::sync::mpsc::Sender<()>>,
    /// `model.arrivals` when the doctor was last alerted to a waiting patient.
    alerted_arrivals: u64,
}

/// How often today's consultations are fetched again while a clinic is open.
const CONSULTATIONS_REFRESH: Duration = Duration::from_secs(10);

impl DesktopApp {
    pub fn new(ctx: egui::Context, rt: tokio::runtime::Handle, mut options: AppOptions) -> Self {
        crate::view::apply_style(&ctx);
        let (tx, rx) = std::sync::mpsc::channel();
        let waker = ctx.clone();
        let ui_tx = UiSender::new(tx, move || waker.request_repaint());
        let connect = options.connect.take();
        let sign_in = options.sign_in.take();
        let demo = options.demo;
        let mut settings_file = SettingsFile::in_dir(&options.settings_dir);
        let mut model = AppModel {
            utc_offset_secs: crate::attention::local_utc_offset_secs(),
            ..AppModel::default()
        };
        let settings = settings_file.load().unwrap_or_else(|e| {
            model.error = Some(format!("{e}. It was left as it is; defaults are used."));
            Settings::default()
        });
        let mut drafts = Drafts {
            ws_url: settings.server_url.clone(),
            ..Drafts::default()
        };
        if !settings.server_url.is_empty()
            && let Some(token) = options.secrets.token(&settings.server_url)
        {
            drafts.token = token;
            model.keyring_note = Some("Token remembered in the system keyring.".into());
        }
        let lister = ui_tx.clone();
        std::thread::Builder::new()
            .name("bedside-devices".into())
            .spawn(move || lister.send(AppMsg::Devices(DeviceLists::enumerate())))
            .expect("spawn the device lister");
        let mut app = DesktopApp {
            rt,
            ctx,
            options,
            rx,
            ui_tx,
            model,
            drafts,
            video: VideoView::default(),
            session: None,
            session_number: 0,
            remote: HashMap::new(),
            clinic_stop: None,
            admin: None,
            consultations_fetched: None,
            settings_file,
            settings,
            speaker: None,
            alerted_arrivals: 0,
        };
        if let Some(join) = connect {
            app.connect(join);
        } else if let Some((address, credential)) = sign_in {
            app.execute(UiCommand::SignIn {
                address,
                credential,
            });
        } else if demo {
            app.execute(UiCommand::StartLocalClinic);
        } else if app.drafts.token.starts_with(clinic::CREDENTIAL_PREFIX) {
            // Signed in before: the credential is in the keyring, so sign in again at once.
            app.execute(UiCommand::SignIn {
                address: app.drafts.ws_url.clone(),
                credential: app.drafts.token.clone(),
            });
        }
        app
    }

    fn connect(&mut self, join: DoctorJoin) {
        self.model.busy = Some("Connecting to the clinic…".into());
        let (ui, net) = (self.ui_tx.clone(), self.options.net.clone());
        let demo = self.options.demo;
        self.session_number += 1;
        let number = self.session_number;
        self.rt.spawn(async move {
            if demo && let Some(code) = join.invite_code.clone() {
                clinic::spawn_demo_patient(join.ws_url.clone(), code, &net);
            }
            if let Err(e) = clinic::start_doctor(number, join, &net, &ui) {
                ui.send(AppMsg::Failed(format!("{e:#}")));
            }
        });
    }

    /// Carries out one command (what a click produced).
    pub fn execute(&mut self, cmd: UiCommand) {
        match cmd {
            UiCommand::StartLocalClinic => {
                self.model.busy = Some("Starting the local clinic…".into());
                self.model.error = None;
                let (ui, net) = (self.ui_tx.clone(), self.options.net.clone());
                let data_dir = self.options.data_dir.clone();
                let demo = self.options.demo;
                self.session_number += 1;
                let number = self.session_number;
                self.rt.spawn(async move {
                    let result = async {
                        let join = clinic::start_local_clinic(data_dir, &ui).await?;
                        if demo && let Some(code) = join.invite_code.clone() {
                            clinic::spawn_demo_patient(join.ws_url.clone(), code, &net);
                        }
                        clinic::start_doctor(number, join, &net, &ui)
                    }
                    .await;
                    if let Err(e) = result {
                        ui.send(AppMsg::Failed(format!("{e:#}")));
                    }
                });
            }
            UiCommand::ConnectToClinic { ws_url, token } => {
                self.model.error = None;
                self.settings.server_url.clone_from(&ws_url);
                self.save_settings();
                self.model.keyring_note =
                    Some(match self.options.secrets.save_token(&ws_url, &token) {
                        Ok(()) => "Token remembered in the system keyring.".into(),
                        Err(why) => format!("The token is not remembered: {why}."),
                    });
                self.connect(DoctorJoin {
                    ws_url,
                    token,
                    invite_code: None,
                    invite_url: None,
                    consultation_id: None,
                });
            }
            UiCommand::SignIn {
                address,
                credential,
            } => {
                self.model.error = None;
                let admin = match AdminApi::remote(&address, &credential) {
                    Ok(admin) => admin,
                    Err(e) => {
                        self.model.error = Some(format!("{e:#}"));
                        return;
                    }
                };
                self.settings.server_url.clone_from(&address);
                self.save_settings();
                self.model.keyring_note = Some(
                    match self.options.secrets.save_token(&address, &credential) {
                        Ok(()) => "Credential remembered in the system keyring.".into(),
                        Err(why) => format!("The credential is not remembered: {why}."),
                    },
                );
                self.model.busy = Some("Signing in to the clinic…".into());
                let ui = self.ui_tx.clone();
                self.rt.spawn(async move {
                    if let Err(e) = clinic::sign_in(admin, &ui).await {
                        ui.send(AppMsg::Failed(format!("{e:#}")));
                    }
                });
            }
            UiCommand::ChooseCamera(id) => {
                self.settings.camera = Some(id.clone());
                self.save_settings();
                self.model.camera = id;
                if self.model.sharing.is_none() {
                    // While sharing, the camera comes back when sharing stops.
                    self.open_camera();
                }
            }
            UiCommand::ListShareable => {
                let ui = self.ui_tx.clone();
                self.rt.spawn_blocking(move || match share::list() {
                    Ok(list) => ui.send(AppMsg::Shareable(list)),
                    Err(why) => ui.send(AppMsg::Failed(why)),
                });
            }
            UiCommand::ShareScreen(id) => {
                if self.session.is_none() {
                    return;
                }
                let known = self.model.shareable.iter().find(|c| c.id == id);
                let name = known.map(|c| c.name.clone());
                let ui = self.ui_tx.clone();
                self.rt.spawn_blocking(move || {
                    let name = name.or_else(|| {
                        let list = share::list().ok()?;
                        list.into_iter().find(|c| c.id == id).map(|c| c.name)
                    });
                    match share::open(&id) {
                        Ok(source) => ui.send(AppMsg::Sharing(
                            source,
                            name.unwrap_or_else(|| "your screen".into()),
                        )),
                        Err(why) => ui.send(AppMsg::Failed(why)),
                    }
                });
            }
            UiCommand::Pin(peer) => self.model.pinned = peer,
            UiCommand::StopSharing => {
                if self.model.sharing.take().is_some() {
                    // The chosen camera (or the test pattern) replaces the capture, which
                    // stops when the sender drops it.
                    self.open_camera();
                }
            }
            UiCommand::ChooseMicrophone(id) => {
                self.settings.microphone = Some(id.clone());
                self.save_settings();
                self.model.microphone = id;
                self.open_microphone();
            }
            UiCommand::ChooseSpeaker(id) => {
                self.settings.speaker = Some(id.clone());
                self.save_settings();
                self.model.speaker = id;
                self.open_speaker();
            }
            UiCommand::RefreshConsultations => self.fetch_consultations(),
            UiCommand::SignOut => self.sign_out(),
            UiCommand::NewConsultation | UiCommand::OpenConsultation(_) => {
                let Some(admin) = self.admin.clone() else {
                    return;
                };
                let ui = self.ui_tx.clone();
                self.rt.spawn(async move {
                    let join = match cmd {
                        UiCommand::OpenConsultation(id) => admin.open(id).await,
                        _ => admin.create().await,
                    };
                    match join {
                        Ok(join) => ui.send(AppMsg::Switch(join)),
                        Err(e) => ui.send(AppMsg::Failed(format!("{e:#}"))),
                    }
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
                self.end_session();
                if self.admin.as_ref().is_some_and(|a| a.doctor) {
                    // Still signed in to the remote clinic: back to today's list.
                    self.model = self.model.next_session();
                    self.fetch_consultations();
                    return;
                }
                self.clinic_stop = None;
                self.admin = None;
                // The clinic is gone, and its consultations with it.
                self.model = AppModel {
                    consultations: None,
                    clinic_label: None,
                    ..self.model.next_session()
                };
            }
        }
    }

    /// Leaves the call, revokes the doctor credential on the clinic (in the background) and
    /// forgets it here: the keyring entry and the draft go, and the app is back at the connect
    /// screen. The credential is forgotten even when the clinic cannot be reached.
    fn sign_out(&mut self) {
        if !self.admin.as_ref().is_some_and(|a| a.doctor) {
            return;
        }
        let Some(admin) = self.admin.take() else {
            return;
        };
        self.end_session();
        let address = self.settings.server_url.clone();
        let forgotten = self.options.secrets.forget_token(&address);
        self.drafts.token.clear();
        let ui = self.ui_tx.clone();
        self.rt.spawn(async move {
            if let Err(e) = admin.sign_out().await {
                ui.send(AppMsg::Failed(format!(
                    "{e:#}; the credential is forgotten here, ask the clinic to revoke it"
                )));
            }
        });
        self.model = AppModel {
            consultations: None,
            clinic_label: None,
            signed_in: false,
            keyring_note: Some(match forgotten {
                Ok(()) => "Signed out: the credential is revoked and forgotten.".into(),
                Err(why) => format!("Signed out, but the keyring kept the credential: {why}."),
            }),
            ..self.model.next_session()
        };
    }

    /// Leaves the call (if any) and forgets what belonged to it.
    fn end_session(&mut self) {
        if let Some(session) = self.session.take() {
            session.handle.send(UserCommand::Leave);
        }
        self.speaker = None;
        self.remote.clear();
        self.video = VideoView::default();
        #[cfg(feature = "test-hooks")]
        self.options.test_hooks.session_started();
    }

    fn save_settings(&mut self) {
        if let Err(e) = self.settings_file.save(&self.settings) {
            self.model.error = Some(e.to_string());
        }
    }

    /// Puts the chosen devices to work in the session, if there is one. The client starts on
    /// the synthetic sources, so only a real camera or microphone needs opening.
    fn open_chosen_devices(&mut self) {
        if self.session.is_none() {
            return;
        }
        if self.model.camera != settings::TEST_PATTERN {
            self.open_camera();
        }
        if self.model.microphone != settings::TEST_TONE {
            self.open_microphone();
        }
        self.open_speaker();
    }

    /// Opens the chosen camera off the UI thread; the call switches to it when it is ready.
    fn open_camera(&self) {
        if self.session.is_none() {
            return;
        }
        let (id, ui) = (self.model.camera.clone(), self.ui_tx.clone());
        self.rt
            .spawn_blocking(move || match devices::open_camera(&id) {
                Ok(source) => ui.send(AppMsg::VideoSource(source)),
                Err(why) => ui.send(AppMsg::Failed(why)),
            });
    }

    fn open_microphone(&self) {
        if self.session.is_none() {
            return;
        }
        let (id, ui) = (self.model.microphone.clone(), self.ui_tx.clone());
        self.rt
            .spawn_blocking(move || match devices::open_microphone(&id) {
                Ok(source) => ui.send(AppMsg::AudioSource(source)),
                Err(why) => ui.send(AppMsg::Failed(why)),
            });
    }

    /// Plays the call's audio on the chosen speaker, from a thread that holds the device (it
    /// ends, closing the device, when `self.speaker` is dropped or replaced).
    fn open_speaker(&mut self) {
        self.speaker = None;
        let Some(session) = &self.session else {
            return;
        };
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (id, ui) = (self.model.speaker.clone(), self.ui_tx.clone());
        let audio = session.received.audio().clone();
        let spawned = std::thread::Builder::new()
            .name("bedside-speaker".into())
            .spawn(move || match devices::open_speaker(&id, audio) {
                Ok(playback) => {
                    // Blocks until the sender is dropped.
                    let _ = stopped.recv();
                    drop(playback);
                }
                Err(why) => ui.send(AppMsg::Failed(why)),
            });
        if spawned.is_ok() {
            self.speaker = Some(stop);
        }
    }

    fn fetch_consultations(&mut self) {
        let Some(admin) = self.admin.clone() else {
            return;
        };
        self.consultations_fetched = Some(Instant::now());
        let ui = self.ui_tx.clone();
        self.rt.spawn(async move {
            match admin.consultations().await {
                Ok(list) => ui.send(AppMsg::Consultations(list)),
                Err(e) => ui.send(AppMsg::Failed(format!("{e:#}"))),
            }
        });
    }

    /// Applies everything the background tasks sent since the last frame. Never waits.
    fn drain(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                AppMsg::Session { number, handle, .. } if number != self.session_number => {
                    // The doctor moved on before this session was up.
                    handle.send(UserCommand::Leave);
                }
                AppMsg::Session {
                    number: _,
                    handle,
                    received,
                    sent,
                    clinic_label,
                    invite_code,
                    invite_url,
                    consultation_id,
                } => {
                    self.model.consultation_id = consultation_id;
                    let waker = self.ctx.clone();
                    sent.preview.set_waker(move || waker.request_repaint());
                    self.session = Some(Session {
                        handle,
                        received,
                        sent,
                        preview_seen: 0,
                    });
                    self.open_chosen_devices();
                    self.model.has_session = true;
                    self.model.clinic_label = Some(clinic_label);
                    self.model.invite_code = invite_code;
                    self.model.invite_url = invite_url;
                    self.model.busy = Some("Joining…".into());
                }
                AppMsg::RemoteClinic(admin) => {
                    self.model.signed_in = true;
                    self.model.clinic_label = Some(clinic::host_of(&admin.base_url));
                    self.model.consultations = Some(Vec::new());
                    self.model.busy = None;
                    self.consultations_fetched = Some(Instant::now());
                    self.admin = Some(admin);
                    if let Some(id) = self.options.open_consultation.take() {
                        self.execute(UiCommand::OpenConsultation(id));
                    }
                }
                AppMsg::LocalClinic { stop, admin } => {
                    self.clinic_stop = Some(stop);
                    self.admin = Some(admin);
                    self.model.consultations = Some(Vec::new());
                    self.fetch_consultations();
                }
                AppMsg::Devices(lists) => {
                    let s = &self.settings;
                    self.model.camera = devices::resolve(&lists.cameras, s.camera.as_deref());
                    self.model.microphone =
                        devices::resolve(&lists.microphones, s.microphone.as_deref());
                    self.model.speaker = devices::resolve(&lists.speakers, s.speaker.as_deref());
                    self.model.devices = lists;
                    self.open_chosen_devices();
                }
                AppMsg::VideoSource(source) => {
                    if let Some(session) = &self.session {
                        session.handle.set_video_source(source);
                    }
                }
                AppMsg::Shareable(list) => self.model.shareable = list,
                AppMsg::Sharing(source, name) => {
                    if let Some(session) = &self.session {
                        session.handle.set_video_source(source);
                        self.model.sharing = Some(name);
                    }
                }
                AppMsg::AudioSource(source) => {
                    if let Some(session) = &self.session {
                        session.handle.set_audio_source(source);
                    }
                }
                AppMsg::Consultations(list) => {
                    if self.admin.is_some() {
                        self.model.consultations = Some(list);
                    }
                }
                AppMsg::Switch(join) => {
                    self.end_session();
                    self.model = self.model.next_session();
                    self.connect(join);
                    self.fetch_consultations();
                }
                AppMsg::Event(number, event) if number == self.session_number => {
                    self.model.apply(event)
                }
                AppMsg::Event(..) => {}
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

    /// Uploads every other participant's newest frame where it changed since the last one
    /// shown: the one shown large and, in a group consult, each tile.
    fn update_video(&mut self) {
        let peers: Vec<ParticipantId> = self
            .model
            .peers
            .iter()
            .map(|p| p.participant_id.clone())
            .collect();
        self.remote.retain(|peer, _| peers.contains(peer));
        self.video.remote.retain(|peer, _| peers.contains(peer));
        let main = self.model.main_peer().map(|p| p.participant_id.clone());
        let mut missing = false;
        for peer in peers {
            let remote = match self.remote.entry(peer.clone()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let Some(sink) = self.session.as_ref().and_then(|s| s.received.video(&peer))
                    else {
                        missing = true;
                        continue;
                    };
                    let waker = self.ctx.clone();
                    sink.set_waker(move || waker.request_repaint());
                    e.insert(RemoteSink { sink, seen: 0 })
                }
            };
            let Some((seq, frame)) = remote.sink.newer_than(remote.seen) else {
                continue;
            };
            remote.seen = seq;
            let mut slot = self.video.remote.remove(&peer);
            let name = format!("remote-video-{}", peer.0);
            let shown = show_frame(&self.ctx, &mut slot, &name, frame.as_deref());
            if let Some(texture) = slot {
                self.video.remote.insert(peer.clone(), texture);
            }
            if shown {
                *self.model.frames_shown.entry(peer.clone()).or_default() += 1;
                if main.as_ref() == Some(&peer) {
                    self.model.remote_frames_shown += 1;
                    self.model.remote_size = frame.map(|f| (f.width(), f.height()));
                }
            }
        }
        if missing {
            // A sink appears with the participant's first media; look again soon.
            self.ctx.request_repaint_after(Duration::from_millis(250));
        }
    }

    /// A patient arrived in the waiting room since the last alert: ask the window system for
    /// the doctor's attention (a flashing task bar entry), and chime on the speaker while no
    /// call is playing (a chime queued behind a call's audio would delay it).
    fn alert_arrivals(&mut self) {
        if self.model.arrivals <= self.alerted_arrivals {
            return;
        }
        self.alerted_arrivals = self.model.arrivals;
        self.ctx
            .send_viewport_cmd(egui::ViewportCommand::RequestUserAttention(
                egui::UserAttentionType::Informational,
            ));
        if let Some(session) = &self.session
            && self.model.peers.is_empty()
        {
            for frame in crate::attention::chime() {
                session.received.audio().push(frame);
            }
        }
    }

    /// How many times the doctor was alerted to a waiting patient.
    pub fn alerts(&self) -> u64 {
        self.alerted_arrivals
    }

    /// One frame, also usable without eframe (from a test harness).
    pub fn frame(&mut self, ui: &mut egui::Ui) {
        self.drain();
        self.alert_arrivals();
        self.update_video();
        self.update_preview();
        #[cfg(feature = "test-hooks")]
        let mut commands = self.options.test_hooks.commands(&self.model);
        #[cfg(not(feature = "test-hooks"))]
        let mut commands = Vec::new();
        commands.extend(view(ui, &self.model, &mut self.drafts, &self.video));
        for cmd in commands {
            self.execute(cmd);
        }
        #[cfg(feature = "test-hooks")]
        self.options.test_hooks.write_status(
            &self.model,
            self.session.as_ref().map(|s| &*s.sent),
            &self.ctx,
        );
        if self.admin.is_some() {
            if self
                .consultations_fetched
                .is_none_or(|t| t.elapsed() >= CONSULTATIONS_REFRESH)
            {
                self.fetch_consultations();
            }
            self.ctx.request_repaint_after(CONSULTATIONS_REFRESH);
        }
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
        self.end_session();
        self.clinic_stop = None;
    }
}
