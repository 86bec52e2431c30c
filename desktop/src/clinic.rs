//! Background work the app starts on its tokio runtime: an in-process clinic server, the REST
//! call that opens a consultation, the doctor's client and the demo patient. Everything here
//! reports back through [`AppMsg`] and a repaint; nothing here touches the UI.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bedside_client_core::call::{CallEvent, UserCommand};
use bedside_client_core::driver::{self, ClientHandle, ClientOptions};
use bedside_client_core::engine::EngineSettings;
use bedside_client_core::media::DOCTOR_TONE_HZ;
use bedside_client_core::media::{AudioSource, VideoSource};
use bedside_client_core::pipeline::{MediaSources, Received, SendStats};
use bedside_protocol::ConsultationId;
use bedside_protocol::JoinAuth;
use bedside_server::api::{ConsultationSummary, CreatedConsultation, IssuedInvite, IssuedToken};

use crate::devices::{DeviceLists, SEND_HEIGHT, SEND_WIDTH};
use bedside_server::{Config, Server};
use tokio::sync::oneshot;

/// What background tasks tell the UI thread.
pub enum AppMsg {
    /// The doctor's client exists and has been told to join. `number` is the one
    /// [`start_doctor`] was given: the app takes only its latest session's messages.
    Session {
        number: u64,
        handle: ClientHandle,
        received: Received,
        sent: Arc<SendStats>,
        clinic_label: String,
        invite_code: Option<String>,
        invite_url: Option<String>,
        consultation_id: Option<ConsultationId>,
    },
    /// Signed in to a remote clinic with a doctor credential (its first list is on the way).
    RemoteClinic(AdminApi),
    /// A local clinic is up (kept alive by `stop`; dropping it stops the server).
    LocalClinic {
        stop: oneshot::Sender<()>,
        admin: AdminApi,
    },
    /// The devices of this computer, for the pickers.
    Devices(DeviceLists),
    /// A camera or microphone the doctor picked, opened.
    VideoSource(Box<dyn VideoSource>),
    AudioSource(Box<dyn AudioSource>),
    /// What the share menu can offer.
    Shareable(Vec<crate::share::ShareChoice>),
    /// A screen or window being captured, to send instead of the camera, and its name.
    Sharing(Box<dyn VideoSource>, String),
    /// Today's consultations on the local clinic.
    Consultations(Vec<ConsultationSummary>),
    /// Move the doctor into this consultation.
    Switch(DoctorJoin),
    /// A call event of session `number` (an earlier session's, still draining after the doctor
    /// switched consultations, is ignored: its `Ended(Left)` would end the new one's view).
    Event(u64, CallEvent),
    Failed(String),
}

/// Sends to the UI thread and wakes it.
#[derive(Clone)]
pub struct UiSender {
    tx: std::sync::mpsc::Sender<AppMsg>,
    wake: std::sync::Arc<dyn Fn() + Send + Sync>,
}

impl UiSender {
    pub fn new(
        tx: std::sync::mpsc::Sender<AppMsg>,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        UiSender {
            tx,
            wake: std::sync::Arc::new(wake),
        }
    }

    pub fn send(&self, msg: AppMsg) {
        let _ = self.tx.send(msg);
        (self.wake)();
    }
}

/// How the app's local UDP sockets are bound (loopback for the local clinic and tests).
#[derive(Clone, Debug)]
pub struct NetOptions {
    pub udp_addrs: Vec<String>,
}

/// The doctor's credentials for one consultation. Not `Debug`: the token is a secret.
pub struct DoctorJoin {
    pub ws_url: String,
    pub token: String,
    pub invite_code: Option<String>,
    /// The patient's link (`<public-url>/j/<code>`, the server's `invite_url`): what the doctor
    /// copies and sends; the code alone is for the demo patient and old links.
    pub invite_url: Option<String>,
    pub consultation_id: Option<ConsultationId>,
}

/// A clinic's consultation API: the local clinic's administration API (with its admin key),
/// or a remote clinic's doctor routes (`/api/v1/doctor/…`, with the doctor credential an
/// administrator issued). Not `Debug`: the key is a secret.
#[derive(Clone)]
pub struct AdminApi {
    pub base_url: String,
    pub key: String,
    pub ws_url: String,
    /// True for a doctor credential on a remote clinic.
    pub doctor: bool,
}

/// What a doctor credential starts with (the server's `credentials::PREFIX`).
pub use bedside_server::credentials::PREFIX as CREDENTIAL_PREFIX;

