//! The screens. `view` draws an [`AppModel`] and returns what was clicked as [`UiCommand`]s; it
//! never blocks, never talks to the network and never changes call state itself.

use std::collections::HashMap;

use bedside_client_core::call::{CallState, UserCommand};
use bedside_protocol::{ParticipantId, Peer, Role};
use egui::{Color32, Key, KeyboardShortcut, Modifiers, RichText, TextureHandle, Ui};
use egui_plot::{Line, Plot};

use crate::devices::Choice;
use crate::model::{AppModel, Quality, Screen, Series, UiCommand};

/// What the connect form holds while it is being typed (not call state).
#[derive(Clone, Debug, Default)]
pub struct Drafts {
    /// The clinic's address (or its signaling URL).
    pub ws_url: String,
    /// A doctor credential (`bdc_…`) or a one-off join token.
    pub token: String,
    /// The chat line being typed.
    pub chat: String,
    /// A question on screen before something that cannot be undone.
    pub confirm: Option<Confirm>,
}

/// What asks for confirmation first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Confirm {
    /// Turn this waiting patient away.
    Deny { id: ParticipantId, name: String },
    /// Leave the consultation.
    Leave,
}

/// Mute or unmute the microphone.
pub const SHORTCUT_MUTE: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::D);
/// Camera off or on.
pub const SHORTCUT_CAMERA: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::E);
/// Leave the consultation (asks first).
pub const SHORTCUT_LEAVE: KeyboardShortcut = KeyboardShortcut::new(
    Modifiers {
        shift: true,
        ..Modifiers::COMMAND
    },
    Key::L,
);

/// Text colours with at least 4.5:1 contrast on the panels (WCAG AA for normal text): egui's
/// default dark theme draws weak text at about 2.7:1. Applied by the app, and by the UI tests
/// so the snapshots show what the doctor sees.
pub fn apply_style(ctx: &egui::Context) {
    ctx.all_styles_mut(|style| {
        let v = &mut style.visuals;
        if v.dark_mode {
            v.widgets.noninteractive.fg_stroke.color = Color32::from_gray(215);
            v.widgets.inactive.fg_stroke.color = Color32::from_gray(225);
            v.weak_text_color = Some(Color32::from_gray(170));
        } else {
            v.widgets.noninteractive.fg_stroke.color = Color32::from_gray(30);
            v.widgets.inactive.fg_stroke.color = Color32::from_gray(20);
            v.weak_text_color = Some(Color32::from_gray(85));
        }
    });
}

/// Textures the app uploaded for this frame (none in UI tests).
#[derive(Default)]
pub struct VideoView {
    /// Every other participant's latest picture (absent until it arrives).
    pub remote: HashMap<ParticipantId, TextureHandle>,
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
        Screen::Clinic => {
            egui::CentralPanel::default().show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .show(ui, |ui| consultations_panel(ui, model, &mut out));
            });
        }
        Screen::Consultation => {
            egui::CentralPanel::default()
                .show(ui, |ui| consultation_screen(ui, model, drafts, &mut out));
        }
        Screen::InCall => in_call_screen(ui, model, drafts, video, &mut out),
        Screen::Ended => {
            egui::CentralPanel::default().show(ui, |ui| {
                ui.heading(model.ended_text());
                let back = if model.consultations.is_some() {
                    "Back to today's consultations"
                } else {
                    "Back to start"
                };
                if ui.button(back).clicked() {
                    out.push(UiCommand::Reset);
                }
            });
        }
    }
    confirmation(ui, drafts, &mut out);
    out
}

/// The confirmation dialog, while one is asked for.
fn confirmation(ui: &mut Ui, drafts: &mut Drafts, out: &mut Vec<UiCommand>) {
    let Some(confirm) = drafts.confirm.clone() else {
        return;
    };
    let (question, detail, yes, command) = match &confirm {
        Confirm::Deny { id, name } => (
            format!("Turn {name} away?"),
            "They are told the clinic will not see them now, and leave the waiting room.",
            "Turn away",
            UiCommand::Call(UserCommand::Deny(id.clone())),
        ),
        Confirm::Leave => (
            "Leave the consultation?".to_owned(),
            "The patient stays in the consultation and can be joined again from today's list.",
            "Leave now",
            UiCommand::Call(UserCommand::Leave),
        ),
    };
    let mut answered = false;
    egui::Modal::new(egui::Id::unique("bedside-confirm")).show(ui.ctx(), |ui| {
        ui.set_max_width(360.0);
        ui.heading(question);
        ui.label(detail);
        ui.add_space(8.0);
        ui.horizontal(|ui| {
            if ui.button(RichText::new(yes).color(DANGER)).clicked() {
                out.push(command);
                answered = true;
            }
            if ui.button("Cancel").clicked() || ui.input(|i| i.key_pressed(Key::Escape)) {
                answered = true;
            }
        });
    });
    if answered {
        drafts.confirm = None;
    }
}

