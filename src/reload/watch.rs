//! File watching for reloads. The directories of `proxy.toml` and of every secret
//! file it reads are watched (not the files): Kubernetes updates mounted
//! ConfigMaps and Secrets by swapping a `..data` symlink in the directory, which
//! a watch on the file itself would miss.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::config::{Config, SecretSource};

pub struct Watcher {
    _inner: notify::RecommendedWatcher,
}

impl Watcher {
    /// Watches the directories `config` reads from; any event in them asks for a
    /// reload. `None` when the config did not come from a file (the sandbox) or
    /// watching is not possible here (then only SIGHUP reloads).
    pub fn start(config: &Config, trigger: mpsc::Sender<()>) -> Option<Watcher> {
        let directories = directories(config);
        if directories.is_empty() {
            return None;
        }
        let handler = move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = trigger.try_send(());
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
        Some(Watcher { _inner: inner })
    }
}

/// The existing directories holding the config file and its secret files.
fn directories(config: &Config) -> BTreeSet<PathBuf> {
    let Some(config_dir) = config.file.parent().filter(|_| config.file.is_file()) else {
        return BTreeSet::new();
    };
    let config_dir = if config_dir.as_os_str().is_empty() { Path::new(".") } else { config_dir };
    let mut directories = BTreeSet::from([config_dir.to_owned()]);
    for credential in &config.credentials {
        for (_, source) in &credential.sources {
            if let SecretSource::File(path) = source
                && let Some(parent) = config_dir.join(path).parent()
            {
                directories.insert(parent.to_owned());
            }
        }
    }
    directories.retain(|d| d.is_dir());
    directories
}
