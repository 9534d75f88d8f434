//! The files a config is read from (`proxy.toml`, its secret files,
//! `upstream.ca_file`, the `listen.tls` files) and a fingerprint of what they held, so the reloader can
//! tell a real change from a touch, and a change made while the config was
//! being started from one made before it was read.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Config, SecretSource};

/// SHA-256 over each file's path and contents (a missing file counts as such).
pub type Fingerprint = [u8; 32];

/// At most `max` bytes of the regular file at `path` (more: `Ok` with the
/// first `max + 1`, for the caller to refuse). Whatever sits at the path when
/// it is opened is what is judged: opened without blocking (a FIFO put there
/// after a look at the path would hold the reloader, and the runtime thread
/// it shares, for ever), then judged by its handle, never by its name.
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut contents = Vec::new();
    file.take(max.saturating_add(1)).read_to_end(&mut contents)?;
    Ok(contents)
}

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
    let mut hash = Sha256::new();
    for file in files {
        hash.update(file.as_os_str().as_encoded_bytes());
        match read_regular(file, FINGERPRINTED) {
            Ok(contents) => {
                hash.update((contents.len() as u64).to_le_bytes());
                hash.update(&contents);
            }
            Err(_) => hash.update(u64::MAX.to_le_bytes()),
        }
    }
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_regular_file_is_read_and_a_fifo_never_blocks() {
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("token");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, 0o600.into(), 0)
            .expect("mkfifo");
        let error = read_regular(&fifo, 64).expect_err("a FIFO is refused");
        assert!(error.to_string().contains("not a regular file"), "{error}");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"0123456789").expect("write");
        assert_eq!(read_regular(&file, 64).expect("read"), b"0123456789");
        assert_eq!(
            read_regular(&file, 4).expect("read").len(),
            5,
            "one byte past the most, for the caller to refuse"
        );
        assert!(read_regular(dir.path(), 64).is_err(), "a directory");
    }
}
