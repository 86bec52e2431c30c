//! Screen sharing: the doctor's screen (or one window) as a [`VideoSource`], and how screen
//! content is encoded so that text stays legible.
//!
//! **Encoding policy** ([`screen_encoding`], pure): a camera trades detail for motion down the
//! quality ladder (1280x720 at 30 fps down to 320x180 at 15 fps). A shared X-ray or document
//! needs the opposite: the screen's own resolution (up to 1920x1080), few frames a second, and
//! openh264's screen-content mode ([`super::H264Encoder::set_content`]). The ladder's bitrate
//! for the rung the network allows is kept; only its resolution and frame rate are replaced.
//! The sender applies it through [`tune`] for every source whose
//! [`super::VideoSource::content_hint`] is [`ContentHint::Text`].
//!
//! **Capture** (feature `devices`, X11 only): the X protocol's `GetImage` on the root window,
//! through `x11rb`'s pure-Rust connection (already in the tree for winit and the clipboard; it
//! needs no system library, so Xvfb tests need nothing beyond `xvfb`). A window is shared as the
//! part of the screen it covers (as without a compositor the X server keeps no window's
//! obscured contents anyway), followed as it moves or resizes. `xcap` and `scap` were
//! considered: on Linux both pull PipeWire and D-Bus portal libraries for Wayland (`scap` has no
//! X11 path at all), which is more than the doctor's X11 desktop and the Xvfb tests need. On
//! Wayland the app runs under XWayland and sees only X11 windows; macOS and Windows get an
//! error in words until a capture backend for them lands.
//!
//! A capture thread grabs at most [`SCREEN_CAPTURE_FPS`] frames a second into a one-frame
//! [`super::push_source`] (newest wins); the sender encodes at the policy's lower rate.

use super::error::Result;
use super::h264::H264Encoder;
use super::source::ContentHint;

/// The largest picture screen content is sent at.
pub const SCREEN_MAX: (u32, u32) = (1920, 1080);

/// How often the capture thread grabs the screen: [`screen_encoding`]'s highest rate.
pub const SCREEN_CAPTURE_FPS: u32 = 10;

/// What the quality ladder asks of the video encoder (its current rung and bitrate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LadderTarget {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub bitrate_kbps: u32,
}

/// How screen content of `source` size is sent within `bitrate_kbps`: the source's own
/// resolution fitted into [`SCREEN_MAX`] (into 1280x720 below 300 kbps, where a full-size
/// picture would be a blur of quantisation), and a frame rate from 10 fps (600 kbps and up) down
/// to 2 fps (under 250 kbps). Text stays sharp; scrolling and pointer motion get choppy first.
pub fn screen_encoding(source: (u32, u32), bitrate_kbps: u32) -> (u32, u32, u32) {
    let bound = if bitrate_kbps < 300 {
        (1280, 720)
    } else {
        SCREEN_MAX
    };
    let (w, h) = fit_within(source, bound);
    let fps = match bitrate_kbps {
        600.. => 10,
        250.. => 5,
        _ => 2,
    };
    (w, h, fps)
}

/// `size` scaled down (never up) to fit in `bound`, keeping its aspect, even dimensions.
pub fn fit_within((w, h): (u32, u32), (bw, bh): (u32, u32)) -> (u32, u32) {
    let (w, h) = (w.max(2), h.max(2));
    let (w, h) = if w <= bw && h <= bh {
        (w, h)
    } else if u64::from(w) * u64::from(bh) > u64::from(h) * u64::from(bw) {
        (bw, (u64::from(h) * u64::from(bw) / u64::from(w)) as u32)
    } else {
        ((u64::from(w) * u64::from(bh) / u64::from(h)) as u32, bh)
    };
    ((w & !1).max(2), (h & !1).max(2))
}

