//! A configuration problem, told in one line: file, line, key, what is wrong.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line of the offending key or value, when known.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `upstream.base_url` or `credentials[1].token`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The 1-based line that holds byte `offset` of `source`.
pub fn line_of(source: &str, offset: usize) -> usize {
    let end = offset.min(source.len());
    source.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_one_based() {
        let src = "a = 1\nb = 2\n";
        assert_eq!(line_of(src, 0), 1);
        assert_eq!(line_of(src, 6), 2);
        assert_eq!(line_of(src, 999), 3);
    }

    #[test]
    fn display_is_one_line_naming_file_line_and_key() {
        let e = ConfigError {
            file: "proxy.toml".into(),
            line: Some(7),
            key: "upstream.base_url".into(),
            message: "must start with http:// or https://".into(),
        };
        assert_eq!(e.to_string(), "proxy.toml:7: upstream.base_url: must start with http:// or https://");
    }
}
