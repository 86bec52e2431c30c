//! A virtual X display for the tests that need one (the app's window, a screen to share), and
//! a known pattern drawn on it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills (by PID) and reaps a child process when dropped.
pub struct Reaped(pub Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// Starts Xvfb on a free display number; `None` if none came up.
pub fn start_xvfb(xvfb: &Path) -> Option<(Reaped, String)> {
    for n in 90..120 {
        let socket = PathBuf::from(format!("/tmp/.X11-unix/X{n}"));
        if socket.exists() || Path::new(&format!("/tmp/.X{n}-lock")).exists() {
            continue;
        }
        let child = Command::new(xvfb)
            .args([
                format!(":{n}").as_str(),
                "-screen",
                "0",
                "1280x800x24",
                "-nolisten",
                "tcp",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut guard = Reaped(Some(child));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if socket.exists() {
                return Some((guard, format!(":{n}")));
            }
            if let Some(Ok(Some(_))) = guard.0.as_mut().map(|c| c.try_wait()) {
                break; // exited: the display was taken after all
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    None
}

/// Four 160x100 windows in the screen's bottom-right corner, white, black / black, white
/// (cells (6..8, 6..8) of an 8x8 grid over 1280x800), over every other window. They last as
/// long as the returned connection.
pub fn draw_checkerboard(display: &str) -> impl Sized {
    use x11rb::connection::Connection;
    use x11rb::protocol::xproto::{ConnectionExt, CreateWindowAux, WindowClass};
    let (conn, screen) = x11rb::connect(Some(display)).expect("connect to Xvfb");
    let root = conn.setup().roots[screen].clone();
    for (x, y, white) in [
        (960, 600, true),
        (1120, 600, false),
        (960, 700, false),
        (1120, 700, true),
    ] {
        let window = conn.generate_id().unwrap();
        let pixel = if white {
            root.white_pixel
        } else {
            root.black_pixel
        };
        conn.create_window(
            root.root_depth,
            window,
            root.root,
            x,
            y,
            160,
            100,
            0,
            WindowClass::INPUT_OUTPUT,
            0,
            &CreateWindowAux::new()
                .background_pixel(pixel)
                .override_redirect(1),
        )
        .unwrap();
        conn.map_window(window).unwrap();
    }
    conn.get_input_focus().unwrap().reply().unwrap();
    conn
}

/// Asserts that an 8x8 grid of mean luma (a probe's `received_luma_grid`) shows
/// [`draw_checkerboard`]'s four cells.
pub fn assert_checkerboard(grid: &[u8]) {
    assert_eq!(grid.len(), 64, "{grid:?}");
    for (row, col, white) in [(6, 6, true), (6, 7, false), (7, 6, false), (7, 7, true)] {
        let luma = grid[row * 8 + col];
        if white {
            assert!(
                luma > 200,
                "cell {row},{col} should be white: {luma} in {grid:?}"
            );
        } else {
            assert!(
                luma < 50,
                "cell {row},{col} should be black: {luma} in {grid:?}"
            );
        }
    }
}
