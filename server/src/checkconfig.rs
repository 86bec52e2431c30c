//! What an administrator runs before a restart: `--check-config FILE` (every problem of a file,
//! each with its key) and `--print-config --config FILE` (the effective settings, secrets
//! redacted), and where the secrets come from ([`Config::load_secrets`]).
//!
//! serde stops at a file's first error; to name every one, [`check_text`] deserializes each
//! setting alone (a table holding that one key, defaults elsewhere), then checks what the
//! settings mean together on the rest.

use std::path::Path;

use crate::config::{Config, ConfigError, TlsMode};

/// One thing wrong with a configuration: the key it is about and what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn problem(key: &str, message: impl Into<String>) -> Problem {
    Problem {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// The environment variables that may carry the secrets.
pub const ADMIN_API_KEY_ENV: &str = "BEDSIDE_ADMIN_API_KEY";
pub const TOKEN_SECRET_ENV: &str = "BEDSIDE_TOKEN_SECRET";
pub const TURN_SECRET_ENV: &str = "BEDSIDE_TURN_SECRET";
pub const POSTGRES_URL_ENV: &str = "BEDSIDE_POSTGRES_URL";

const REDACTED: &str = "<redacted>";

impl Config {
    /// Fills the secrets left empty in the file from the environment, then from the
    /// `*-file` settings (first line, trimmed). What is still empty is generated and kept in
    /// the data directory, as before.
    pub fn load_secrets(&mut self) -> Result<(), ConfigError> {
        let sources = [
            (
                ADMIN_API_KEY_ENV,
                self.admin_api_key_file.clone(),
                &mut self.admin_api_key,
            ),
            (
                TOKEN_SECRET_ENV,
                self.token_secret_file.clone(),
                &mut self.token_secret,
            ),
            (
                TURN_SECRET_ENV,
                self.turn_secret_file.clone(),
                &mut self.ice.turn_secret,
            ),
            (
                POSTGRES_URL_ENV,
                self.store.postgres_url_file.clone(),
                &mut self.store.postgres_url,
            ),
        ];
        for (var, file, value) in sources {
            if !value.is_empty() {
                continue;
            }
            if let Some(v) = std::env::var(var).ok().filter(|v| !v.trim().is_empty()) {
                *value = v.trim().to_owned();
            } else if !file.as_os_str().is_empty() {
                let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
                    path: file.clone(),
                    source,
                })?;
                if let Some(mode) = loose_mode(&file) {
                    tracing::warn!(
                        file = %file.display(),
                        mode = format!("{mode:o}"),
                        "a secret file is readable by others than its owner"
                    );
                }
                *value = text.lines().next().unwrap_or("").trim().to_owned();
            }
        }
        Ok(())
    }

    /// A copy with every secret replaced by `<redacted>` (empty ones stay empty).
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        for secret in [
            &mut c.admin_api_key,
            &mut c.token_secret,
            &mut c.ice.turn_secret,
            &mut c.turn.relay.auth_secret,
            &mut c.store.postgres_url,
        ] {
            if !secret.is_empty() {
                *secret = REDACTED.to_owned();
            }
        }
        // A Redis URL may carry a password.
        if let Some(cluster) = c.cluster.as_mut()
            && !cluster.redis_url.is_empty()
        {
            cluster.redis_url = REDACTED.to_owned();
        }
        c
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(&self.redacted()).expect("a Config always serializes")
    }
}

/// The permission bits a secret should not have (group or others), when it has them.
fn loose_mode(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Every problem of the file at `path`; empty when the server would start with it.
pub fn check_file(path: &Path) -> Vec<Problem> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => return vec![problem("(file)", format!("{}: {e}", path.display()))],
    };
    let mut problems = check_text(&text);
    // Secrets written in the file itself make the file a secret.
    if let Ok(table) = text.parse::<toml::Table>() {
        let store = table.get("store").and_then(|s| s.as_table());
        let inline = [
            ("admin-api-key", table.get("admin-api-key")),
            ("token-secret", table.get("token-secret")),
            (
                "store.postgres-url",
                store.and_then(|s| s.get("postgres-url")),
            ),
        ]
        .into_iter()
        .filter(|(_, v)| v.and_then(|v| v.as_str()).is_some_and(|v| !v.is_empty()))
        .map(|(k, _)| k)
        .collect::<Vec<_>>();
        if let (Some(key), Some(mode)) = (inline.first(), loose_mode(path)) {
            problems.push(problem(
                key,
                format!(
                    "the file holds a secret but its mode is {mode:o}: chmod 600 (or 640 with the \
                     service's group) {}",
                    path.display()
                ),
            ));
        }
    }
    problems
}

