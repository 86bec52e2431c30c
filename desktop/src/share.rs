//! Screen sharing: what the "Share screen" menu offers, what a choice opens (client-core's
//! `media::screen`, X11), and the parts of the call screen that say so: the menu, and the
//! "You are sharing" bar with its one-click stop.
//!
//! The shared screen replaces the camera on the one video track (the patient sees the screen
//! instead of the doctor); stopping reopens the chosen camera. Client-core encodes it as
//! screen content: the screen's resolution up to 1920x1080 at 2-10 fps, openh264's
//! screen-content mode.

use bedside_client_core::media::VideoSource;
use egui::{Color32, RichText, Ui};

use crate::model::{AppModel, UiCommand};

/// The id of "the entire screen" among the choices.
pub const ENTIRE_SCREEN: &str = "screen";

/// One thing the doctor may share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareChoice {
    /// [`ENTIRE_SCREEN`] or `window:<X11 id>`.
    pub id: String,
    /// "Entire screen (1920x1080)" or the window's title.
    pub name: String,
}

/// The screen and the windows that can be shared (the screen first); the reason in words when
/// there is nothing to share.
///
/// # Errors
/// No display to capture (not X11, or a build without the `devices` feature).
pub fn list() -> Result<Vec<ShareChoice>, String> {
    #[cfg(all(feature = "devices", target_os = "linux"))]
    {
        use bedside_client_core::media::screen::{ShareTarget, shareable};
        let found = shareable(None).map_err(|e| format!("Nothing can be shared: {e}"))?;
        Ok(found
            .into_iter()
            .map(|s| ShareChoice {
                id: match s.target {
                    ShareTarget::Screen => ENTIRE_SCREEN.to_owned(),
                    ShareTarget::Window(w) => format!("window:{w}"),
                },
                name: s.name,
            })
            .collect())
    }
    #[cfg(not(all(feature = "devices", target_os = "linux")))]
    Err("Screen sharing needs the Linux (X11) build of Bedside for now.".into())
}

/// Starts capturing the choice `id` as a video source.
///
/// # Errors
/// Why it cannot be shared, in words for the doctor.
pub fn open(id: &str) -> Result<Box<dyn VideoSource>, String> {
    #[cfg(all(feature = "devices", target_os = "linux"))]
    {
        use bedside_client_core::media::screen::{ShareTarget, open_screen};
        let target = if id == ENTIRE_SCREEN {
            ShareTarget::Screen
        } else {
            let window = id
                .strip_prefix("window:")
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("Unknown thing to share: {id}"))?;
            ShareTarget::Window(window)
        };
        open_screen(
            None,
            target,
            std::sync::Arc::new(bedside_client_core::pipeline::wall_us),
        )
        .map(|s| Box::new(s) as Box<dyn VideoSource>)
        .map_err(|e| format!("The screen could not be shared: {e}"))
    }
    #[cfg(not(all(feature = "devices", target_os = "linux")))]
    {
        let _ = id;
        Err("Screen sharing needs the Linux (X11) build of Bedside for now.".into())
    }
}

/// The colour of the "you are sharing" bar: unlike the amber warnings, so it is not mistaken
/// for one; white text on it is 6.3:1.
pub const SHARING: Color32 = Color32::from_rgb(150, 30, 60);

/// The in-call control: "Share screen", a menu of the screen and the windows (nothing while
/// sharing: the bar's button stops it).
pub fn share_button(ui: &mut Ui, model: &AppModel, out: &mut Vec<UiCommand>) {
    if model.sharing.is_some() {
        return;
    }
    let menu = ui.menu_button("Share screen", |ui| {
        for choice in &model.shareable {
            if ui.button(&choice.name).clicked() {
                out.push(UiCommand::ShareScreen(choice.id.clone()));
                ui.close();
            }
        }
        if model.shareable.is_empty() {
            ui.label("Looking for screens and windows…");
        }
    });
    let menu = menu
        .response
        .on_hover_text("Show the patient your screen or a window instead of your camera");
    if menu.clicked() {
        out.push(UiCommand::ListShareable);
    }
}

/// While sharing: a bar above the patient's video saying what the patient sees, with the stop
/// button in it.
pub fn sharing_bar(ui: &mut Ui, model: &AppModel, out: &mut Vec<UiCommand>) {
    let Some(what) = &model.sharing else {
        return;
    };
    egui::Frame::new()
        .fill(SHARING)
        .inner_margin(6.0)
        .show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.label(
                    RichText::new(format!("You are sharing: {what}. The patient sees it."))
                        .color(Color32::WHITE)
                        .strong(),
                );
                if ui.button("Stop sharing").clicked() {
                    out.push(UiCommand::StopSharing);
                }
            });
        });
}
