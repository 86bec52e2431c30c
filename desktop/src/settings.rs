//! What the app remembers between runs: the clinic's address and the chosen devices, in a TOML
//! file in the user's configuration directory; the doctor's token in the system keyring, never
//! in that file and never in a log.
//!
//! A settings file that cannot be read is left as it is (and not overwritten): the app starts
//! with defaults and says so.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The camera choice that sends the synthetic test pattern.
pub const TEST_PATTERN: &str = "test-pattern";
/// The microphone choice that sends the synthetic tone.
pub const TEST_TONE: &str = "test-tone";
/// The speaker choice that plays nothing.
pub const SPEAKER_OFF: &str = "off";

/// The settings file's name inside the configuration directory.
pub const FILE_NAME: &str = "desktop.toml";

/// The remembered choices. A device is `None` until the doctor picks one (the app then takes
/// the first real device, or the synthetic source when there is none), a device id, or one of
/// [`TEST_PATTERN`], [`TEST_TONE`], [`SPEAKER_OFF`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct Settings {
    /// The clinic's signaling URL (`wss://clinic.example/ws`), as last typed.
    pub server_url: String,
    pub camera: Option<String>,
    pub microphone: Option<String>,
    pub speaker: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("could not read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("could not save {path}: {reason}")]
    Unwritable { path: PathBuf, reason: String },
}

/// The settings file.
#[derive(Clone, Debug)]
pub struct SettingsFile {
    path: PathBuf,
    /// False once the file turned out unreadable: it is kept for the user, not overwritten.
    writable: bool,
}

impl SettingsFile {
    pub fn in_dir(dir: &Path) -> Self {
        SettingsFile {
            path: dir.join(FILE_NAME),
            writable: true,
        }
    }

    /// `$XDG_CONFIG_HOME/bedside` (or `~/.config/bedside`).
    pub fn default_dir() -> PathBuf {
        std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(std::env::temp_dir)
            .join("bedside")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved settings; defaults when there is no file yet.
    ///
    /// # Errors
    /// [`SettingsError::Unreadable`] for a file that exists but is not valid settings; the file
    /// is then left alone by [`Self::save`].
    pub fn load(&mut self) -> Result<Settings, SettingsError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Settings::default()),
            Err(e) => return Err(self.unreadable(e)),
        };
        toml::from_str(&text).map_err(|e| self.unreadable(e.message()))
    }

    fn unreadable(&mut self, reason: impl std::fmt::Display) -> SettingsError {
        self.writable = false;
        SettingsError::Unreadable {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    /// Writes `settings` (atomically: a temporary file renamed over the old one). Does nothing
    /// when the existing file could not be read.
    ///
    /// # Errors
    /// [`SettingsError::Unwritable`] when the directory or file cannot be written.
    pub fn save(&self, settings: &Settings) -> Result<(), SettingsError> {
        if !self.writable {
            return Ok(());
        }
        let err = |e: std::io::Error| SettingsError::Unwritable {
            path: self.path.clone(),
            reason: e.to_string(),
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let body = format!(
            "# Bedside desktop settings (the doctor's token is kept in the system keyring).\n{}",
            toml::to_string(settings).expect("settings serialize")
        );
        let tmp = self.path.with_extension("toml.tmp");
        std::fs::write(&tmp, body).map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)
    }
}

/// Where the doctor's token is kept between runs.
pub trait SecretStore: Send + Sync {
    /// The token saved for `server_url`, if any.
    fn token(&self, server_url: &str) -> Option<String>;
    /// Saves the token for `server_url`.
    ///
    /// # Errors
    /// Why it could not be saved (no keyring on this system, access refused), in words.
    fn save_token(&self, server_url: &str, token: &str) -> Result<(), String>;
    /// Forgets the token saved for `server_url` (signing out); nothing saved is not an error.
    ///
    /// # Errors
    /// Why it could not be removed, in words.
    fn forget_token(&self, server_url: &str) -> Result<(), String>;
}

/// The operating system's keyring (Keychain, Credential Manager, the Linux kernel keyring).
pub struct Keyring;

const KEYRING_SERVICE: &str = "bedside-desktop";

impl SecretStore for Keyring {
    fn token(&self, server_url: &str) -> Option<String> {
        keyring::Entry::new(KEYRING_SERVICE, server_url)
            .and_then(|e| e.get_password())
            .ok()
    }

    fn save_token(&self, server_url: &str, token: &str) -> Result<(), String> {
        keyring::Entry::new(KEYRING_SERVICE, server_url)
            .and_then(|e| e.set_password(token))
            .map_err(|e| match e {
                keyring::Error::NoStorageAccess(_) | keyring::Error::PlatformFailure(_) => {
                    "this system has no usable keyring".to_owned()
                }
                // Linux's kernel keyring answers this when the session has no keyring.
                keyring::Error::NoEntry => "this session has no keyring".to_owned(),
                other => other.to_string(),
            })
    }

    fn forget_token(&self, server_url: &str) -> Result<(), String> {
        match keyring::Entry::new(KEYRING_SERVICE, server_url).and_then(|e| e.delete_credential()) {
            Ok(()) | Err(keyring::Error::NoEntry) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_a_missing_file_is_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = SettingsFile::in_dir(&dir.path().join("nested"));
        assert_eq!(file.load().unwrap(), Settings::default());
        let s = Settings {
            server_url: "wss://clinic.example/ws".into(),
            camera: Some("0".into()),
            microphone: Some(TEST_TONE.into()),
            speaker: None,
        };
        file.save(&s).unwrap();
        let text = std::fs::read_to_string(file.path()).unwrap();
        assert!(
            text.contains("server-url = \"wss://clinic.example/ws\""),
            "{text}"
        );
        assert_eq!(
            SettingsFile::in_dir(&dir.path().join("nested"))
                .load()
                .unwrap(),
            s
        );
    }

    #[test]
    fn an_unreadable_file_is_reported_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, "server-url = [not toml").unwrap();
        let mut file = SettingsFile::in_dir(dir.path());
        let err = file.load().unwrap_err();
        assert!(err.to_string().contains(FILE_NAME), "{err}");
        file.save(&Settings::default()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "server-url = [not toml",
            "the doctor's file was overwritten"
        );
        // Unknown keys (a newer version's) are not an error.
        std::fs::write(&path, "server-url = \"ws://x/ws\"\nfuture-thing = 1\n").unwrap();
        assert_eq!(
            SettingsFile::in_dir(dir.path()).load().unwrap().server_url,
            "ws://x/ws"
        );
    }
}