/// Every problem of a configuration's text.
pub fn check_text(text: &str) -> Vec<Problem> {
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => return vec![problem("(syntax)", e.message().to_owned())],
    };
    let mut problems = Vec::new();
    let mut good = toml::Table::new();
    check_table(&table, &[], &mut good, &mut problems);
    let config = match Config::deserialize_table(good) {
        Ok(c) => c,
        Err(e) => {
            problems.push(problem("(file)", e.message().to_owned()));
            return problems;
        }
    };
    problems.extend(check_config(&config));
    problems
}

impl Config {
    fn deserialize_table(table: toml::Table) -> Result<Config, toml::de::Error> {
        Config::from_toml(&toml::to_string(&table).unwrap_or_default())
    }
}

/// A table holding only `value` at `path`.
fn nested(path: &[String], value: toml::Value) -> toml::Table {
    let mut v = value;
    for k in path.iter().rev() {
        let mut t = toml::Table::new();
        t.insert(k.clone(), v);
        v = toml::Value::Table(t);
    }
    match v {
        toml::Value::Table(t) => t,
        _ => unreachable!("path is never empty"),
    }
}

/// Sorts each setting of `table` (at `prefix`) into `good` or a problem with its key.
fn check_table(
    table: &toml::Table,
    prefix: &[String],
    good: &mut toml::Table,
    problems: &mut Vec<Problem>,
) {
    for (k, v) in table {
        let mut path = prefix.to_vec();
        path.push(k.clone());
        let key = path.join(".");
        if let toml::Value::Table(inner) = v {
            // The section must exist; then each of its settings is checked alone.
            match Config::deserialize_table(nested(&path, toml::Value::Table(Default::default()))) {
                Ok(_) => check_table(inner, &path, good, problems),
                Err(e) => problems.push(problem(&key, first_line(e.message()))),
            }
            continue;
        }
        match Config::deserialize_table(nested(&path, v.clone())) {
            Ok(_) => merge(good, nested(&path, v.clone())),
            Err(e) => problems.push(problem(&key, first_line(e.message()))),
        }
    }
}