/// Red for what cannot be undone, readable on the dark panels (about 6.5:1).
const DANGER: Color32 = Color32::from_rgb(255, 130, 120);

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
            let label = ui.label("Clinic address");
            ui.add(
                egui::TextEdit::singleline(&mut drafts.ws_url).hint_text("https://clinic.example"),
            )
            .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Doctor credential");
            ui.add(
                egui::TextEdit::singleline(&mut drafts.token)
                    .password(true)
                    .hint_text("from the clinic's administrator"),
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
            let (address, secret) = (drafts.ws_url.trim(), drafts.token.trim());
            // A doctor credential signs in to the clinic; anything else is a one-off join token.
            out.push(if secret.starts_with(crate::clinic::CREDENTIAL_PREFIX) {
                UiCommand::SignIn {
                    address: address.to_owned(),
                    credential: secret.to_owned(),
                }
            } else {
                UiCommand::ConnectToClinic {
                    ws_url: address.to_owned(),
                    token: secret.to_owned(),
                }
            });
        }
    });
}

/// The patient's invite: the link the clinic gave (opened in a browser, or in the patient app
/// where it is installed), or the code alone where there is no link.
fn invite_row(ui: &mut Ui, model: &AppModel, out: &mut Vec<UiCommand>) {
    let (label, text, size) = match (&model.invite_url, &model.invite_code) {
        (Some(url), _) => ("Invite link for the patient:", url, 14.0),
        (None, Some(code)) => ("Invite code for the patient:", code, 18.0),
        (None, None) => return,
    };
    let row = |ui: &mut Ui| {
        ui.label(label);
        ui.label(RichText::new(text).monospace().strong().size(size));
        if ui.button("Copy").clicked() {
            out.push(UiCommand::Copy(text.clone()));
        }
    };
    if model.invite_url.is_some() {
        // A link is longer than the side panel is wide.
        ui.horizontal_wrapped(row);
    } else {
        ui.horizontal(row);
    }
}

fn waiting_room(ui: &mut Ui, model: &AppModel, drafts: &mut Drafts, out: &mut Vec<UiCommand>) {
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
                let mut waited = model.waited_text(patient);
                if !patient.connected {
                    waited.push_str(" (connection dropped)");
                }
                ui.label(waited);
                if ui.button("Admit").clicked() {
                    out.push(UiCommand::Call(UserCommand::Admit(
                        patient.participant_id.clone(),
                    )));
                }
                if ui
                    .button("Deny")
                    .on_hover_text("Turn this patient away (asks first)")
                    .clicked()
                {
                    drafts.confirm = Some(Confirm::Deny {
                        id: patient.participant_id.clone(),
                        name: name.to_owned(),
                    });
                }
                ui.end_row();
            }
        });
}

fn consultation_screen(
    ui: &mut Ui,
    model: &AppModel,
    drafts: &mut Drafts,
    out: &mut Vec<UiCommand>,
) {
    egui::ScrollArea::vertical().show(ui, |ui| {
        ui.heading("Consultation");
        invite_row(ui, model, out);
        ui.separator();
        waiting_room(ui, model, drafts, out);
        ui.separator();
        devices_panel(ui, model, out);
        ui.separator();
        consultations_panel(ui, model, out);
        ui.separator();
        leave_button(ui, drafts);
    });
}

