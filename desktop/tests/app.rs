//! The whole app (model, view, background work) driven headless through egui_kittest: a local
//! clinic in-process, today's consultations, switching between them, and what is remembered
//! between runs. No window and no GPU; the Xvfb test covers the real window.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bedside_client_core::call::CallState;
use bedside_desktop::app::{AppOptions, DesktopApp};
use bedside_desktop::clinic::NetOptions;
use bedside_desktop::settings::{self, SecretStore};
use bedside_desktop::{Screen, UiCommand};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

/// An in-memory keyring.
#[derive(Default)]
struct MemorySecrets(Mutex<HashMap<String, String>>);

impl SecretStore for MemorySecrets {
    fn token(&self, server_url: &str) -> Option<String> {
        self.0.lock().unwrap().get(server_url).cloned()
    }
    fn save_token(&self, server_url: &str, token: &str) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .insert(server_url.to_owned(), token.to_owned());
        Ok(())
    }
    fn forget_token(&self, server_url: &str) -> Result<(), String> {
        self.0.lock().unwrap().remove(server_url);
        Ok(())
    }
}

/// A keyring that is not there (like this machine's).
struct NoKeyring;

impl SecretStore for NoKeyring {
    fn token(&self, _: &str) -> Option<String> {
        None
    }
    fn save_token(&self, _: &str, _: &str) -> Result<(), String> {
        Err("this session has no keyring".into())
    }
    fn forget_token(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
}

fn app(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    secrets: Arc<dyn SecretStore>,
) -> Harness<'static, DesktopApp> {
    let options = AppOptions {
        data_dir: dir.join("data"),
        demo: false,
        connect: None,
        net: NetOptions {
            udp_addrs: vec!["127.0.0.1:0".into()],
        },
        test_hooks: Default::default(),
        settings_dir: dir.join("config"),
        secrets,
        sign_in: None,
        open_consultation: None,
    };
    let app = DesktopApp::new(egui::Context::default(), rt.handle().clone(), options);
    Harness::builder()
        .with_size(egui::vec2(1200.0, 1000.0))
        .build_ui_state(|ui, app: &mut DesktopApp| app.frame(ui), app)
}

/// Steps the app until `done` holds (the background work reports through the UI channel).
fn step_until(
    h: &mut Harness<'static, DesktopApp>,
    what: &str,
    done: impl Fn(&DesktopApp) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(h.state()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            h.state().model().status_json()
        );
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.step();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_local_clinic_lists_today_s_consultations_and_switches_between_them() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut h = app(&rt, dir.path(), Arc::new(MemorySecrets::default()));
    h.step();
    h.get_by_label("Start a local clinic on this computer")
        .click();
    step_until(&mut h, "the first consultation", |a| {
        a.model().call_state == CallState::WaitingForPeers
            && a.model()
                .consultations
                .as_ref()
                .is_some_and(|l| l.len() == 1)
    });
    let first = h.state().model().consultation_id.clone().unwrap();
    let first_invite = h.state().model().invite_code.clone().unwrap();
    let link = h
        .state()
        .model()
        .invite_url
        .clone()
        .expect("an invite link");
    assert!(link.ends_with(&format!("/j/{first_invite}")), "{link}");
    assert_eq!(h.state().model().screen(), Screen::Consultation);
    h.get_by_label("Today's consultations");
    h.get_by_label("you are here");
    // No devices on this machine: the pickers say what is sent instead.
    h.get_by_label("No camera found: the patient sees a test pattern.");

    h.get_by_label("New consultation").click();
    step_until(&mut h, "the second consultation", |a| {
        let m = a.model();
        m.consultation_id.as_ref().is_some_and(|id| *id != first)
            && m.call_state == CallState::WaitingForPeers
            && m.consultations.as_ref().is_some_and(|l| l.len() == 2)
    });
    let second = h.state().model().consultation_id.clone().unwrap();
    assert_ne!(
        h.state().model().invite_code.as_deref(),
        Some(&*first_invite)
    );
    // Newest first; the doctor is in the new one and can go back to the first.
    let list = h.state().model().consultations.clone().unwrap();
    assert_eq!(list[0].consultation_id, second);
    h.get_by_label("Open").click();
    step_until(&mut h, "back in the first consultation", |a| {
        a.model().consultation_id.as_ref() == Some(&first)
            && a.model().call_state == CallState::WaitingForPeers
    });
    // A fresh invite for the patient of the first consultation.
    assert!(h.state().model().invite_code.is_some());
    h.state_mut().execute(UiCommand::Reset);
    h.step();
    assert_eq!(h.state().model().screen(), Screen::Connect);
    assert!(h.state().model().consultations.is_none());
}

