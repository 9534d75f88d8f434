//! The files a config is read from (`proxy.toml`, its secret files,
//! `upstream.ca_file`, the `listen.tls` files) and a fingerprint of what they held, so the reloader can
//! tell a real change from a touch, and a change made while the config was
//! being started from one made before it was read.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Config, SecretSource};

/// SHA-256 over each file's path and contents (a missing file counts as such).
pub type Fingerprint = [u8; 32];

/// The config file and every file it reads, as paths the watcher can compare;
/// `None` for a config not read from a file.
pub fn files(config: &Config) -> Option<Vec<PathBuf>> {
    let config_dir = config.file.parent().filter(|_| config.file.is_file())?;
    let config_dir = if config_dir.as_os_str().is_empty() { Path::new(".") } else { config_dir };
    let mut files = vec![config_dir.join(config.file.file_name()?)];
    for sources in &config.credential_sources {
        for (_, source) in sources {
            if let SecretSource::File(path) = source {
                files.push(config_dir.join(path));
            }
        }
    }
    files.extend(config.upstream.ca_file.clone());
    files.extend(config.listen.tls.iter().flat_map(|tls| tls.files.iter().map(|path| config_dir.join(path))));
    files.sort();
    files.dedup();
    Some(files)
}

/// The most of one file the fingerprint reads: beyond it a file is refused
/// when the config is read anyway (a secret file over 64 KiB, a config or CA
/// bundle this large is no config).
const FINGERPRINTED: u64 = 16 * 1024 * 1024;

/// What `files` hold now. Only regular files are read (a FIFO or a device the
/// config names would block the reloader or never end), each up to
/// [`FINGERPRINTED`] bytes.
pub fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    use std::io::Read;
    let mut hash = Sha256::new();
    for file in files {
        hash.update(file.as_os_str().as_encoded_bytes());
        let mut contents = Vec::new();
        let read = std::fs::metadata(file)
            .ok()
            .filter(std::fs::Metadata::is_file)
            .and_then(|_| std::fs::File::open(file).ok())
            .and_then(|f| f.take(FINGERPRINTED).read_to_end(&mut contents).ok());
        match read {
            Some(_) => {
                hash.update((contents.len() as u64).to_le_bytes());
                hash.update(&contents);
            }
            None => hash.update(u64::MAX.to_le_bytes()),
        }
    }
    hash.finalize().into()
}
