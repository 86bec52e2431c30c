//! The camera, microphone and speaker pickers: what they list and what a choice opens. Every
//! list ends with a synthetic choice (test pattern, test tone, no playback), so a computer
//! with no devices still holds a consultation, and says so.

use std::sync::Arc;

use bedside_client_core::media::{AudioSource, DOCTOR_TONE_HZ, PlayedAudio, VideoSource};
use bedside_client_core::pipeline::MediaSources;

use crate::settings::{SPEAKER_OFF, TEST_PATTERN, TEST_TONE};

/// The size the doctor's camera is sent at (the encoder scales other sizes).
pub const SEND_WIDTH: u32 = 640;
pub const SEND_HEIGHT: u32 = 360;

/// One entry of a picker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// A device id, or one of the synthetic choices.
    pub id: String,
    pub name: String,
}

impl Choice {
    fn new(id: &str, name: &str) -> Self {
        Choice {
            id: id.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn is_synthetic(&self) -> bool {
        [TEST_PATTERN, TEST_TONE, SPEAKER_OFF].contains(&self.id.as_str())
    }
}

/// What the three pickers offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceLists {
    pub cameras: Vec<Choice>,
    pub microphones: Vec<Choice>,
    pub speakers: Vec<Choice>,
}

impl Default for DeviceLists {
    /// No devices: only the synthetic choices.
    fn default() -> Self {
        DeviceLists::with_devices(Vec::new(), Vec::new(), Vec::new())
    }
}

impl DeviceLists {
    /// The real devices found, each list followed by its synthetic choice.
    pub fn with_devices(
        mut cameras: Vec<Choice>,
        mut microphones: Vec<Choice>,
        mut speakers: Vec<Choice>,
    ) -> Self {
        cameras.push(Choice::new(TEST_PATTERN, "Test pattern"));
        microphones.push(Choice::new(TEST_TONE, "Test tone"));
        speakers.push(Choice::new(SPEAKER_OFF, "No sound"));
        DeviceLists {
            cameras,
            microphones,
            speakers,
        }
    }

    /// The devices of this computer. Slow (it probes hardware): call off the UI thread.
    #[cfg(feature = "devices")]
    pub fn enumerate() -> Self {
        use bedside_client_core::media::devices::{DeviceKind, enumerate};
        let found = enumerate();
        let of = |kind| {
            found
                .iter()
                .filter(|d| d.kind == kind && !d.id.is_empty())
                .map(|d| Choice::new(&d.id, &readable_name(&d.name)))
                .collect()
        };
        DeviceLists::with_devices(
            of(DeviceKind::Camera),
            of(DeviceKind::Microphone),
            of(DeviceKind::Speaker),
        )
    }

    /// This build has no device support: only the synthetic choices.
    #[cfg(not(feature = "devices"))]
    pub fn enumerate() -> Self {
        DeviceLists::default()
    }
}

/// Which entry of `list` to use: the saved choice while it is still there, else the first
/// entry (a real device when there is one, the synthetic choice otherwise).
pub fn resolve(list: &[Choice], saved: Option<&str>) -> String {
    saved
        .filter(|s| list.iter().any(|c| c.id == *s))
        .or_else(|| list.first().map(|c| c.id.as_str()))
        .unwrap_or_default()
        .to_owned()
}

/// Opens the camera `id` (or the test pattern) as the call's video source.
///
/// # Errors
/// Why the camera cannot be used, in words for the doctor.
pub fn open_camera(id: &str) -> Result<Box<dyn VideoSource>, String> {
    if id == TEST_PATTERN {
        return Ok(MediaSources::synthetic(SEND_WIDTH, SEND_HEIGHT, 1, DOCTOR_TONE_HZ).video);
    }
    #[cfg(feature = "devices")]
    {
        bedside_client_core::media::devices::open_camera(id, clock())
            .map(|c| Box::new(c) as Box<dyn VideoSource>)
            .map_err(|e| format!("The camera could not be opened: {e}"))
    }
    #[cfg(not(feature = "devices"))]
    Err("This build of Bedside has no camera support.".into())
}

/// Opens the microphone `id` (or the test tone) as the call's audio source.
///
/// # Errors
/// Why the microphone cannot be used, in words for the doctor.
pub fn open_microphone(id: &str) -> Result<Box<dyn AudioSource>, String> {
    if id == TEST_TONE {
        return Ok(MediaSources::synthetic(SEND_WIDTH, SEND_HEIGHT, 1, DOCTOR_TONE_HZ).audio);
    }
    #[cfg(feature = "devices")]
    {
        // Echo cancellation, noise suppression and automatic gain, against what the speaker
        // plays (see client-core's media/apm.rs).
        bedside_client_core::media::apm::open_processed_microphone(Some(id), clock(), echo_path())
            .map(|m| Box::new(m) as Box<dyn AudioSource>)
            .map_err(|e| format!("The microphone could not be opened: {e}"))
    }
    #[cfg(not(feature = "devices"))]
    Err("This build of Bedside has no microphone support.".into())
}

/// Something playing the call's audio until dropped.
pub type Playback = Box<dyn std::any::Any>;

/// Plays the call's decoded audio on speaker `id`; `None` for no sound.
///
/// # Errors
/// Why the speaker cannot be used, in words for the doctor.
pub fn open_speaker(id: &str, audio: Arc<PlayedAudio>) -> Result<Option<Playback>, String> {
    if id == SPEAKER_OFF {
        return Ok(None);
    }
    #[cfg(feature = "devices")]
    {
        bedside_client_core::media::apm::open_speaker_with_reference(
            Some(id),
            audio,
            clock(),
            echo_path().clone(),
        )
        .map(|s| Some(Box::new(s) as Playback))
        .map_err(|e| format!("The speaker could not be opened: {e}"))
    }
    #[cfg(not(feature = "devices"))]
    {
        let _ = audio;
        Err("This build of Bedside has no speaker support.".into())
    }
}

/// The echo reference shared by the app's one speaker and one microphone.
#[cfg(feature = "devices")]
fn echo_path() -> &'static bedside_client_core::media::apm::EchoPath {
    static PATH: std::sync::OnceLock<bedside_client_core::media::apm::EchoPath> =
        std::sync::OnceLock::new();
    PATH.get_or_init(Default::default)
}