#[test]
fn the_clinic_address_and_devices_are_remembered_and_the_token_only_in_the_keyring() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let secrets = Arc::new(MemorySecrets::default());
    let mut h = app(&rt, dir.path(), secrets.clone());
    h.step();
    h.state_mut().execute(UiCommand::ConnectToClinic {
        // Nothing listens there: connecting fails, which is not what this test is about.
        ws_url: "ws://127.0.0.1:9/ws".into(),
        token: "doctor-token-123".into(),
    });
    h.state_mut()
        .execute(UiCommand::ChooseMicrophone(settings::TEST_TONE.into()));
    // A camera that is unplugged by the next start.
    h.state_mut().execute(UiCommand::ChooseCamera("7".into()));
    let file = dir.path().join("config").join(settings::FILE_NAME);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("server-url = \"ws://127.0.0.1:9/ws\""),
        "{text}"
    );
    assert!(text.contains("microphone = \"test-tone\""), "{text}");
    assert!(
        !text.contains("doctor-token-123"),
        "the token is in the file: {text}"
    );
    assert_eq!(
        secrets.token("ws://127.0.0.1:9/ws").as_deref(),
        Some("doctor-token-123")
    );
    drop(h);

    // The next start: the form is filled in, the token comes from the keyring, and the
    // unplugged camera falls back to what exists.
    let mut h = app(&rt, dir.path(), secrets);
    step_until(&mut h, "the device list", |a| {
        a.model().camera == settings::TEST_PATTERN
    });
    assert!(h.query_all_by_value("ws://127.0.0.1:9/ws").next().is_some());
    h.get_by_label("Token remembered in the system keyring.");
    assert_eq!(h.state().model().microphone, settings::TEST_TONE);
    drop(h);

    // Without a keyring the doctor is told the token is not remembered.
    let dir = tempfile::tempdir().unwrap();
    let mut h = app(&rt, dir.path(), Arc::new(NoKeyring));
    h.step();
    h.state_mut().execute(UiCommand::ConnectToClinic {
        ws_url: "ws://127.0.0.1:9/ws".into(),
        token: "t".into(),
    });
    assert_eq!(
        h.state().model().keyring_note.as_deref(),
        Some("The token is not remembered: this session has no keyring.")
    );
}

#[test]
fn an_unreadable_settings_file_is_reported_and_left_alone() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config).unwrap();
    let file = config.join(settings::FILE_NAME);
    std::fs::write(&file, "camera = [").unwrap();
    let mut h = app(&rt, dir.path(), Arc::new(MemorySecrets::default()));
    h.step();
    let error = h.state().model().error.clone().unwrap();
    assert!(error.contains(settings::FILE_NAME), "{error}");
    h.state_mut()
        .execute(UiCommand::ChooseSpeaker(settings::SPEAKER_OFF.into()));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "camera = [");
}

