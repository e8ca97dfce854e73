//! The edge of the configuration: reads the config file and the files it names (TLS certificates,
//! keys, client CAs), each up to a size limit, and builds the listeners' rustls configs from them.
//!
//! [`crate::config`] is a pure function of the config text; everything that touches the filesystem
//! for it is here, called by the binary (start, SIGHUP, `--check`) and by the gateway (start,
//! reload). Errors name the config file, line and key that named the file, as the parser's do.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use crate::config::{AccessLogTarget, Config, ConfigError, FileRef, TlsFiles};
use crate::tls::{server_tls_config, TlsConfig};

/// The largest config file read. Real ones are a few KiB; this leaves room for thousands of
/// endpoints and stops a mistaken path (a log file, a device) from being read into memory whole.
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;
/// The largest certificate, key or CA file read. A chain of a few certificates is a few KiB, a CA
/// bundle of every public root about 250 KiB; `cert = "/dev/zero"` stops here.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Reads a config file (at most [`MAX_CONFIG_BYTES`]), parses and validates it, and reads and checks
/// the TLS files it names: what `--check` runs, and what start-up and SIGHUP load.
pub fn config_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let whole = |message: String| ConfigError {
        file: file.clone(),
        position: None,
        key: String::new(),
        message,
    };
    let data = read_capped(path, MAX_CONFIG_BYTES, "config file")
        .map_err(|e| whole(format!("cannot read config file: {e}")))?;
    let text = String::from_utf8(data).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = valid.len() - valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
        ConfigError {
            position: Some((line, col)),
            ..whole("the config file is not valid UTF-8".into())
        }
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let config = Config::parse(&text, &file, &base)?;
    listener_tls(&config)?;
    access_log_dir(&config)?;
    Ok(config)
}

/// Checks that the access log's file can be created: its directory exists and the path is not a
/// directory. The file itself is not created: `--check` changes nothing.
pub fn access_log_dir(config: &Config) -> Result<(), ConfigError> {
    let Some(log) = &config.access_log else {
        return Ok(());
    };
    let (AccessLogTarget::File(path), Some(place)) = (&log.target, &log.place) else {
        return Ok(());
    };
    if path.is_dir() {
        return Err(place.error(format!("{} is a directory, not a file", path.display())));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir.filter(|d| !d.is_dir()) {
        return Err(place.error(format!("directory {} does not exist", dir.display())));
    }
    Ok(())
}

/// Each listener's rustls server config, in the config's order (None: plaintext h2c), built from its
/// freshly read TLS files: the certificate and key must make a usable pair.
pub fn listener_tls(config: &Config) -> Result<Vec<Option<rustls::ServerConfig>>, ConfigError> {
    config
        .listeners
        .iter()
        .map(|l| l.tls.as_ref().map(server_tls).transpose())
        .collect()
}

/// Reads a listener's TLS files and builds its rustls server config with
/// [`crate::tls::server_tls_config`].
fn server_tls(files: &TlsFiles) -> Result<rustls::ServerConfig, ConfigError> {
    let material = read_tls(files)?;
    server_tls_config(&material)
        .map_err(|e| files.place.error(format!("unusable certificate/key: {e}")))
}

/// Reads and decodes the PEM files of `[listeners.tls]`.
fn read_tls(files: &TlsFiles) -> Result<TlsConfig, ConfigError> {
    let cert_chain = read_certs(&files.cert)?;
    let data = read_pem(&files.key)?;
    let path = files.key.path.display();
    let private_key = rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| files.key.place.error(format!("invalid PEM in {path}: {e}")))?
        .ok_or_else(|| {
            files
                .key
                .place
                .error(format!("no private key found in {path}"))
        })?;
    let client_ca_certs = match &files.client_ca {
        Some(ca) => read_certs(ca)?,
        None => Vec::new(),
    };
    Ok(TlsConfig {
        cert: files.cert.path.clone(),
        key: files.key.path.clone(),
        client_ca: files.client_ca.as_ref().map(|ca| ca.path.clone()),
        cert_chain,
        private_key: Arc::new(private_key),
        client_ca_certs,
    })
}