impl AdminApi {
    /// A remote clinic at `address` (`https://clinic.example`, or its `wss://…/ws` signaling
    /// URL), signed in with a doctor credential.
    ///
    /// # Errors
    /// When the address is not an http(s) or ws(s) URL.
    pub fn remote(address: &str, credential: &str) -> Result<Self> {
        let address = address.trim().trim_end_matches('/');
        let (scheme, rest) = address
            .split_once("://")
            .context("the clinic address must start with https:// (or http:// on a test bench)")?;
        let secure = match scheme {
            "https" | "wss" => true,
            "http" | "ws" => false,
            _ => bail!("the clinic address must start with https:// or http://"),
        };
        let host = rest.strip_suffix("/ws").unwrap_or(rest);
        if host.is_empty() {
            bail!("the clinic address has no host");
        }
        let (http, ws) = if secure {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        Ok(AdminApi {
            base_url: format!("{http}://{host}"),
            key: credential.trim().to_owned(),
            ws_url: format!("{ws}://{host}/ws"),
            doctor: true,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let scope = if self.doctor { "/doctor" } else { "" };
        reqwest::Client::new()
            .request(method, format!("{}/api/v1{scope}{path}", self.base_url))
            .bearer_auth(&self.key)
            .timeout(Duration::from_secs(10))
    }

    /// Today's consultations (the last 24 hours), newest first.
    pub async fn consultations(&self) -> Result<Vec<ConsultationSummary>> {
        let resp = self
            .request(reqwest::Method::GET, "/consultations")
            .send()
            .await
            .context("listing consultations")?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            bail!("the clinic refused the credential (revoked, expired or mistyped)");
        }
        if !resp.status().is_success() {
            bail!("listing consultations: HTTP {}", resp.status());
        }
        // The server lists them newest first.
        Ok(resp.json().await?)
    }

    /// Signs out: the clinic revokes the doctor credential this API was signed in with.
    pub async fn sign_out(&self) -> Result<()> {
        let resp = self
            .request(reqwest::Method::DELETE, "/credential")
            .send()
            .await
            .context("signing out")?;
        // Refused: it was revoked or expired already, which is what signing out wants.
        if !resp.status().is_success() && resp.status() != reqwest::StatusCode::UNAUTHORIZED {
            bail!("signing out: HTTP {}", resp.status());
        }
        Ok(())
    }

    /// A new consultation, joined as its doctor.
    pub async fn create(&self) -> Result<DoctorJoin> {
        let resp = self
            .request(reqwest::Method::POST, "/consultations")
            .send()
            .await
            .context("creating a consultation")?;
        if resp.status() != reqwest::StatusCode::CREATED {
            bail!("creating a consultation: HTTP {}", resp.status());
        }
        let created: CreatedConsultation = resp.json().await?;
        Ok(DoctorJoin {
            ws_url: created.ws_url,
            token: created.doctor_token,
            invite_code: Some(created.invite_code),
            invite_url: Some(created.invite_url),
            consultation_id: Some(created.consultation_id),
        })
    }

    /// A fresh doctor token and patient invite for an open consultation.
    pub async fn open(&self, id: ConsultationId) -> Result<DoctorJoin> {
        let token: IssuedToken = self
            .request(
                reqwest::Method::POST,
                &format!("/consultations/{}/tokens", id.0),
            )
            .json(&serde_json::json!({ "role": "doctor" }))
            .send()
            .await
            .context("issuing a doctor token")?
            .error_for_status()
            .context("issuing a doctor token")?
            .json()
            .await?;
        let invite: IssuedInvite = self
            .request(
                reqwest::Method::POST,
                &format!("/consultations/{}/invites", id.0),
            )
            .send()
            .await
            .context("issuing an invite")?
            .error_for_status()
            .context("issuing an invite")?
            .json()
            .await?;
        Ok(DoctorJoin {
            ws_url: self.ws_url.clone(),
            token: token.token,
            invite_code: Some(invite.invite_code),
            invite_url: Some(invite.invite_url),
            consultation_id: Some(id),
        })
    }
}

/// Starts a clinic server in this process with its store in `data_dir`, listening on
/// 127.0.0.1 (a free port), and opens one consultation on it.
pub async fn start_local_clinic(data_dir: PathBuf, ui: &UiSender) -> Result<DoctorJoin> {
    std::fs::create_dir_all(&data_dir).context("creating the data directory")?;
    let mut config = Config {
        listen: "127.0.0.1:0".parse().expect("a socket address"),
        data_dir,
        ..Config::default()
    };
    config.turn.enabled = false;
    let server = Server::bind(config)
        .await
        .context("starting the local clinic")?;
    let admin = AdminApi {
        base_url: server.base_url(),
        key: server.admin_api_key().to_owned(),
        ws_url: server.ws_url().to_owned(),
        doctor: false,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    ui.send(AppMsg::LocalClinic {
        stop,
        admin: admin.clone(),
    });
    let join = admin.create().await?;
    tracing::info!("local clinic started, consultation created");
    Ok(join)
}

/// Starts the doctor's client, joins, and forwards its events to the UI (the waker task).
pub fn start_doctor(number: u64, join: DoctorJoin, net: &NetOptions, ui: &UiSender) -> Result<()> {
    let mut options = ClientOptions::new(join.ws_url.clone());
    options.engine = EngineSettings {
        udp_addrs: net.udp_addrs.clone(),
        relay_only: false,
        ..EngineSettings::default()
    };
    options.video.width = SEND_WIDTH;
    options.video.height = SEND_HEIGHT;
    // The call starts on the test pattern and tone; the app switches to the chosen devices once
    // the session is up (`DesktopApp::open_chosen_devices`).
    let sources = MediaSources::synthetic(SEND_WIDTH, SEND_HEIGHT, 1, DOCTOR_TONE_HZ);
    let mut client = driver::start(options, sources).context("starting the call client")?;
    client.handle.send(UserCommand::Join {
        auth: JoinAuth::Token { token: join.token },
        display_name: Some("Doctor".into()),
    });
    let forward = ui.clone();
    tokio::spawn(async move {
        while let Some(event) = client.events.recv().await {
            forward.send(AppMsg::Event(number, event));
        }
    });
    ui.send(AppMsg::Session {
        number,
        handle: client.handle,
        received: client.received,
        sent: client.sent,
        clinic_label: host_of(&join.ws_url),
        invite_code: join.invite_code,
        invite_url: join.invite_url,
        consultation_id: join.consultation_id,
    });
    Ok(())
}

/// The host part of a URL, for the header (no path, no query, no credentials).
pub fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', '?']).next().unwrap_or(rest);
    host.rsplit('@').next().unwrap_or(host).to_owned()
}

/// A simulated patient (a probe with synthetic 640x360 media) waiting with `invite_code`.
pub fn spawn_demo_patient(ws_url: String, invite_code: String, net: &NetOptions) {
    let mut options =
        bedside_probe::ProbeOptions::new(ws_url, JoinAuth::InviteCode { code: invite_code });
    options.display_name = Some("Demo patient".into());
    options.width = 640;
    options.height = 360;
    options.bitrate_kbps = 800;
    options.duration = Duration::from_secs(3600);
    options.udp_addrs = net.udp_addrs.clone();
    tokio::spawn(async move {
        match bedside_probe::run(options).await {
            Ok(report) => tracing::info!(connected = report.connected, "demo patient finished"),
            // The error may carry the server address: not logged.
            Err(_) => tracing::warn!("demo patient failed"),
        }
    });
}

/// Signs in to a remote clinic: one list of today's consultations proves the credential.
pub async fn sign_in(admin: AdminApi, ui: &UiSender) -> Result<()> {
    let list = admin.consultations().await?;
    ui.send(AppMsg::RemoteClinic(admin));
    ui.send(AppMsg::Consultations(list));
    tracing::info!("signed in to a remote clinic");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_clinic_address_gives_its_api_and_signaling_urls() {
        for typed in [
            "https://clinic.example",
            "https://clinic.example/",
            "wss://clinic.example/ws",
        ] {
            let api = super::AdminApi::remote(typed, " bdc_x ").unwrap();
            assert_eq!(api.base_url, "https://clinic.example");
            assert_eq!(api.ws_url, "wss://clinic.example/ws");
            assert_eq!(api.key, "bdc_x");
        }
        let api = super::AdminApi::remote("http://127.0.0.1:8080", "bdc_x").unwrap();
        assert_eq!(api.ws_url, "ws://127.0.0.1:8080/ws");
        assert!(super::AdminApi::remote("clinic.example", "bdc_x").is_err());
        assert!(super::AdminApi::remote("ftp://clinic.example", "bdc_x").is_err());
    }

    #[test]
    fn host_of_drops_path_and_credentials() {
        assert_eq!(
            super::host_of("wss://u:p@clinic.example:8443/ws?x=1"),
            "clinic.example:8443"
        );
        assert_eq!(super::host_of("ws://127.0.0.1:5000/ws"), "127.0.0.1:5000");
    }
}

#[cfg(test)]
mod waker_tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use bedside_client_core::call::{CallEvent, CallState};

    use super::{AppMsg, UiSender};

    #[test]
    fn every_message_wakes_the_ui() {
        let (tx, rx) = std::sync::mpsc::channel();
        let wakes = Arc::new(AtomicU32::new(0));
        let w = wakes.clone();
        let ui = UiSender::new(tx, move || {
            w.fetch_add(1, Ordering::SeqCst);
        });
        ui.send(AppMsg::Event(0, CallEvent::State(CallState::Joining)));
        ui.clone().send(AppMsg::Failed("x".into()));
        assert_eq!(wakes.load(Ordering::SeqCst), 2);
        assert_eq!(rx.try_iter().count(), 2);
    }
}
