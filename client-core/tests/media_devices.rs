//! Real devices (feature `devices`). Enumeration must work with no devices at all; the loopback
//! test needs a sound server with a null sink whose monitor is the default source and only runs
//! when `BEDSIDE_AUDIO_LOOPBACK=1`. With no sound card (cpal then sees only ALSA "null"), start
//! PulseAudio with a private HOME and XDG_RUNTIME_DIR: `pulseaudio -L
//! module-native-protocol-unix -L "module-null-sink sink_name=nullsink rate=48000 channels=2"`,
//! then `pactl set-default-source nullsink.monitor`.
#![cfg(feature = "devices")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bedside_client_core::media::devices::{
    DeviceKind, Microphone, SessionClock, Speaker, enumerate,
};
use bedside_client_core::media::{
    AudioFrame, AudioSource, Capture, DOCTOR_TONE_HZ, PATIENT_TONE_HZ, ToneConfig, ToneSource,
    detect_tone, push_source,
};

#[test]
fn enumerate_never_fails() {
    let devices = enumerate();
    eprintln!("{devices:#?}");
    for d in &devices {
        assert!(!d.name.is_empty());
    }
    let cameras = devices
        .iter()
        .filter(|d| d.kind == DeviceKind::Camera)
        .count();
    eprintln!("{cameras} cameras");
}

#[test]
fn speaker_to_microphone_loopback() {
    if std::env::var("BEDSIDE_AUDIO_LOOPBACK").as_deref() != Ok("1") {
        eprintln!("skipped: set BEDSIDE_AUDIO_LOOPBACK=1 with a null sink as default (module doc)");
        return;
    }
    let epoch = Instant::now();
    let clock: SessionClock = Arc::new(move || epoch.elapsed().as_micros() as u64);
    let mut tone = ToneSource::new(ToneConfig {
        freq_hz: PATIENT_TONE_HZ,
        marker_period_ms: 0,
        ..Default::default()
    });
    let _speaker = Speaker::open(None, move |now| tone.next_frame(now), clock.clone()).unwrap();
    let (pusher, mut mic_src) = push_source::<AudioFrame>(50);
    let _mic = Microphone::open(None, pusher, clock.clone()).unwrap();
    let mut heard = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match mic_src.poll_audio(clock()) {
            Capture::Frame(f) => heard.push(detect_tone(
                &f.samples[..],
                &[DOCTOR_TONE_HZ, PATIENT_TONE_HZ],
            )),
            Capture::Pending => std::thread::sleep(Duration::from_millis(5)),
            Capture::NoDevice => panic!("microphone lost"),
        }
    }
    let patient = heard
        .iter()
        .filter(|h| **h == Some(PATIENT_TONE_HZ))
        .count();
    eprintln!(
        "{} frames captured, {patient} with the patient's tone",
        heard.len()
    );
    assert!(heard.len() > 100);
    assert!(patient > heard.len() / 2);
}
