//! TLS for the HTTP and WebSocket port: certificate files, or a self-signed development
//! certificate generated once and kept in the data directory.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::ServerError;
use crate::config::{Config, TlsMode};

/// The rustls server configuration for `config`, or `None` when TLS is off.
pub fn server_config(
    config: &Config,
    data_dir: &Path,
) -> Result<Option<Arc<rustls::ServerConfig>>, ServerError> {
    if !config.tls_enabled() {
        return Ok(None);
    }
    let (cert_path, key_path) = match config.tls.mode {
        TlsMode::Files => (config.tls.cert.clone(), config.tls.key.clone()),
        _ => {
            let cert = data_dir.join("dev-cert.pem");
            let key = data_dir.join("dev-key.pem");
            if !cert.exists() || !key.exists() {
                write_self_signed(config, &cert, &key)?;
            }
            (cert, key)
        }
    };
    let tls_err = |what: &str, e: &dyn std::fmt::Display| ServerError::Tls(format!("{what}: {e}"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| tls_err(&cert_path.display().to_string(), &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(&cert_path.display().to_string(), &e))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!(
            "{}: no certificate in the file",
            cert_path.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| tls_err(&key_path.display().to_string(), &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err("certificate and key", &e))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(tls)))
}

fn write_self_signed(config: &Config, cert: &Path, key: &Path) -> Result<(), ServerError> {
    let mut names = vec!["localhost".to_owned()];
    let ip = config.listen.ip();
    if !ip.is_unspecified() {
        names.push(ip.to_string());
    }
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| ServerError::Tls(format!("generating a development certificate: {e}")))?;
    std::fs::write(cert, generated.cert.pem()).map_err(ServerError::Io)?;
    write_private(key, generated.signing_key.serialize_pem().as_bytes())?;
    tracing::warn!(
        "using a self-signed development certificate; configure [tls] mode = \"files\" for a real one"
    );
    Ok(())
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), ServerError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(ServerError::Io)?;
    file.write_all(contents).map_err(ServerError::Io)
}