/// A device name a person understands. ALSA's plug-in devices describe themselves by what they
/// do ("Discard all samples (playback) or generate zero samples (capture)" is the `null`
/// device); known ones get a short name, and any long description is cut at its first comma
/// or parenthesis.
pub fn readable_name(name: &str) -> String {
    const KNOWN: [(&str, &str); 6] = [
        ("Discard all samples", "Silent device (no sound card)"),
        ("Default ALSA Output", "System default"),
        ("Default Audio Device", "System default"),
        ("PulseAudio Sound Server", "PulseAudio"),
        ("PipeWire Sound Server", "PipeWire"),
        ("Rate Converter Plugin", "Rate converter"),
    ];
    if let Some((_, short)) = KNOWN.iter().find(|(k, _)| name.starts_with(k)) {
        return (*short).to_owned();
    }
    let cut = name.find([',', '(', '\n']).unwrap_or(name.len());
    let short = name[..cut].trim();
    if short.is_empty() {
        "Unnamed device".to_owned()
    } else {
        short.to_owned()
    }
}

/// The pipeline's time base, for stamping captured frames.
#[cfg(feature = "devices")]
fn clock() -> bedside_client_core::media::devices::SessionClock {
    Arc::new(bedside_client_core::pipeline::wall_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_readable() {
        assert_eq!(
            readable_name("Discard all samples (playback) or generate zero samples (capture)"),
            "Silent device (no sound card)"
        );
        assert_eq!(
            readable_name("HDA Intel PCH, ALC257 Analog\nFront speakers"),
            "HDA Intel PCH"
        );
        assert_eq!(readable_name("USB camera"), "USB camera");
        assert_eq!(readable_name(" (x)"), "Unnamed device");
    }

    #[test]
    fn every_list_ends_with_its_synthetic_choice() {
        let lists = DeviceLists::with_devices(
            vec![Choice::new("0", "USB camera")],
            Vec::new(),
            vec![Choice::new("alsa:hw0", "Speakers")],
        );
        assert_eq!(lists.cameras.last().unwrap().id, TEST_PATTERN);
        assert_eq!(lists.microphones, vec![Choice::new(TEST_TONE, "Test tone")]);
        assert!(lists.speakers.last().unwrap().is_synthetic());
        assert!(!lists.speakers[0].is_synthetic());
    }

    #[test]
    fn a_saved_choice_wins_while_it_exists_and_a_real_device_comes_first() {
        let lists = DeviceLists::with_devices(
            vec![Choice::new("0", "USB camera"), Choice::new("1", "Built-in")],
            Vec::new(),
            Vec::new(),
        );
        assert_eq!(resolve(&lists.cameras, Some("1")), "1");
        assert_eq!(resolve(&lists.cameras, Some(TEST_PATTERN)), TEST_PATTERN);
        // Unplugged since: the first device.
        assert_eq!(resolve(&lists.cameras, Some("7")), "0");
        assert_eq!(resolve(&lists.cameras, None), "0");
        // Nothing found: the synthetic source.
        assert_eq!(resolve(&lists.microphones, None), TEST_TONE);
    }

    #[test]
    fn synthetic_choices_open_and_a_missing_device_is_an_error_in_words() {
        assert!(open_camera(TEST_PATTERN).is_ok());
        assert!(open_microphone(TEST_TONE).is_ok());
        let audio = Arc::new(PlayedAudio::default());
        assert!(open_speaker(SPEAKER_OFF, audio.clone()).unwrap().is_none());
        // This machine has no camera: index 42 cannot open (with or without device support).
        let err = open_camera("42").err().unwrap();
        assert!(err.contains("camera"), "{err}");
        let err = open_microphone("no-such-microphone").err().unwrap();
        assert!(err.contains("microphone"), "{err}");
        let err = open_speaker("no-such-speaker", audio).err().unwrap();
        assert!(err.contains("speaker"), "{err}");
    }
}
