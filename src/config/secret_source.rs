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
            Self::File(path) => {
                let path = base_dir.join(path);
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?
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
