//! A software renderer for egui_kittest snapshots: this machine has no GPU, and wgpu's software
//! adapters are not installed, so the tessellated meshes egui produces are rasterized here on
//! the CPU (triangles with barycentric coordinates, bilinear texture sampling, premultiplied
//! alpha blending, clip rectangles). The images are ours to compare against ours, run to run;
//! they are not meant to match a GPU's pixel for pixel.

use std::collections::HashMap;

use egui::epaint::{ClippedPrimitive, Primitive, Vertex};
use egui::{Color32, ImageData, TextureId, TexturesDelta};
use egui_kittest::TestRenderer;

/// Straight-alpha RGBA texture, premultiplied on sampling as egui expects.
struct Texture {
    size: [usize; 2],
    pixels: Vec<Color32>,
}

#[derive(Default)]
pub struct SoftRenderer {
    textures: HashMap<TextureId, Texture>,
}

impl TestRenderer for SoftRenderer {
    fn handle_delta(&mut self, delta: &mut TexturesDelta) {
        let set: Vec<_> = delta
            .set
            .drain()
            .flat_map(|(id, deltas)| deltas.into_iter().map(move |d| (id, d)))
            .collect();
        for (id, image_delta) in set {
            let ImageData::Color(image) = &image_delta.image;
            match image_delta.pos {
                None => {
                    self.textures.insert(
                        id,
                        Texture {
                            size: image.size,
                            pixels: image.pixels.clone(),
                        },
                    );
                }
                Some([x0, y0]) => {
                    if let Some(tex) = self.textures.get_mut(&id) {
                        for y in 0..image.size[1] {
                            for x in 0..image.size[0] {
                                let (tx, ty) = (x0 + x, y0 + y);
                                if tx < tex.size[0] && ty < tex.size[1] {
                                    tex.pixels[ty * tex.size[0] + tx] =
                                        image.pixels[y * image.size[0] + x];
                                }
                            }
                        }
                    }
                }
            }
        }
        for id in delta.free.drain() {
            self.textures.remove(&id);
        }
    }

    fn render(
        &mut self,
        ctx: &egui::Context,
        output: &egui::FullOutput,
    ) -> Result<image::RgbaImage, String> {
        let mut delta = output.textures_delta.clone();
        self.handle_delta(&mut delta);
        let ppp = output.pixels_per_point;
        let screen = ctx.content_rect();
        let (w, h) = (
            (screen.width() * ppp).round() as usize,
            (screen.height() * ppp).round() as usize,
        );
        // Premultiplied RGBA in f32, starting from egui's panel background.
        let mut canvas = vec![[0.0f32; 4]; w * h];
        let bg = ctx.global_style().visuals.panel_fill;
        for px in &mut canvas {
            *px = rgba(bg);
        }
        let primitives = ctx.tessellate(output.shapes.clone(), ppp);
        for ClippedPrimitive {
            clip_rect,
            primitive,
        } in &primitives
        {
            let Primitive::Mesh(mesh) = primitive else {
                continue;
            };
            let clip = [
                (clip_rect.min.x * ppp).max(0.0),
                (clip_rect.min.y * ppp).max(0.0),
                (clip_rect.max.x * ppp).min(w as f32),
                (clip_rect.max.y * ppp).min(h as f32),
            ];
            let texture = self.textures.get(&mesh.texture_id);
            for tri in mesh.indices.chunks_exact(3) {
                let v = [
                    &mesh.vertices[tri[0] as usize],
                    &mesh.vertices[tri[1] as usize],
                    &mesh.vertices[tri[2] as usize],
                ];
                draw_triangle(&mut canvas, w, clip, ppp, v, texture);
            }
        }
        let mut out = image::RgbaImage::new(w as u32, h as u32);
        for (i, px) in canvas.iter().enumerate() {
            let a = px[3].clamp(0.0, 1.0);
            let un = |c: f32| {
                if a > 0.0 {
                    ((c / a).clamp(0.0, 1.0) * 255.0).round() as u8
                } else {
                    0
                }
            };
            out.put_pixel(
                (i % w) as u32,
                (i / w) as u32,
                image::Rgba([un(px[0]), un(px[1]), un(px[2]), (a * 255.0).round() as u8]),
            );
        }
        Ok(out)
    }
}