/// "Leave", which asks first (also on its shortcut).
fn leave_button(ui: &mut Ui, drafts: &mut Drafts) {
    let tip = format!(
        "Leave the consultation ({})",
        ui.ctx().format_shortcut(&SHORTCUT_LEAVE)
    );
    let clicked = ui
        .button(RichText::new("Leave").color(DANGER))
        .on_hover_text(tip)
        .clicked();
    if clicked || ui.input_mut(|i| i.consume_shortcut(&SHORTCUT_LEAVE)) {
        drafts.confirm = Some(Confirm::Leave);
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
            let ctx = ui.ctx().clone();
            let mute = if model.mic_muted { "Unmute" } else { "Mute" };
            let tip = format!(
                "Microphone on or off ({})",
                ctx.format_shortcut(&SHORTCUT_MUTE)
            );
            let clicked = ui.button(mute).on_hover_text(tip).clicked();
            if clicked || ui.input_mut(|i| i.consume_shortcut(&SHORTCUT_MUTE)) {
                out.push(UiCommand::Call(UserCommand::SetMicrophoneMuted(
                    !model.mic_muted,
                )));
            }
            let cam = if model.camera_enabled {
                "Camera off"
            } else {
                "Camera on"
            };
            let tip = format!(
                "Camera on or off ({})",
                ctx.format_shortcut(&SHORTCUT_CAMERA)
            );
            let clicked = ui.button(cam).on_hover_text(tip).clicked();
            if clicked || ui.input_mut(|i| i.consume_shortcut(&SHORTCUT_CAMERA)) {
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
            if ui
                .button(ao)
                .on_hover_text("Stop video both ways to save the connection")
                .clicked()
            {
                out.push(UiCommand::Call(UserCommand::SetAudioOnly(
                    !manual_audio_only,
                )));
            }
            crate::share::share_button(ui, model, out);
            leave_button(ui, drafts);
        });
    });
    egui::Panel::right("side")
        .default_size(320.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| {
                if let Some(line) = model.encryption_line() {
                    ui.label(egui::RichText::new(line).strong());
                    ui.separator();
                }
                invite_row(ui, model, out);
                if !model.waiting.is_empty() {
                    waiting_room(ui, model, drafts, out);
                }
                ui.separator();
                chat_panel(ui, model, drafts, out);
                ui.separator();
                egui::CollapsingHeader::new("Call details")
                    .id_salt("call-details")
                    .default_open(false)
                    .show(ui, |ui| {
                        stats_panel(ui, model);
                        ui.separator();
                        devices_panel(ui, model, out);
                    });
                ui.separator();
                consultations_panel(ui, model, out);
            });
        });
    egui::CentralPanel::default().show(ui, |ui| {
        crate::share::sharing_bar(ui, model, out);
        for banner in model.banners() {
            egui::Frame::new()
                .fill(Color32::from_rgb(120, 80, 0))
                .inner_margin(6.0)
                .show(ui, |ui| {
                    ui.label(RichText::new(banner).color(Color32::WHITE).strong());
                });
        }
        if let Some(first) = model.waiting.first() {
            // Someone else arrived during this call: say so where the doctor is looking.
            let name = first.display_name.as_deref().unwrap_or("A patient");
            egui::Frame::new()
                .fill(Color32::from_rgb(20, 70, 130))
                .inner_margin(6.0)
                .show(ui, |ui| {
                    ui.label(
                        RichText::new(format!(
                            "{name} is in the waiting room ({})",
                            model.waited_text(first)
                        ))
                        .color(Color32::WHITE)
                        .strong(),
                    );
                });
        }
        ui.horizontal(|ui| {
            if let Some(peer) = model.main_peer() {
                ui.label(RichText::new(peer_name(peer)).strong());
                if model.pinned.is_some() {
                    if ui
                        .button("Follow the speaker")
                        .on_hover_text("Show whoever speaks large again")
                        .clicked()
                    {
                        out.push(UiCommand::Pin(None));
                    }
                } else if model.peers.len() > 1
                    && model.active_speaker.as_ref() == Some(&peer.participant_id)
                {
                    ui.label(RichText::new("speaking").color(SPEAKING));
                }
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
                if let Some(reason) = model.quality_reason() {
                    ui.label(format!("({reason})"));
                }
            }
        });
        let tiles = model.tile_peers();
        if !tiles.is_empty() {
            egui::Panel::bottom("tiles")
                .resizable(false)
                .show_separator_line(false)
                .show(ui, |ui| tile_strip(ui, model, video, &tiles, out));
        }
        remote_video(ui, model, video);
    });
}

/// A picture centred in `rect`, as large as fits with its aspect kept.
fn paint_fitted(ui: &Ui, tex: &TextureHandle, rect: egui::Rect) {
    let [w, h] = tex.size().map(|s| s.max(1) as f32);
    let scale = (rect.width() / w).min(rect.height() / h).max(0.01);
    let fit = egui::Rect::from_center_size(rect.center(), egui::vec2(w * scale, h * scale));
    egui::Image::new((tex.id(), fit.size())).paint_at(ui, fit);
}

/// The outline of whoever the SFU hears speaking.
const SPEAKING: Color32 = Color32::from_rgb(60, 170, 80);

/// A participant as the screen names them: their display name, else their role.
fn peer_name(peer: &Peer) -> &str {
    peer.display_name.as_deref().unwrap_or(match peer.role {
        Role::Patient => "Patient",
        Role::Doctor => "Doctor",
        Role::Clinician => "Clinician",
    })
}

