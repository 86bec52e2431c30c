//! I420 to RGBA for egui textures.

use bedside_client_core::media::frame::VideoFrame;
use egui::ColorImage;

/// Converts a decoded I420 frame (BT.601, limited range) to an egui image.
pub fn i420_to_image(frame: &VideoFrame) -> ColorImage {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let (y, u, v) = (frame.y(), frame.u(), frame.v());
    let cw = w.div_ceil(2);
    let mut rgba = vec![0u8; w * h * 4];
    for row in 0..h {
        let yrow = &y[row * w..row * w + w];
        let crow = (row / 2) * cw;
        let out = &mut rgba[row * w * 4..(row + 1) * w * 4];
        for (col, px) in out.chunks_exact_mut(4).enumerate() {
            let c = 298 * (i32::from(yrow[col]) - 16);
            let d = i32::from(u[crow + col / 2]) - 128;
            let e = i32::from(v[crow + col / 2]) - 128;
            px[0] = clamp((c + 409 * e + 128) >> 8);
            px[1] = clamp((c - 100 * d - 208 * e + 128) >> 8);
            px[2] = clamp((c + 516 * d + 128) >> 8);
            px[3] = 255;
        }
    }
    ColorImage::from_rgba_unmultiplied([w, h], &rgba)
}

fn clamp(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_frame_converts_to_grey() {
        let frame = VideoFrame::filled(6, 4, 126, 0).unwrap();
        let img = i420_to_image(&frame);
        assert_eq!(img.size, [6, 4]);
        let p = img.pixels[5];
        assert!(p.r() == p.g() && p.g() == p.b(), "{p:?}");
        assert!((127..=129).contains(&p.r()), "{p:?}");
    }
}