/// serde's message, without the list of every known key that follows an unknown one.
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or(s);
    line.split(", expected one of")
        .next()
        .unwrap_or(line)
        .to_owned()
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// What the settings mean together, and what they point at on this machine.
pub fn check_config(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Err(e) = config.validate() {
        let message = match e {
            ConfigError::Invalid(m) => m,
            other => other.to_string(),
        };
        // validate()'s messages name the keys they are about: the first is the key.
        let key = message
            .split_whitespace()
            .map(|w| w.trim_matches(|c: char| !(c.is_alphanumeric() || c == '-' || c == '.')))
            .find(|w| w.contains('-') || w.contains('.'))
            .unwrap_or("(settings)")
            .to_owned();
        problems.push(Problem { key, message });
    }
    let url = &config.public_url;
    if !(url.is_empty() || url.starts_with("https://") || url.starts_with("http://")) {
        problems.push(problem(
            "public-url",
            "must start with https:// (or http:// behind a proxy that adds TLS)",
        ));
    }
    if config.tls.mode == TlsMode::Files {
        for (key, path) in [("tls.cert", &config.tls.cert), ("tls.key", &config.tls.key)] {
            if !path.as_os_str().is_empty()
                && let Err(e) = std::fs::File::open(path)
            {
                problems.push(problem(key, format!("cannot read {}: {e}", path.display())));
            }
        }
        if let Some(mode) = loose_mode(&config.tls.key) {
            problems.push(problem(
                "tls.key",
                format!("the private key's mode is {mode:o}: chmod 600 it"),
            ));
        }
    }
    let relay = &config.turn.relay;
    if config.turn.enabled {
        for (key, path) in [
            ("turn.relay.tls-cert", &relay.tls_cert),
            ("turn.relay.tls-key", &relay.tls_key),
        ] {
            if let Some(path) = path
                && let Err(e) = std::fs::File::open(path)
            {
                problems.push(problem(key, format!("cannot read {}: {e}", path.display())));
            }
        }
        let effective = config.turn_relay("");
        let all_interfaces = effective
            .listen_udp
            .iter()
            .chain(&effective.listen_tcp)
            .any(|a| a.ip().is_unspecified());
        if all_interfaces && relay.relay_ips.is_empty() {
            problems.push(problem(
                "turn.relay.relay-ips",
                "the relay listens on all addresses: list the address(es) peers reach it at",
            ));
        }
    }
    for (key, path) in [
        ("admin-api-key-file", &config.admin_api_key_file),
        ("token-secret-file", &config.token_secret_file),
        ("turn-secret-file", &config.turn_secret_file),
        ("store.postgres-url-file", &config.store.postgres_url_file),
    ] {
        if path.as_os_str().is_empty() {
            continue;
        }
        match std::fs::read_to_string(path) {
            Err(e) => problems.push(problem(key, format!("cannot read {}: {e}", path.display()))),
            Ok(text) if text.trim().is_empty() => {
                problems.push(problem(key, format!("{} is empty", path.display())))
            }
            Ok(_) => {
                if let Some(mode) = loose_mode(path) {
                    problems.push(problem(
                        key,
                        format!(
                            "{} is readable by others (mode {mode:o}): chmod 600 it",
                            path.display()
                        ),
                    ));
                }
            }
        }
    }
    if config.store.backend == crate::store::StoreBackend::Postgres
        && config.store.postgres_url.is_empty()
        && config.store.postgres_url_file.as_os_str().is_empty()
        && std::env::var_os(POSTGRES_URL_ENV).is_none()
    {
        problems.push(problem(
            "store.postgres-url",
            format!(
                "backend = \"postgres\" needs the database: store.postgres-url, \
                 store.postgres-url-file or {POSTGRES_URL_ENV}"
            ),
        ));
    }
    if !config.data_dir.as_os_str().is_empty()
        && let Err(message) = crate::filemodes::check_data_dir(&config.data_dir)
    {
        problems.push(problem("data-dir", message));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_files_when_the_config_and_environment_leave_them_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin-key");
        std::fs::write(&file, "key-from-a-file-0123456789\n").unwrap();
        let mut c = Config {
            admin_api_key_file: file.clone(),
            turn_secret_file: file.clone(),
            ..Config::default()
        };
        c.token_secret = "from-the-config".into();
        c.token_secret_file = file;
        c.load_secrets().unwrap();
        assert_eq!(c.admin_api_key, "key-from-a-file-0123456789");
        assert_eq!(c.ice.turn_secret, "key-from-a-file-0123456789");
        assert_eq!(c.token_secret, "from-the-config", "the config file wins");
        let redacted = c.to_redacted_toml();
        assert!(!redacted.contains("key-from-a-file"), "{redacted}");
        // A secret file that cannot be read is an error, not an empty secret.
        let mut c = Config {
            token_secret_file: dir.path().join("missing"),
            ..Config::default()
        };
        assert!(c.load_secrets().is_err());
    }

    #[test]
    fn the_postgres_url_is_a_secret() {
        let text =
            "[store]\nbackend = \"postgres\"\npostgres-url = \"postgresql://u:pw@db/bedside\"\n";
        let c = Config::from_toml(text).unwrap();
        let redacted = c.to_redacted_toml();
        assert!(!redacted.contains("pw@db"), "{redacted}");
        assert!(check_text(text).is_empty(), "{:?}", check_text(text));
        let missing = check_text("[store]\nbackend = \"postgres\"\n");
        if std::env::var_os(POSTGRES_URL_ENV).is_none() {
            assert_eq!(missing[0].key, "store.postgres-url", "{missing:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bedside.toml");
        std::fs::write(&file, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let problems = check_file(&file);
        assert!(
            problems.iter().any(|p| p.key == "store.postgres-url"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_section_and_a_key_inside_it_are_both_named() {
        let problems = check_text("[turn.relay]\nuser-quota = \"ten\"\n[tsl]\n");
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"turn.relay.user-quota"), "{problems:?}");
        assert!(keys.contains(&"tsl"), "{problems:?}");
    }
}
