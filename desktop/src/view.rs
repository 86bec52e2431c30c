//! The screens. `view` draws an [`AppModel`] and returns what was clicked as [`UiCommand`]s; it
//! never blocks, never talks to the network and never changes call state itself.

use bedside_client_core::call::{CallState, UserCommand};
use egui::{Color32, RichText, TextureHandle, Ui};
use egui_plot::{Line, Plot};

use crate::devices::Choice;
use crate::model::{AppModel, Quality, Screen, Series, UiCommand};

/// What the connect form holds while it is being typed (not call state).
#[derive(Clone, Debug, Default)]
pub struct Drafts {
    pub ws_url: String,
    pub token: String,
    /// The chat line being typed.
    pub chat: String,
}

/// Textures the app uploaded for this frame (none in UI tests).
#[derive(Default)]
pub struct VideoView {
    pub remote: Option<TextureHandle>,
    /// What we send (the self view).
    pub local: Option<TextureHandle>,
}

/// Draws the whole window.
pub fn view(
    ui: &mut Ui,
    model: &AppModel,
    drafts: &mut Drafts,
    video: &VideoView,
) -> Vec<UiCommand> {
    let mut out = Vec::new();
    egui::Panel::top("header").show(ui, |ui| {
        ui.horizontal(|ui| {
            ui.heading("Bedside");
            if let Some(label) = &model.clinic_label {
                ui.label(format!("· {label}"));
            }
            ui.label(format!("· {}", state_text(&model.call_state)));
        });
        if let Some(err) = &model.error {
            ui.colored_label(Color32::LIGHT_RED, err);
        }
    });
    match model.screen() {
        Screen::Connect => {
            egui::CentralPanel::default()
                .show(ui, |ui| connect_screen(ui, model, drafts, &mut out));
        }
        Screen::Consultation => {
            egui::CentralPanel::default().show(ui, |ui| consultation_screen(ui, model, &mut out));
        }
        Screen::InCall => in_call_screen(ui, model, drafts, video, &mut out),
        Screen::Ended => {
            egui::CentralPanel::default().show(ui, |ui| {
                ui.heading(model.ended_text());
                if ui.button("Back to start").clicked() {
                    out.push(UiCommand::Reset);
                }
            });
        }
    }
    out
}

fn state_text(state: &CallState) -> &'static str {
    match state {
        CallState::Idle => "Not connected",
        CallState::Joining => "Joining…",
        CallState::Waiting => "In the waiting room",
        CallState::WaitingForPeers => "Waiting for the patient",
        CallState::Connecting => "Connecting…",
        CallState::Connected => "In call",
        CallState::Reconnecting => "Reconnecting…",
        CallState::Ended(_) => "Call ended",
    }
}

fn connect_screen(ui: &mut Ui, model: &AppModel, drafts: &mut Drafts, out: &mut Vec<UiCommand>) {
    if let Some(busy) = &model.busy {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label(busy);
        });
        return;
    }
    ui.add_space(12.0);
    ui.heading("Start a consultation");
    ui.add_space(8.0);
    ui.group(|ui| {
        ui.label("Runs a clinic server on this computer (127.0.0.1) and opens a consultation.");
        if ui.button("Start a local clinic on this computer").clicked() {
            out.push(UiCommand::StartLocalClinic);
        }
    });
    ui.add_space(8.0);
    ui.group(|ui| {
        ui.label("Connect to a clinic");
        egui::Grid::new("connect").num_columns(2).show(ui, |ui| {
            let label = ui.label("Server URL");
            ui.add(
                egui::TextEdit::singleline(&mut drafts.ws_url).hint_text("wss://clinic.example/ws"),
            )
            .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Doctor token");
            ui.add(
                egui::TextEdit::singleline(&mut drafts.token)
                    .password(true)
                    .hint_text("from the clinic"),
            )
            .labelled_by(label.id);
            ui.end_row();
        });
        if let Some(note) = &model.keyring_note {
            ui.label(RichText::new(note).weak());
        }
        let ready = !drafts.ws_url.trim().is_empty() && !drafts.token.trim().is_empty();
        if ui
            .add_enabled(ready, egui::Button::new("Connect to a clinic"))
            .clicked()
        {
            out.push(UiCommand::ConnectToClinic {
                ws_url: drafts.ws_url.trim().to_owned(),
                token: drafts.token.trim().to_owned(),
            });
        }
    });
}

