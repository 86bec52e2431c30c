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
    let _mic = Microphone::open(Some("alsa:null"), pusher, clock.clone()).unwrap();
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

/// ALSA's `null` device has no clock: read freely, it handed over about 3,500 frames a second
/// (70 times real time) and starved the call's video. Opened through `Microphone` and
/// `Speaker`, it runs at real time plus at most the one second of catch-up credit.
#[test]
fn a_device_with_no_clock_is_paced_to_real_time() {
    let null = "alsa:null";
    if !enumerate()
        .iter()
        .any(|d| d.kind == DeviceKind::Microphone && d.id == null)
    {
        let why = "no ALSA null device (libasound2 not installed?)";
        assert!(std::env::var("CI").is_err(), "{why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let epoch = Instant::now();
    let clock: SessionClock = Arc::new(move || epoch.elapsed().as_micros() as u64);
    let (pusher, mut mic_src) = push_source::<AudioFrame>(500);
    let pulled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = pulled.clone();
    let speaker = Speaker::open(
        Some(null),
        move |now| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            AudioFrame::silence(now)
        },
        clock.clone(),
    )
    .unwrap();
    let mic = Microphone::open(Some(null), pusher, clock.clone()).unwrap();
    let start = Instant::now();
    let mut captured = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        match mic_src.poll_audio(clock()) {
            Capture::Frame(_) => captured += 1,
            Capture::Pending => std::thread::sleep(Duration::from_millis(2)),
            Capture::NoDevice => panic!("microphone lost"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop((mic, speaker));
    let pulled = pulled.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("in {secs:.2} s: {captured} frames captured, {pulled} played");
    // 50 frames a second, plus the one second of credit, plus a frame of slack.
    let most = (50.0 * (secs + 1.0)) as u64 + 1;
    assert!(captured <= most && captured >= 100, "{captured} captured");
    assert!(pulled <= most && pulled >= 100, "{pulled} played");
}
