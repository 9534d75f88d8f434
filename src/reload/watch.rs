//! File watching for reloads. The directories of `proxy.toml` and of every file
//! it reads are watched (not the files): Kubernetes updates mounted ConfigMaps
//! and Secrets by swapping a `..data` symlink in the directory, which a watch on
//! the file itself would miss.
//!
//! Only events about those files (or Kubernetes' `..`-prefixed entries) count,
//! and a reload happens only when their contents really changed: a log file
//! written beside `proxy.toml`, an editor's swap file or a `touch` is no reload.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher as _};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::{Config, SecretSource};

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP or [`super::ReloadHandle::request`]: reload in any case.
    Signal,
    /// A watched file may have changed: reload if its contents did.
    Files,
}

pub struct Watcher {
    _inner: notify::RecommendedWatcher,
    files: Vec<PathBuf>,
    /// SHA-256 over the watched files' contents when the config was loaded (or last compared).
    fingerprint: [u8; 32],
}

impl Watcher {
    /// Watches the directories `config` reads from; events about its files ask
    /// for a reload. `None` when the config did not come from a file (the
    /// sandbox) or watching is not possible here (then only SIGHUP reloads).
    pub fn start(config: &Config, trigger: mpsc::Sender<Trigger>) -> Option<Watcher> {
        let files = files(config)?;
        let directories: BTreeSet<PathBuf> =
            files.iter().filter_map(|f| f.parent().map(Path::to_owned)).filter(|d| d.is_dir()).collect();
        let names: BTreeSet<OsString> =
            files.iter().filter_map(|f| f.file_name().map(ToOwned::to_owned)).collect();
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if event.kind.is_access() {
                return;
            }
            let relevant = event.paths.iter().any(|path| {
                path.file_name()
                    .is_some_and(|name| names.contains(name) || name.to_string_lossy().starts_with(".."))
            });
            if relevant {
                let _ = trigger.try_send(Trigger::Files);
            }
        };
        let mut inner = match notify::recommended_watcher(handler) {
            Ok(watcher) => watcher,
            Err(error) => {
                tracing::warn!(%error, "cannot watch files; reload with SIGHUP");
                return None;
            }
        };
        for directory in &directories {
            if let Err(error) = inner.watch(directory, RecursiveMode::NonRecursive) {
                tracing::warn!(directory = %directory.display(), %error, "cannot watch; reload with SIGHUP");
            }
        }
        let fingerprint = fingerprint(&files);
        Some(Watcher { _inner: inner, files, fingerprint })
    }

    /// Whether the files' contents differ from the last look (which this updates).
    pub fn changed(&mut self) -> bool {
        let now = fingerprint(&self.files);
        std::mem::replace(&mut self.fingerprint, now) != now
    }
}

/// The config file and every file it reads (secrets, `upstream.ca_file`), as
/// paths the watcher can compare; `None` for a config not read from a file.
fn files(config: &Config) -> Option<Vec<PathBuf>> {
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

/// SHA-256 over each file's path and contents (a missing file counts as such).
fn fingerprint(files: &[PathBuf]) -> [u8; 32] {
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