fn invite_row(ui: &mut Ui, model: &AppModel, out: &mut Vec<UiCommand>) {
    if let Some(code) = &model.invite_code {
        ui.horizontal(|ui| {
            ui.label("Invite code for the patient:");
            ui.label(RichText::new(code).monospace().strong().size(18.0));
            if ui.button("Copy").clicked() {
                out.push(UiCommand::Copy(code.clone()));
            }
        });
    }
}

fn waiting_room(ui: &mut Ui, model: &AppModel, out: &mut Vec<UiCommand>) {
    ui.heading("Waiting room");
    if model.waiting.is_empty() {
        ui.label("Nobody is waiting.");
        return;
    }
    egui::Grid::new("waiting")
        .num_columns(4)
        .striped(true)
        .show(ui, |ui| {
            for patient in &model.waiting {
                let name = patient.display_name.as_deref().unwrap_or("Unnamed patient");
                ui.label(RichText::new(name).strong());
                let mut waited = format!("waiting {} s", model.waited_secs(patient));
                if !patient.connected {
                    waited.push_str(" (connection dropped)");
                }
                ui.label(waited);
                if ui.button("Admit").clicked() {
                    out.push(UiCommand::Call(UserCommand::Admit(
                        patient.participant_id.clone(),
                    )));
                }
                if ui.button("Deny").clicked() {
                    out.push(UiCommand::Call(UserCommand::Deny(
                        patient.participant_id.clone(),
                    )));
                }
                ui.end_row();
            }
        });
}

fn consultation_screen(ui: &mut Ui, model: &AppModel, out: &mut Vec<UiCommand>) {
    ui.heading("Consultation");
    invite_row(ui, model, out);
    ui.separator();
    waiting_room(ui, model, out);
    ui.separator();
    devices_panel(ui, model, out);
    ui.separator();
    consultations_panel(ui, model, out);
    ui.separator();
    if ui.button("Leave").clicked() {
        out.push(UiCommand::Call(UserCommand::Leave));
    }
}

fn in_call_screen(
    ui: &mut Ui,
    model: &AppModel,
    drafts: &mut Drafts,
    video: &VideoView,
    out: &mut Vec<UiCommand>,
) {
    egui::Panel::bottom("controls").show(ui, |ui| {
        ui.horizontal(|ui| {
            let mute = if model.mic_muted { "Unmute" } else { "Mute" };
            if ui.button(mute).clicked() {
                out.push(UiCommand::Call(UserCommand::SetMicrophoneMuted(
                    !model.mic_muted,
                )));
            }
            let cam = if model.camera_enabled {
                "Camera off"
            } else {
                "Camera on"
            };
            if ui.button(cam).clicked() {
                out.push(UiCommand::Call(UserCommand::SetCameraEnabled(
                    !model.camera_enabled,
                )));
            }
            let manual_audio_only = model.audio_only == Some(true);
            let ao = if manual_audio_only {
                "Video back on"
            } else {
                "Audio only"
            };
            if ui.button(ao).clicked() {
                out.push(UiCommand::Call(UserCommand::SetAudioOnly(
                    !manual_audio_only,
                )));
            }
            if ui
                .button(RichText::new("Leave").color(Color32::LIGHT_RED))
                .clicked()
            {
                out.push(UiCommand::Call(UserCommand::Leave));
            }
        });
    });
    egui::Panel::right("side")
        .default_size(320.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| {
                self_view(ui, model, video);
                invite_row(ui, model, out);
                if !model.waiting.is_empty() {
                    waiting_room(ui, model, out);
                }
                ui.separator();
                chat_panel(ui, model, drafts, out);
                ui.separator();
                stats_panel(ui, model);
                ui.separator();
                devices_panel(ui, model, out);
                ui.separator();
                consultations_panel(ui, model, out);
            });
        });
    egui::CentralPanel::default().show(ui, |ui| {
        for banner in model.banners() {
            egui::Frame::new()
                .fill(Color32::from_rgb(120, 80, 0))
                .inner_margin(6.0)
                .show(ui, |ui| {
                    ui.label(RichText::new(banner).color(Color32::WHITE).strong());
                });
        }
        ui.horizontal(|ui| {
            if let Some(peer) = model.remote() {
                let name = peer.display_name.as_deref().unwrap_or("Patient");
                ui.label(RichText::new(name).strong());
            }
            if let Some(q) = model.quality() {
                let (color, text) = match q {
                    Quality::Good => (Color32::from_rgb(60, 170, 80), "Call quality: good"),
                    Quality::Fair => (Color32::from_rgb(220, 170, 40), "Call quality: fair"),
                    Quality::Poor => (Color32::from_rgb(220, 70, 60), "Call quality: poor"),
                };
                let (dot, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
                ui.painter().circle_filled(dot.center(), 5.0, color);
                ui.label(text);
            }
        });
        remote_video(ui, model, video);
    });
}

