//! File watching for reloads. The directories of `proxy.toml` and of every file
//! it reads are watched (not the files), and those of the files their symlinks
//! lead to: Kubernetes updates mounted ConfigMaps and Secrets by swapping a
//! `..data` symlink in the directory, which a watch on the file itself would
//! miss, and a secret linked into another directory changes there.
//!
//! Only events about those files (or Kubernetes' `..`-prefixed entries) count,
//! and a reload happens only when their contents really changed: a log file
//! written beside `proxy.toml`, an editor's swap file or a `touch` is no reload.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::config::{Config, Fingerprint, files, fingerprint};

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP or [`super::ReloadHandle::request`]: reload in any case.
    Signal,
    /// A watched file may have changed: reload if its contents did.
    Files,
}

pub struct Watcher {
    _events: events::Events,
    files: Vec<PathBuf>,
    /// What the watched files held when the config was read (or last compared).
    fingerprint: Fingerprint,
}

impl Watcher {
    /// Watches the directories `config` reads from; events about its files ask
    /// for a reload. `None` when the config did not come from a file (the
    /// sandbox) or watching is not possible here (then only SIGHUP reloads).
    pub fn start(config: &Config, trigger: mpsc::Sender<Trigger>) -> Option<Watcher> {
        let files = files(config)?;
        // Each file where it is named and where its symlinks lead: a secret
        // linked into another directory changes there.
        let watched: Vec<PathBuf> =
            files.iter().cloned().chain(files.iter().filter_map(|f| std::fs::canonicalize(f).ok())).collect();
        let directories: BTreeSet<PathBuf> =
            watched.iter().filter_map(|f| f.parent().map(Path::to_owned)).filter(|d| d.is_dir()).collect();
        let names: BTreeSet<OsString> =
            watched.iter().filter_map(|f| f.file_name().map(ToOwned::to_owned)).collect();
        let relevant = move |name: &OsStr| names.contains(name) || name.as_encoded_bytes().starts_with(b"..");
        let events = match events::Events::start(&directories, relevant, trigger.clone()) {
            Ok(events) => events,
            Err(error) => {
                tracing::warn!(%error, "cannot watch files; reload with SIGHUP");
                return None;
            }
        };
        // From what the files held when the config was read: one changed since
        // (while the proxy started, or the reload was applied) is a change, and
        // is looked at now rather than at the next event, which may never come.
        let now = fingerprint(&files);
        let fingerprint = config.loaded_from.unwrap_or(now);
        if fingerprint != now {
            let _ = trigger.try_send(Trigger::Files);
        }
        Some(Watcher { _events: events, files, fingerprint })
    }

    /// Whether the files' contents differ from the last look (which this updates).
    pub fn changed(&mut self) -> bool {
        let now = fingerprint(&self.files);
        std::mem::replace(&mut self.fingerprint, now) != now
    }
}

/// The kernel's side: one inotify instance over the directories, read by a task
/// of the runtime that started it (no thread of its own), stopped when dropped.
///
/// Only finished changes are asked for: a file closed after writing, created,
/// deleted, renamed in or out, or its permissions changed. Not `IN_MODIFY`: a
/// log file written beside `proxy.toml` would otherwise wake the watcher on
/// every write, and a config half-written would be read.
#[cfg(target_os = "linux")]
mod events {
    use std::collections::BTreeSet;
    use std::ffi::OsStr;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use futures_util::StreamExt as _;
    use inotify::{Inotify, WatchMask};
    use tokio::sync::mpsc;

    use super::Trigger;

    pub struct Events {
        task: tokio::task::JoinHandle<()>,
        /// Events the kernel delivered, wanted or not (what the tests check).
        #[cfg(test)]
        pub seen: Arc<AtomicU64>,
    }

    impl Drop for Events {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Events {
        pub fn start(
            directories: &BTreeSet<PathBuf>,
            relevant: impl Fn(&OsStr) -> bool + Send + 'static,
            trigger: mpsc::Sender<Trigger>,
        ) -> std::io::Result<Events> {
            let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
            let inotify = Inotify::init()?;
            let mask = WatchMask::CLOSE_WRITE
                | WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::MOVED_FROM
                | WatchMask::MOVED_TO
                | WatchMask::ATTRIB;
            for directory in directories {
                if let Err(error) = inotify.watches().add(directory, mask) {
                    tracing::warn!(directory = %directory.display(), %error, "cannot watch; reload with SIGHUP");
                }
            }
            let _guard = runtime.enter();
            let mut events = inotify.into_event_stream([0u8; 4096])?;
            let seen = Arc::new(AtomicU64::new(0));
            let counted = seen.clone();
            let task = runtime.spawn(async move {
                while let Some(event) = events.next().await {
                    if cfg!(test) {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                    let event = match event {
                        Ok(event) => event,
                        Err(error) => {
                            // Nothing more can be read: one last look, then SIGHUP only.
                            tracing::warn!(%error, "file watching stopped; reload with SIGHUP");
                            let _ = trigger.try_send(Trigger::Files);
                            return;
                        }
                    };
                    // No name: the event is about a directory itself, or the
                    // kernel's queue overflowed. Either may hide a change.
                    if event.name.as_deref().is_none_or(&relevant) {
                        let _ = trigger.try_send(Trigger::Files);
                    }
                }
            });
            Ok(Events {
                task,
                #[cfg(test)]
                seen,
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use std::io::Write as _;
        use std::time::Duration;

        use super::*;

        #[tokio::test]
        async fn writes_to_an_open_file_beside_the_config_wake_nothing() {
            let dir = tempfile::tempdir().expect("dir");
            let config = dir.path().join("proxy.toml");
            std::fs::write(&config, "old").expect("write");
            let (trigger, mut triggers) = mpsc::channel(64);
            let relevant = |name: &OsStr| name == "proxy.toml";
            let events =
                Events::start(&BTreeSet::from([dir.path().to_owned()]), relevant, trigger).expect("watch");

            // A log file beside the config, written line by line and kept open.
            let mut log = std::fs::File::create(dir.path().join("access.log")).expect("log");
            let created = 1;
            for line in 0..100 {
                writeln!(log, "line {line}").expect("log line");
            }
            // The config, written in two steps: only its close is a change.
            let mut edit = std::fs::File::create(&config).expect("open");
            edit.write_all(b"new ").expect("write");
            edit.write_all(b"config").expect("write");
            drop(edit);

            let got = tokio::time::timeout(Duration::from_secs(10), triggers.recv()).await;
            assert_eq!(got.expect("a trigger within 10 s"), Some(Trigger::Files));
            assert!(triggers.try_recv().is_err(), "one trigger, for the config's close");
            assert_eq!(
                events.seen.load(Ordering::Relaxed),
                created + 1,
                "the log's creation and the config's close: no event per write"
            );
        }
    }
}

/// Elsewhere there is no inotify: only SIGHUP reloads.
#[cfg(not(target_os = "linux"))]
mod events {
    use std::collections::BTreeSet;
    use std::ffi::OsStr;
    use std::path::PathBuf;

    use tokio::sync::mpsc;

    use super::Trigger;

    pub struct Events;

    impl Events {
        pub fn start(
            _directories: &BTreeSet<PathBuf>,
            _relevant: impl Fn(&OsStr) -> bool + Send + 'static,
            _trigger: mpsc::Sender<Trigger>,
        ) -> std::io::Result<Events> {
            Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "file watching needs Linux's inotify"))
        }
    }
}