/// A group consult's other participants, a tile each under the large picture (the active
/// speaker's outlined); a click on a tile shows that participant large until "Follow the
/// speaker".
fn tile_strip(
    ui: &mut Ui,
    model: &AppModel,
    video: &VideoView,
    tiles: &[&Peer],
    out: &mut Vec<UiCommand>,
) {
    ui.add_space(6.0);
    ui.horizontal(|ui| {
        for peer in tiles {
            let size = egui::vec2(192.0, 108.0);
            let (rect, response) = ui.allocate_exact_size(size, egui::Sense::click());
            let painter = ui.painter_at(rect);
            painter.rect_filled(rect, 4.0, Color32::from_gray(30));
            match (video.remote.get(&peer.participant_id), model.audio_only) {
                (Some(tex), None) => paint_fitted(ui, tex, rect),
                (_, audio_only) => {
                    let text = if audio_only.is_some() {
                        "Audio only"
                    } else {
                        "No video yet"
                    };
                    ui.put(
                        rect.shrink(8.0),
                        egui::Label::new(RichText::new(text).color(Color32::from_gray(200)))
                            .selectable(false),
                    );
                }
            }
            // The name on a dark band, legible over any picture.
            let band =
                egui::Rect::from_min_max(egui::pos2(rect.min.x, rect.max.y - 22.0), rect.max);
            painter.rect_filled(band, 0.0, Color32::from_black_alpha(200));
            ui.put(
                band.shrink2(egui::vec2(6.0, 0.0)),
                egui::Label::new(RichText::new(peer_name(peer)).color(Color32::WHITE))
                    .truncate()
                    .selectable(false),
            );
            if model.active_speaker.as_ref() == Some(&peer.participant_id) {
                painter.rect_stroke(
                    rect,
                    4.0,
                    egui::Stroke::new(3.0, SPEAKING),
                    egui::StrokeKind::Inside,
                );
            }
            let action = format!("Show {} large", peer_name(peer));
            response.widget_info(|| {
                egui::WidgetInfo::labeled(egui::Role::Button, true, action.clone())
            });
            if response.on_hover_text(action.as_str()).clicked() {
                out.push(UiCommand::Pin(Some(peer.participant_id.clone())));
            }
        }
    });
}

/// The picture of whoever is shown large (the patient in a 1:1 call), centred and as large as
/// the panel allows, with the self view small in its bottom-right corner.
fn remote_video(ui: &mut Ui, model: &AppModel, video: &VideoView) {
    let area = ui.available_rect_before_wrap();
    ui.allocate_rect(area, egui::Sense::hover());
    let painter = ui.painter_at(area);
    painter.rect_filled(area, 4.0, Color32::from_gray(20));
    let main = model
        .main_peer()
        .and_then(|p| video.remote.get(&p.participant_id));
    match (main, model.audio_only.is_some()) {
        (Some(tex), false) => paint_fitted(ui, tex, area),
        (_, audio_only) => {
            let text = match model.main_peer() {
                _ if audio_only => "Audio only".to_owned(),
                Some(peer) if peer.role != Role::Patient => {
                    format!("Waiting for {}'s video…", peer_name(peer))
                }
                _ => "Waiting for the patient's video…".to_owned(),
            };
            ui.put(
                egui::Rect::from_center_size(area.center(), egui::vec2(area.width(), 30.0)),
                egui::Label::new(
                    RichText::new(text)
                        .size(18.0)
                        .color(Color32::from_gray(200)),
                ),
            );
        }
    }
    let size = egui::vec2(192.0, 108.0).min(area.size() * 0.3);
    let corner = egui::Rect::from_min_size(area.max - size - egui::vec2(12.0, 12.0), size);
    self_view(ui, model, video, corner);
}

fn self_view(ui: &mut Ui, model: &AppModel, video: &VideoView, rect: egui::Rect) {
    if let (Some(tex), true) = (&video.local, model.camera_enabled) {
        paint_fitted(ui, tex, rect);
        return;
    }
    ui.painter().rect_filled(rect, 4.0, Color32::from_gray(45));
    let text = if !model.camera_enabled {
        "Camera off"
    } else if model.audio_only.is_some() {
        "Video paused"
    } else {
        "Starting the camera…"
    };
    ui.put(
        rect,
        egui::Label::new(RichText::new(text).color(Color32::from_gray(220))),
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
        if model.signed_in
            && ui
                .button("Sign out")
                .on_hover_text("Revoke this computer's credential and forget it")
                .clicked()
        {
            out.push(UiCommand::SignOut);
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
                ui.label(model.local_time(c.created_at));
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
    ui.strong("Call quality");
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
