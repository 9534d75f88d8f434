//! The files a config is read from (`proxy.toml`, its secret files,
//! `upstream.ca_file`) and a fingerprint of what they held, so the reloader can
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
    files.sort();
    files.dedup();
    Some(files)
}

/// What `files` hold now.
pub fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    let mut hash = Sha256::new();
    for file in files {
        hash.update(file.as_os_str().as_encoded_bytes());
        match std::fs::read(file) {
            Ok(contents) => {
                hash.update((contents.len() as u64).to_le_bytes());
                hash.update(&contents);
            }
            Err(_) => hash.update(u64::MAX.to_le_bytes()),
        }
    }
    hash.finalize().into()
}