#[test]
fn a_remote_clinic_signs_in_with_a_doctor_credential_and_a_waiting_patient_raises_attention() {
    use bedside_server::credentials::IssuedCredential;
    let rt = runtime();
    let server = rt.block_on(bedside_tests::TestServer::start()).unwrap();
    let cred: IssuedCredential = rt
        .block_on(async {
            server
                .http()
                .post(server.api("/doctor-credentials"))
                .bearer_auth(&server.admin_key)
                .send()
                .await?
                .json()
                .await
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = Arc::new(MemorySecrets::default());
    let mut h = app(&rt, dir.path(), secrets.clone());
    h.step();
    h.state_mut().execute(UiCommand::SignIn {
        address: server.base_url.clone(),
        credential: cred.credential.clone(),
    });
    step_until(&mut h, "today's (empty) list", |a| {
        a.model().screen() == Screen::Clinic
    });
    assert_eq!(
        secrets.token(&server.base_url).as_deref(),
        Some(cred.credential.as_str())
    );
    h.get_by_label("New consultation").click();
    step_until(&mut h, "the new consultation", |a| {
        a.model().call_state == CallState::WaitingForPeers
            && a.model()
                .consultations
                .as_ref()
                .is_some_and(|l| l.len() == 1)
    });
    assert_eq!(h.state().alerts(), 0);
    // A patient arrives with the invite code the app shows: the doctor is alerted once.
    let code = h.state().model().invite_code.clone().unwrap();
    // What the doctor copies for the patient is the clinic's link to its join page.
    let link = h
        .state()
        .model()
        .invite_url
        .clone()
        .expect("an invite link");
    assert!(
        link.starts_with("http") && link.ends_with(&format!("/j/{code}")),
        "{link}"
    );
    h.get_by_label("Invite link for the patient:");
    h.get_by_label(link.as_str());
    let _patient = rt
        .block_on(async {
            let mut p = server.connect().await?;
            p.join_invite(&code, Some("Grace Hopper")).await?;
            p.expect_type("waiting").await?;
            anyhow::Ok(p)
        })
        .unwrap();
    step_until(&mut h, "the patient in the waiting room", |a| {
        a.model().waiting.len() == 1
    });
    assert_eq!(h.state().alerts(), 1);
    h.get_by_label("Grace Hopper");

    // Ending the call goes back to today's list: still signed in.
    h.state_mut().execute(UiCommand::Reset);
    step_until(&mut h, "back to the list", |a| {
        a.model().screen() == Screen::Clinic
            && a.model()
                .consultations
                .as_ref()
                .is_some_and(|l| l.len() == 1)
    });
    drop(h);

    // The next start signs in by itself from the keyring.
    let mut h = app(&rt, dir.path(), secrets.clone());
    step_until(&mut h, "signed in again", |a| {
        a.model().screen() == Screen::Clinic
    });
    drop(h);

    // Revoked: signing in fails and says why.
    rt.block_on(async {
        server
            .http()
            .delete(server.api(&format!("/doctor-credentials/{}", cred.credential_id)))
            .bearer_auth(&server.admin_key)
            .send()
            .await
    })
    .unwrap();
    let mut h = app(&rt, dir.path(), secrets);
    step_until(&mut h, "the refusal", |a| a.model().error.is_some());
    let error = h.state().model().error.clone().unwrap();
    assert!(error.contains("refused the credential"), "{error}");
    assert_eq!(h.state().model().screen(), Screen::Connect);
}

#[test]
fn signing_out_revokes_the_credential_on_the_clinic_and_forgets_it() {
    use bedside_server::credentials::IssuedCredential;
    let rt = runtime();
    let server = rt.block_on(bedside_tests::TestServer::start()).unwrap();
    let cred: IssuedCredential = rt
        .block_on(async {
            server
                .http()
                .post(server.api("/doctor-credentials"))
                .bearer_auth(&server.admin_key)
                .send()
                .await?
                .json()
                .await
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = Arc::new(MemorySecrets::default());
    let mut h = app(&rt, dir.path(), secrets.clone());
    h.step();
    h.state_mut().execute(UiCommand::SignIn {
        address: server.base_url.clone(),
        credential: cred.credential.clone(),
    });
    step_until(&mut h, "today's list", |a| {
        a.model().screen() == Screen::Clinic
    });
    h.get_by_label("Sign out").click();
    step_until(&mut h, "the connect screen", |a| {
        a.model().screen() == Screen::Connect
    });
    assert_eq!(
        secrets.token(&server.base_url),
        None,
        "the keyring forgot it"
    );
    // The clinic refuses it from then on (the revocation runs in the background).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = rt
            .block_on(async {
                server
                    .http()
                    .get(server.api("/doctor/consultations"))
                    .bearer_auth(&cred.credential)
                    .send()
                    .await
            })
            .unwrap()
            .status();
        if status == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "still accepted: {status}");
        h.step();
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(h);
    // The next start does not sign in by itself.
    let mut h = app(&rt, dir.path(), secrets);
    for _ in 0..20 {
        h.step();
    }
    assert_eq!(h.state().model().screen(), Screen::Connect);
}