fn remote_video(ui: &mut Ui, model: &AppModel, video: &VideoView) {
    let avail = ui.available_size();
    match (&video.remote, model.audio_only.is_some()) {
        (Some(tex), false) => {
            let [w, h] = tex.size().map(|s| s.max(1) as f32);
            let scale = (avail.x / w).min(avail.y / h).max(0.01);
            ui.add(egui::Image::new((
                tex.id(),
                egui::vec2(w * scale, h * scale),
            )));
        }
        (_, audio_only) => {
            let (rect, _) = ui.allocate_exact_size(avail, egui::Sense::hover());
            ui.painter().rect_filled(rect, 4.0, Color32::from_gray(20));
            let text = if audio_only {
                "Audio only"
            } else {
                "Waiting for the patient's video…"
            };
            ui.painter().text(
                rect.center(),
                egui::Align2::CENTER_CENTER,
                text,
                egui::FontId::proportional(18.0),
                Color32::GRAY,
            );
        }
    }
}

fn self_view(ui: &mut Ui, model: &AppModel, video: &VideoView) {
    let size = egui::vec2(192.0, 108.0);
    if let (Some(tex), true) = (&video.local, model.camera_enabled) {
        let [w, h] = tex.size().map(|s| s.max(1) as f32);
        let scale = (size.x / w).min(size.y / h);
        ui.add(egui::Image::new((
            tex.id(),
            egui::vec2(w * scale, h * scale),
        )));
        return;
    }
    let (rect, _) = ui.allocate_exact_size(size, egui::Sense::hover());
    ui.painter().rect_filled(rect, 4.0, Color32::from_gray(40));
    let text = if !model.camera_enabled {
        "Camera off"
    } else if model.audio_only.is_some() {
        "Video paused"
    } else {
        "Starting the camera…"
    };
    ui.put(
        rect,
        egui::Label::new(RichText::new(text).color(Color32::LIGHT_GRAY)),
    );
}

/// One picker: its label, its choices, the chosen id and the command a pick sends.
type PickerRow<'a> = (&'a str, &'a [Choice], &'a str, fn(String) -> UiCommand);

/// The camera, microphone and speaker pickers. Each lists the devices found and ends with the
/// synthetic choice, so "no camera" is a visible state rather than an error.
fn devices_panel(ui: &mut Ui, model: &AppModel, out: &mut Vec<UiCommand>) {
    ui.heading("Devices");
    let lists = &model.devices;
    egui::Grid::new("devices").num_columns(2).show(ui, |ui| {
        let rows: [PickerRow<'_>; 3] = [
            (
                "Camera",
                &lists.cameras,
                &model.camera,
                UiCommand::ChooseCamera,
            ),
            (
                "Microphone",
                &lists.microphones,
                &model.microphone,
                UiCommand::ChooseMicrophone,
            ),
            (
                "Speaker",
                &lists.speakers,
                &model.speaker,
                UiCommand::ChooseSpeaker,
            ),
        ];
        for (label, choices, chosen, command) in rows {
            let name = ui.label(label);
            let shown = choices
                .iter()
                .find(|c| c.id == chosen)
                .map_or(chosen, |c| c.name.as_str());
            egui::ComboBox::from_id_salt(label)
                .selected_text(shown)
                .width(200.0)
                .show_ui(ui, |ui| {
                    for choice in choices {
                        if ui
                            .selectable_label(choice.id == chosen, &choice.name)
                            .clicked()
                            && choice.id != chosen
                        {
                            out.push(command(choice.id.clone()));
                        }
                    }
                })
                .response
                .labelled_by(name.id);
            ui.end_row();
        }
    });
    if lists.cameras.iter().all(Choice::is_synthetic) {
        ui.label(RichText::new("No camera found: the patient sees a test pattern.").weak());
    }
}

