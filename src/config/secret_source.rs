//! Where a secret comes from: `{ env = "NAME" }`, `{ file = "PATH" }`, or (with a
//! warning) a plain string in the file itself.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::secret::Secret;

#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Read from this environment variable at load time.
    Env(String),
    /// Read from this file at load time (relative paths are relative to the config
    /// file). Kubernetes Secrets mounted as files land here.
    File(PathBuf),
    /// Written in the config file itself: accepted, with a warning.
    Inline(Secret),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(name) => f.debug_tuple("Env").field(name).finish(),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Inline(secret) => f.debug_tuple("Inline").field(secret).finish(),
        }
    }
}

impl SecretSource {
    /// Reads the secret. `env` is the environment lookup (a parameter so tests and
    /// the sandbox need not mutate the process environment). The error is a
    /// sentence that never contains the secret.
    pub fn resolve(&self, base_dir: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, String> {
        let value = match self {
            Self::Env(name) => env(name).ok_or_else(|| format!("environment variable {name} is not set"))?,
            Self::File(path) => read_secret_file(&base_dir.join(path))?,
            Self::Inline(secret) if secret.expose().is_empty() => {
                return Err(format!("{} is empty", self.describe()));
            }
            Self::Inline(secret) => return Ok(secret.clone()),
        };
        // Files written by editors and `kubectl create secret --from-file` often end in a newline.
        let trimmed = value.trim_end_matches(['\n', '\r']);
        if trimmed.is_empty() {
            return Err(format!("{} is empty", self.describe()));
        }
        Ok(Secret::new(trimmed))
    }

    /// Where the secret comes from, for messages and `check` output.
    pub fn describe(&self) -> String {
        match self {
            Self::Env(name) => format!("env {name}"),
            Self::File(path) => format!("file {}", path.display()),
            Self::Inline(_) => "inline value".to_owned(),
        }
    }

    pub fn is_inline(&self) -> bool {
        matches!(self, Self::Inline(_))
    }
}

/// The most a secret file may hold: a token, a key or a certificate is far
/// smaller, and a path pointing at something else must not be read whole.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// A secret file's text: a regular file (not a FIFO or a device, which a
/// reload would block on or read forever) of at most [`MAX_SECRET_FILE`] bytes.
pub(crate) fn read_secret_file(path: &Path) -> Result<String, String> {
    let cannot = |e: &dyn fmt::Display| format!("cannot read secret file {}: {e}", path.display());
    let bytes = super::sources::read_regular(path, MAX_SECRET_FILE).map_err(|e| cannot(&e))?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(cannot(&format_args!("larger than {} KiB", MAX_SECRET_FILE / 1024)));
    }
    String::from_utf8(bytes).map_err(|_| cannot(&"not UTF-8 text"))
}

impl<'de> serde::Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SourceVisitor)
    }
}

struct SourceVisitor;

fn unquoted<E: de::Error>() -> E {
    E::custom(
        r#"a secret is a quoted string, { env = "NAME" } or { file = "PATH" } (its value is not shown)"#,
    )
}

impl<'de> Visitor<'de> for SourceVisitor {
    type Value = SecretSource;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"{ env = "NAME" }, { file = "PATH" } or a string"#)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<SecretSource, E> {
        Ok(SecretSource::Inline(Secret::new(value)))
    }

    // A secret written unquoted (`password = 48151623`) is refused without
    // its value: serde's own message would quote it, and config errors are
    // printed by `check` and logged by a reload.
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretSource, E> {
        Err(unquoted())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretSource, E> {
        Err(unquoted())
    }

    // Integers past 64 bits (`token = 12345678901234567890123`) come here.
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<SecretSource, E> {
        Err(unquoted())
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<SecretSource, E> {
        Err(unquoted())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretSource, E> {
        Err(unquoted())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<SecretSource, E> {
        Err(unquoted())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSource, A::Error> {
        let Some(key) = map.next_key::<String>()? else {
            return Err(de::Error::custom(r#"expected { env = "NAME" } or { file = "PATH" }"#));
        };
        let value: String = map.next_value()?;
        let source = match key.as_str() {
            "env" => SecretSource::Env(value),
            "file" => SecretSource::File(PathBuf::from(value)),
            other => return Err(de::Error::unknown_field(other, &["env", "file"])),
        };
        if let Some(extra) = map.next_key::<String>()? {
            return Err(de::Error::custom(format!("`{extra}`: give exactly one of env or file")));
        }
        Ok(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dir: &Path, name: &str) -> Result<Secret, String> {
        SecretSource::File(name.into()).resolve(dir, &|_| None)
    }

    /// A secret path that names a FIFO, a directory or a huge file is refused
    /// at once: a reload used to block on the FIFO (the whole proxy with it)
    /// or read the file whole.
    #[test]
    fn only_a_small_regular_file_is_read() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("token"), "t0ken\n").expect("write");
        assert_eq!(read(dir.path(), "token").expect("read").expose(), "t0ken");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
        assert!(made.success());
        assert!(read(dir.path(), "fifo").expect_err("a FIFO").contains("not a regular file"));
        std::fs::create_dir(dir.path().join("dir")).expect("dir");
        assert!(read(dir.path(), "dir").expect_err("a directory").contains("not a regular file"));
        std::fs::write(dir.path().join("huge"), vec![b'x'; 64 * 1024 + 1]).expect("write");
        assert!(read(dir.path(), "huge").expect_err("too large").contains("larger than 64 KiB"));
        std::fs::write(dir.path().join("edge"), vec![b'x'; 64 * 1024]).expect("write");
        assert_eq!(read(dir.path(), "edge").expect("64 KiB is fine").expose().len(), 64 * 1024);
    }

    #[test]
    fn an_empty_secret_is_refused_from_every_source() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("empty"), "\n").expect("write");
        assert!(read(dir.path(), "empty").is_err());
        let inline = SecretSource::Inline(Secret::new(""));
        assert_eq!(inline.resolve(dir.path(), &|_| None).expect_err("empty"), "inline value is empty");
        let env = SecretSource::Env("E".into());
        assert!(env.resolve(dir.path(), &|_| Some(String::new())).is_err());
    }
}