/// Sets `encoder` for what it is about to encode: the ladder's `target` for a camera, or
/// [`screen_encoding`] of the `frame` size for screen content (and the encoder's content mode
/// to match). Only what differs is changed, so calling it for every frame is cheap. Returns the
/// frame rate in effect.
///
/// # Errors
/// What the encoder's setters return (an out-of-range setting, openh264 refusing it).
pub fn tune(
    encoder: &mut H264Encoder,
    content: ContentHint,
    target: LadderTarget,
    frame: (u32, u32),
) -> Result<u32> {
    encoder.set_content(content)?;
    let (width, height, fps) = match content {
        ContentHint::Motion => (target.width, target.height, target.fps),
        ContentHint::Text => screen_encoding(frame, target.bitrate_kbps),
    };
    let c = *encoder.config();
    if (c.width, c.height) != (width, height) {
        encoder.set_resolution(width, height)?;
    }
    if c.max_fps != fps as f32 {
        encoder.set_max_fps(fps as f32)?;
    }
    if c.bitrate_bps != target.bitrate_kbps * 1000 {
        encoder.set_bitrate(target.bitrate_kbps * 1000)?;
    }
    Ok(fps.max(1))
}

#[cfg(all(
    feature = "devices",
    unix,
    not(any(target_os = "macos", target_os = "ios", target_os = "android"))
))]
pub use x11::{ScreenSource, ShareTarget, Shareable, open_screen, shareable};

#[cfg(all(
    feature = "devices",
    unix,
    not(any(target_os = "macos", target_os = "ios", target_os = "android"))
))]
mod x11 {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread::JoinHandle;
    use std::time::Duration;

    use x11rb::connection::Connection;
    use x11rb::protocol::xproto::{
        AtomEnum, ConnectionExt as _, ImageFormat, ImageOrder, MapState, Window,
    };
    use x11rb::rust_connection::RustConnection;

    use super::super::devices::SessionClock;
    use super::super::error::{MediaError, Result};
    use super::super::frame::VideoFrame;
    use super::super::source::{
        Capture, ContentHint, FramePusher, PushedSource, VideoSource, push_source,
    };
    use super::SCREEN_CAPTURE_FPS;