/// Today's consultations on this clinic, with a button to open a new one.
fn consultations_panel(ui: &mut Ui, model: &AppModel, out: &mut Vec<UiCommand>) {
    let Some(list) = &model.consultations else {
        return;
    };
    ui.horizontal(|ui| {
        ui.heading("Today's consultations");
        if ui.button("Refresh").clicked() {
            out.push(UiCommand::RefreshConsultations);
        }
    });
    if ui.button("New consultation").clicked() {
        out.push(UiCommand::NewConsultation);
    }
    egui::Grid::new("consultations")
        .num_columns(3)
        .striped(true)
        .show(ui, |ui| {
            for c in list {
                let secs = c.created_at % 86_400;
                ui.label(format!("{:02}:{:02} UTC", secs / 3600, secs % 3600 / 60));
                let state = if c.ended_at.is_some() {
                    "ended".to_owned()
                } else {
                    format!("{} waiting · {} connected", c.waiting, c.connected)
                };
                ui.label(state);
                if model.consultation_id.as_ref() == Some(&c.consultation_id) {
                    ui.label(RichText::new("you are here").weak());
                } else if c.ended_at.is_some() {
                    ui.label("");
                } else if ui.button("Open").clicked() {
                    out.push(UiCommand::OpenConsultation(c.consultation_id.clone()));
                }
                ui.end_row();
            }
        });
}

/// The chat with the patient: end to end over the data channel, kept in memory only.
fn chat_panel(ui: &mut Ui, model: &AppModel, drafts: &mut Drafts, out: &mut Vec<UiCommand>) {
    ui.heading("Chat");
    egui::ScrollArea::vertical()
        .id_salt("chat")
        .max_height(160.0)
        .stick_to_bottom(true)
        .show(ui, |ui| {
            if model.chat.is_empty() {
                ui.label(RichText::new("Messages are not stored.").weak());
            }
            for line in &model.chat {
                ui.horizontal_wrapped(|ui| {
                    let who = RichText::new(format!("{}:", line.who)).strong();
                    ui.label(if line.outgoing { who.weak() } else { who });
                    ui.label(&line.text);
                });
            }
        });
    if let Some(notice) = &model.chat_notice {
        ui.colored_label(Color32::LIGHT_RED, notice);
    }
    let too_long = drafts.chat.len() > bedside_protocol::chat::MAX_CHAT_BYTES;
    ui.horizontal(|ui| {
        let field = ui.add(
            egui::TextEdit::singleline(&mut drafts.chat)
                .hint_text("Message to the patient")
                .desired_width(200.0),
        );
        let ready = !drafts.chat.trim().is_empty() && !too_long;
        let enter = field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        let clicked = ui.add_enabled(ready, egui::Button::new("Send")).clicked();
        if ready && (clicked || enter) {
            out.push(UiCommand::SendChat(std::mem::take(&mut drafts.chat)));
            field.request_focus();
        }
    });
    if too_long {
        ui.colored_label(
            Color32::LIGHT_RED,
            format!(
                "Too long: {} of {} bytes",
                drafts.chat.len(),
                bedside_protocol::chat::MAX_CHAT_BYTES
            ),
        );
    }
}

/// The call quality plots (RTT, loss, bitrate, frame rate) from the stats history.
pub fn stats_panel(ui: &mut Ui, model: &AppModel) {
    ui.heading("Call quality");
    let h = &model.stats;
    if h.samples == 0 {
        ui.label("No statistics yet.");
        return;
    }
    plot(ui, "rtt", "RTT (ms)", &h.rtt_ms);
    plot(ui, "loss", "Loss (%)", &h.loss_pct);
    plot(ui, "bitrate", "Bitrate (kbps)", &h.bitrate_kbps);
    plot(ui, "fps", "Frame rate (fps)", &h.fps);
    plot(ui, "height", "Resolution (lines)", &h.height);
}

fn plot(ui: &mut Ui, id: &str, title: &str, series: &Series) {
    let last = series.last().map_or("–".to_owned(), |v| format!("{v:.1}"));
    ui.label(format!("{title}: {last}"));
    Plot::new(id)
        .height(70.0)
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .include_y(0.0)
        .show(ui, |p| p.line(Line::new(title, series.points())));
}