fn rgba(c: Color32) -> [f32; 4] {
    let [r, g, b, a] = c.to_array();
    [r, g, b, a].map(|v| f32::from(v) / 255.0)
}

/// The texture's premultiplied color at `uv`, bilinear.
fn sample(tex: &Texture, u: f32, v: f32) -> [f32; 4] {
    let [tw, th] = tex.size;
    let x = (u * tw as f32 - 0.5).clamp(0.0, (tw - 1) as f32);
    let y = (v * th as f32 - 0.5).clamp(0.0, (th - 1) as f32);
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(tw - 1), (y0 + 1).min(th - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let p = |x: usize, y: usize| rgba(tex.pixels[y * tw + x]);
    let (a, b, c, d) = (p(x0, y0), p(x1, y0), p(x0, y1), p(x1, y1));
    let mut out = [0.0; 4];
    for i in 0..4 {
        let top = a[i] + (b[i] - a[i]) * fx;
        let bottom = c[i] + (d[i] - c[i]) * fx;
        out[i] = top + (bottom - top) * fy;
    }
    out
}

fn draw_triangle(
    canvas: &mut [[f32; 4]],
    width: usize,
    clip: [f32; 4],
    ppp: f32,
    v: [&Vertex; 3],
    texture: Option<&Texture>,
) {
    let p = v.map(|v| (v.pos.x * ppp, v.pos.y * ppp));
    let area = (p[1].0 - p[0].0) * (p[2].1 - p[0].1) - (p[2].0 - p[0].0) * (p[1].1 - p[0].1);
    if area.abs() < 1e-6 {
        return;
    }
    let min_x = p
        .iter()
        .map(|p| p.0)
        .fold(f32::MAX, f32::min)
        .max(clip[0])
        .floor() as i64;
    let max_x = p
        .iter()
        .map(|p| p.0)
        .fold(f32::MIN, f32::max)
        .min(clip[2])
        .ceil() as i64;
    let min_y = p
        .iter()
        .map(|p| p.1)
        .fold(f32::MAX, f32::min)
        .max(clip[1])
        .floor() as i64;
    let max_y = p
        .iter()
        .map(|p| p.1)
        .fold(f32::MIN, f32::max)
        .min(clip[3])
        .ceil() as i64;
    let colors = v.map(|v| rgba(v.color));
    for y in min_y.max(0)..max_y {
        for x in min_x.max(0)..max_x {
            let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
            if cx < clip[0] || cx >= clip[2] || cy < clip[1] || cy >= clip[3] {
                continue;
            }
            let w0 = ((p[1].0 - cx) * (p[2].1 - cy) - (p[2].0 - cx) * (p[1].1 - cy)) / area;
            let w1 = ((p[2].0 - cx) * (p[0].1 - cy) - (p[0].0 - cx) * (p[2].1 - cy)) / area;
            let w2 = 1.0 - w0 - w1;
            if w0 < 0.0 || w1 < 0.0 || w2 < 0.0 {
                continue;
            }
            let mut src = [0.0f32; 4];
            for (i, s) in src.iter_mut().enumerate() {
                *s = colors[0][i] * w0 + colors[1][i] * w1 + colors[2][i] * w2;
            }
            if let Some(tex) = texture {
                let u = v[0].uv.x * w0 + v[1].uv.x * w1 + v[2].uv.x * w2;
                let t = v[0].uv.y * w0 + v[1].uv.y * w1 + v[2].uv.y * w2;
                let texel = sample(tex, u, t);
                for i in 0..4 {
                    src[i] *= texel[i];
                }
            }
            let dst = &mut canvas[y as usize * width + x as usize];
            for i in 0..4 {
                dst[i] = src[i] + dst[i] * (1.0 - src[3]);
            }
        }
    }
}
