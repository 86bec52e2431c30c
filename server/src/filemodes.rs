//! Who may read the data directory: the store holds the token and relay secrets in the clear,
//! so the directory is 0700 and its files 0600 (the store's `-wal` and `-shm` files too:
//! SQLite creates them with the mode of the database file, which is created 0600 first).
//! A data directory others can enter while it holds secrets is refused at start-up (the
//! secrets may have been read: the administrator must look, tighten it and perhaps rotate
//! them); one that holds none yet is made 0700 before the first secret is written.

use std::path::Path;

/// The files of the data directory that hold secrets.
pub const SECRET_FILES: &[&str] = &[
    "bedside.db",
    "bedside.db-wal",
    "bedside.db-shm",
    "admin-api-key",
    "dev-key.pem",
];

/// Creates `dir` (and its parents) if missing, the last one with mode 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Refuses a data directory that others may enter while it holds secrets; `Err` says what to
/// run. A missing directory is fine (it is created 0700).
pub fn check_data_dir(dir: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(dir) else {
            return Ok(());
        };
        let mode = meta.permissions().mode() & 0o777;
        let holds_secrets = SECRET_FILES.iter().any(|f| dir.join(f).exists());
        if mode & 0o007 != 0 && holds_secrets {
            return Err(format!(
                "{} holds the server's secrets but any local user may enter it (mode {mode:o}): \
                 run `chmod 700 {}`",
                dir.display(),
                dir.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Start-up: creates `dir` 0700 when missing, makes it 0700 when it holds no secret yet, and
/// refuses it (see [`check_data_dir`]) when others may enter it and it holds secrets.
pub fn prepare_data_dir(dir: &Path) -> Result<(), String> {
    create_private_dir(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    check_data_dir(dir)?;
    let holds_secrets = SECRET_FILES.iter().any(|f| dir.join(f).exists());
    #[cfg(unix)]
    if !holds_secrets {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Never a shared directory such as /tmp (sticky) or one another user owns.
        let ours = meta.uid() == unsafe { libc::geteuid() } && meta.mode() & 0o1000 == 0;
        if !ours || meta.mode() & 0o077 == 0 {
            return Ok(());
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make {} private: {e}", dir.display()))?;
    }
    #[cfg(not(unix))]
    let _ = holds_secrets;
    Ok(())
}

/// Makes `path` readable by its owner only (if it exists).
pub fn make_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(path) {
            Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            }
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// Creates an empty file with mode 0600 unless it exists.
pub fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop)
}