    /// What to share.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ShareTarget {
        /// The whole (first) screen.
        Screen,
        /// One top-level window, by its X11 id.
        Window(u32),
    }

    /// One thing the doctor may share, for the picker.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Shareable {
        pub target: ShareTarget,
        /// "Entire screen (1920x1080)" or the window's title.
        pub name: String,
    }

    fn x_err(e: impl std::fmt::Display) -> MediaError {
        MediaError::Device(format!("screen capture: {e}"))
    }

    struct Display {
        conn: RustConnection,
        root: Window,
    }

    impl Display {
        fn open(display: Option<&str>) -> Result<Self> {
            let (conn, screen) = x11rb::connect(display).map_err(|e| {
                MediaError::Device(format!(
                    "no X11 display to share ({e}); screen sharing needs X11 (or XWayland)"
                ))
            })?;
            let setup = conn.setup();
            let root = &setup.roots[screen];
            let visual = root
                .allowed_depths
                .iter()
                .flat_map(|d| &d.visuals)
                .find(|v| v.visual_id == root.root_visual)
                .ok_or_else(|| x_err("the root visual is not listed"))?;
            let bpp = setup
                .pixmap_formats
                .iter()
                .find(|f| f.depth == root.root_depth)
                .map(|f| f.bits_per_pixel);
            // 24-bit true colour in 32-bit little-endian pixels: B, G, R, pad in memory.
            if bpp != Some(32)
                || setup.image_byte_order != ImageOrder::LSB_FIRST
                || (visual.red_mask, visual.green_mask, visual.blue_mask)
                    != (0xff0000, 0xff00, 0xff)
            {
                return Err(x_err(format!(
                    "unsupported pixel format (depth {}, {bpp:?} bits per pixel)",
                    root.root_depth
                )));
            }
            let root = root.root;
            Ok(Self { conn, root })
        }

        fn atom(&self, name: &[u8]) -> Option<u32> {
            let atom = self.conn.intern_atom(true, name).ok()?.reply().ok()?.atom;
            (atom != 0).then_some(atom)
        }

        fn title(&self, window: Window) -> Option<String> {
            let utf8 = self.atom(b"UTF8_STRING");
            let net_name = self.atom(b"_NET_WM_NAME");
            let asked = [
                net_name.zip(utf8),
                Some((AtomEnum::WM_NAME.into(), AtomEnum::ANY.into())),
            ];
            asked.into_iter().flatten().find_map(|(property, kind)| {
                let reply = self
                    .conn
                    .get_property(false, window, property, kind, 0, 256)
                    .ok()?
                    .reply()
                    .ok()?;
                let name = String::from_utf8_lossy(&reply.value).trim().to_string();
                (!name.is_empty()).then_some(name)
            })
        }

        /// The top-level windows a window manager lists, or (without one, as under Xvfb) the
        /// root's mapped children that have a title.
        fn windows(&self) -> Vec<(Window, String)> {
            let listed = self.atom(b"_NET_CLIENT_LIST").and_then(|list| {
                let reply = self
                    .conn
                    .get_property(false, self.root, list, AtomEnum::WINDOW, 0, 1024)
                    .ok()?
                    .reply()
                    .ok()?;
                Some(reply.value32()?.collect::<Vec<_>>())
            });
            let candidates = match listed {
                Some(l) if !l.is_empty() => l,
                _ => self
                    .conn
                    .query_tree(self.root)
                    .ok()
                    .and_then(|c| c.reply().ok())
                    .map(|t| t.children)
                    .unwrap_or_default(),
            };
            candidates
                .into_iter()
                .filter(|&w| {
                    self.conn
                        .get_window_attributes(w)
                        .ok()
                        .and_then(|c| c.reply().ok())
                        .is_some_and(|a| a.map_state == MapState::VIEWABLE)
                })
                .filter_map(|w| Some((w, self.title(w)?)))
                .collect()
        }

        /// The screen's rectangle a target covers now, clipped to the screen; `None` when the
        /// window is gone or entirely off screen.
        fn area(&self, target: ShareTarget) -> Option<(i16, i16, u16, u16)> {
            let screen = self.conn.get_geometry(self.root).ok()?.reply().ok()?;
            let ShareTarget::Window(w) = target else {
                return Some((0, 0, screen.width, screen.height));
            };
            let g = self.conn.get_geometry(w).ok()?.reply().ok()?;
            let at = self
                .conn
                .translate_coordinates(w, self.root, 0, 0)
                .ok()?
                .reply()
                .ok()?;
            let (x0, y0) = (i32::from(at.dst_x).max(0), i32::from(at.dst_y).max(0));
            let x1 = (i32::from(at.dst_x) + i32::from(g.width)).min(i32::from(screen.width));
            let y1 = (i32::from(at.dst_y) + i32::from(g.height)).min(i32::from(screen.height));
            (x1 - x0 >= 2 && y1 - y0 >= 2)
                .then(|| (x0 as i16, y0 as i16, (x1 - x0) as u16, (y1 - y0) as u16))
        }

        fn grab(&self, target: ShareTarget, capture_us: u64) -> Result<VideoFrame> {
            let (x, y, w, h) = self
                .area(target)
                .ok_or_else(|| x_err("the shared window is gone"))?;
            let image = self
                .conn
                .get_image(ImageFormat::Z_PIXMAP, self.root, x, y, w, h, !0)
                .map_err(x_err)?
                .reply()
                .map_err(x_err)?;
            let (w, h) = (u32::from(w), u32::from(h));
            let bgrx = &image.data;
            VideoFrame::from_bgrx(w, h, bgrx, capture_us)
        }
    }

    /// The screen and every shareable window of `display` (`None`: `$DISPLAY`), the screen
    /// first.
    ///
    /// # Errors
    /// [`MediaError::Device`] when there is no X11 display (its reason in words).
    pub fn shareable(display: Option<&str>) -> Result<Vec<Shareable>> {
        let display = Display::open(display)?;
        let (_, _, w, h) = display
            .area(ShareTarget::Screen)
            .ok_or_else(|| x_err("the screen has no size"))?;
        let mut out = vec![Shareable {
            target: ShareTarget::Screen,
            name: format!("Entire screen ({w}x{h})"),
        }];
        out.extend(display.windows().into_iter().map(|(w, name)| Shareable {
            target: ShareTarget::Window(w),
            name,
        }));
        Ok(out)
    }

    /// A running screen capture; it stops (and its thread ends) when dropped.
    pub struct ScreenSource {
        frames: PushedSource<VideoFrame>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl std::fmt::Debug for ScreenSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ScreenSource").finish_non_exhaustive()
        }
    }

    impl VideoSource for ScreenSource {
        fn poll_video(&mut self, _now_us: u64) -> Capture<VideoFrame> {
            self.frames.poll()
        }

        fn content_hint(&self) -> ContentHint {
            ContentHint::Text
        }
    }

    impl Drop for ScreenSource {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// Starts sharing `target` of `display` (`None`: `$DISPLAY`), frames stamped by `clock`. The first frame is grabbed before
    /// this returns, so a display that cannot be read is an error here, not a black picture.
    /// When a shared window closes, the source reports [`Capture::NoDevice`].
    ///
    /// # Errors
    /// [`MediaError::Device`]: no X11 display, an unsupported pixel format, no such window.
    pub fn open_screen(
        display: Option<&str>,
        target: ShareTarget,
        clock: SessionClock,
    ) -> Result<ScreenSource> {
        let display = Display::open(display)?;
        let first = display.grab(target, clock())?;
        let (pusher, frames): (FramePusher<VideoFrame>, _) = push_source(1);
        pusher.push(first);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let interval = Duration::from_secs(1) / SCREEN_CAPTURE_FPS;
        let thread = std::thread::Builder::new()
            .name("bedside-screen".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    match display.grab(target, clock()) {
                        Ok(frame) => pusher.push(frame),
                        Err(e) => {
                            tracing::info!(error = %e, "screen sharing ended");
                            pusher.set_device_present(false);
                            return;
                        }
                    }
                }
            })
            .map_err(x_err)?;
        Ok(ScreenSource {
            frames,
            stop,
            thread: Some(thread),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screen_content_keeps_its_resolution_and_lowers_the_frame_rate() {
        assert_eq!(screen_encoding((1920, 1080), 1800), (1920, 1080, 10));
        assert_eq!(screen_encoding((1920, 1080), 600), (1920, 1080, 10));
        assert_eq!(screen_encoding((1920, 1080), 599), (1920, 1080, 5));
        assert_eq!(screen_encoding((1280, 800), 400), (1280, 800, 5));
        // Larger screens are fitted, their aspect kept; a poor link gets 720p at 2 fps.
        assert_eq!(screen_encoding((3840, 2160), 1000), (1920, 1080, 10));
        assert_eq!(screen_encoding((2560, 1600), 1000), (1728, 1080, 10));
        assert_eq!(screen_encoding((1920, 1080), 150), (1280, 720, 2));
        // A small odd window is sent as it is, made even.
        assert_eq!(screen_encoding((801, 601), 600), (800, 600, 10));
    }

    #[test]
    fn tune_follows_the_ladder_for_a_camera_and_the_screen_policy_for_text() {
        let mut enc = H264Encoder::new(super::super::H264Config::default()).unwrap();
        let target = LadderTarget {
            width: 640,
            height: 360,
            fps: 30,
            bitrate_kbps: 600,
        };
        assert_eq!(
            tune(&mut enc, ContentHint::Motion, target, (1280, 800)).unwrap(),
            30
        );
        assert_eq!((enc.config().width, enc.config().height), (640, 360));
        assert_eq!(
            tune(&mut enc, ContentHint::Text, target, (1280, 800)).unwrap(),
            10
        );
        let c = *enc.config();
        assert_eq!((c.width, c.height, c.bitrate_bps), (1280, 800, 600_000));
        assert_eq!(enc.content(), ContentHint::Text);
        assert_eq!(
            tune(&mut enc, ContentHint::Motion, target, (1280, 800)).unwrap(),
            30
        );
        assert_eq!(enc.content(), ContentHint::Motion);
    }
}
