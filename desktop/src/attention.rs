//! Getting the doctor's attention when a patient arrives: a short two-note chime played on the
//! speaker, and the doctor's time zone for the times the app shows.

use bedside_client_core::media::{AudioFrame, FRAME_SAMPLES, PLAYED_AUDIO_CAPACITY, SAMPLE_RATE};

/// The chime: two soft notes (E5 then C5, 100 ms each, with a fade in and out), 48 kHz mono
/// in 20 ms frames. It is exactly as long as the speaker's queue holds, so none of it is lost.
pub fn chime() -> Vec<AudioFrame> {
    let total = PLAYED_AUDIO_CAPACITY * FRAME_SAMPLES;
    let half = total / 2;
    let rate = SAMPLE_RATE as f32;
    let samples: Vec<i16> = (0..total)
        .map(|n| {
            let (freq, k) = if n < half {
                (659.25, n)
            } else {
                (523.25, n - half)
            };
            let t = k as f32 / rate;
            // A quick attack and a decay to silence within each note: no click.
            let envelope = (k as f32 / 240.0).min(1.0) * (1.0 - k as f32 / half as f32);
            let s = 0.25 * envelope * (2.0 * std::f32::consts::PI * freq * t).sin();
            (s * 32767.0) as i16
        })
        .collect();
    samples
        .chunks_exact(FRAME_SAMPLES)
        .map(|c| AudioFrame::from_slice(c, 0).expect("a whole frame"))
        .collect()
}

/// This computer's offset from UTC now, in seconds (0 when the time zone is unknown).
pub fn local_utc_offset_secs() -> i32 {
    use chrono::Offset;
    chrono::Local::now().offset().fix().local_minus_utc()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chime_fits_the_speaker_queue_and_is_audible_but_not_loud() {
        let frames = chime();
        assert_eq!(frames.len(), PLAYED_AUDIO_CAPACITY);
        let peak = frames
            .iter()
            .flat_map(|f| f.samples.iter())
            .map(|s| s.unsigned_abs())
            .max()
            .unwrap();
        assert!(peak > 3000 && peak < 12000, "peak {peak}");
        // It ends in silence (no click when the speaker goes back to the call).
        assert!(frames.last().unwrap().samples[FRAME_SAMPLES - 1].unsigned_abs() < 100);
    }
}
