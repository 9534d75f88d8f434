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
    /// One line: the key and the message quote what the file holds (a quoted
    /// TOML key may hold a newline or an escape sequence), so control
    /// characters are written escaped, never raw into a log or a terminal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Escaped(&self.file.display().to_string()))?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", Escaped(&self.key))?;
        }
        write!(f, ": {}", Escaped(&self.message))
    }
}

/// Text with its control characters escaped (`\n`, `\u{1b}`).
struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
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

    /// A quoted key holding a newline and a forged log line, or an escape
    /// sequence, stays on one line with its bytes escaped.
    #[test]
    fn control_characters_never_reach_the_line_raw() {
        let e = ConfigError {
            file: "proxy.toml".into(),
            line: Some(3),
            key: "evil\n2026-11-27T00:00:00Z  INFO tallyfy_proxy::access: forged\u{1b}[2J".into(),
            message: "unknown field `x\ry`".into(),
        };
        let line = e.to_string();
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(
            line.contains("evil\\n2026") && line.contains("\\u{1b}[2J") && line.contains("x\\ry"),
            "{line}"
        );
    }
}