/// The certificates of a PEM file; at least one.
fn read_certs(
    file: &FileRef,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
    let data = read_pem(file)?;
    let path = file.path.display();
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file.place.error(format!("invalid PEM in {path}: {e}")))?;
    if certs.is_empty() {
        return Err(file.place.error(format!("no certificate found in {path}")));
    }
    Ok(certs)
}

fn read_pem(file: &FileRef) -> Result<Vec<u8>, ConfigError> {
    read_capped(&file.path, MAX_PEM_BYTES, "PEM file").map_err(|e| {
        file.place
            .error(format!("cannot read {}: {e}", file.path.display()))
    })
}

/// Reads at most `limit` bytes of a file; a longer one (or an endless one such as /dev/zero) is an
/// error naming the limit, after reading `limit + 1` bytes.
fn read_capped(path: &Path, limit: u64, what: &str) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    File::open(path)?.take(limit + 1).read_to_end(&mut data)?;
    if data.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "larger than {} MiB, the limit for a {what}",
                limit / (1024 * 1024)
            ),
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn listener_with_tls(cert: &str, key: &str) -> String {
        format!(
            "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[listeners.tls]\ncert = {cert:?}\nkey = {key:?}\n"
        )
    }

    fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
        let path = dir.join("grpcgate.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `cert = "/dev/zero"` once read until memory ran out; now it stops at the limit, at once.
    #[test]
    fn an_endless_pem_file_stops_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), &listener_with_tls("/dev/zero", "/dev/zero"));
        let started = Instant::now();
        let e = config_file(&path).unwrap_err().to_string();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            e,
            format!(
                "{}:5:8: listeners[0].tls.cert: cannot read /dev/zero: larger than 1 MiB, the limit for a PEM file",
                path.display()
            )
        );
    }

    #[test]
    fn an_oversized_config_file_names_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        // A file of exactly the limit is read (and found to hold no certificate).
        let at_limit = dir.path().join("at-limit.crt");
        std::fs::write(&at_limit, vec![b'\n'; MAX_PEM_BYTES as usize]).unwrap();
        let path = write_config(dir.path(), &listener_with_tls("at-limit.crt", "a.key"));
        let e = config_file(&path).unwrap_err().to_string();
        assert!(
            e.contains(":5:8: listeners[0].tls.cert: no certificate found in"),
            "{e}"
        );

        let mut text = listener_with_tls("a.crt", "a.key");
        text.push_str(&"#".repeat(MAX_CONFIG_BYTES as usize));
        let path = write_config(dir.path(), &text);
        let e = config_file(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: cannot read config file: larger than 4 MiB, the limit for a config file",
                path.display()
            )
        );
        let e = config_file("/dev/zero").unwrap_err().to_string();
        assert!(
            e.ends_with("larger than 4 MiB, the limit for a config file"),
            "{e}"
        );
    }

    #[test]
    fn a_key_file_over_the_limit_is_refused_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: FileRef {
                path: "/dev/null".into(),
                place: crate::config::Place {
                    file: "x.toml".into(),
                    position: Some((5, 8)),
                    key: "listeners[0].tls.cert".into(),
                },
            },
            key: FileRef {
                path: dir.path().join("k"),
                place: crate::config::Place {
                    file: "x.toml".into(),
                    position: Some((6, 7)),
                    key: "listeners[0].tls.key".into(),
                },
            },
            client_ca: None,
            place: crate::config::Place {
                file: "x.toml".into(),
                position: Some((5, 8)),
                key: "listeners[0].tls".into(),
            },
        };
        std::fs::write(&files.key.path, vec![b'A'; MAX_PEM_BYTES as usize + 10]).unwrap();
        let e = read_pem(&files.key).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "x.toml:6:7: listeners[0].tls.key: cannot read {}: larger than 1 MiB, the limit for a PEM file",
                files.key.path.display()
            )
        );
    }

    #[test]
    fn invalid_utf8_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        std::fs::write(&path, b"workers = 1\nname = \"a\xffb\"\n").unwrap();
        let e = config_file(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:2:10: the config file is not valid UTF-8",
                path.display()
            )
        );
    }
}
