//! The crate's error type: every failure says what was being done and to which path or URL.

use std::io;
use std::path::{Path, PathBuf};

use crate::shortage::Resource;

/// Errors that reach a user: the CLI prints them on one line and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation failed.
    #[error("{}: {action}: {source}", one_line(&path.display().to_string()))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The configuration (file, environment or flags) is wrong.
    #[error("{}", one_line(.0))]
    Config(String),
    /// A message, or an input meant to become one, is invalid.
    #[error("{}", one_line(.0))]
    Invalid(String),
    /// Talking to the hub failed.
    #[error("{}", one_line(.0))]
    Http(String),
}

/// Text from users and file names, with control characters escaped: an error is one line.
pub fn one_line(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl Error {
    /// The I/O error behind this one, if any (to tell "disk full" from other failures).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// The scarce resource (space, inodes, quota, a writable file system, file descriptors)
    /// whose lack made this fail, if that is what happened: such a failure passes once the
    /// resource returns, so it is retried, never treated as a bad message.
    pub fn shortage(&self) -> Option<Resource> {
        match self {
            Error::Io { source, path, .. } => Resource::of(source, path),
            _ => None,
        }
    }

    /// The directory a file system failure happened in: the path itself when it is one,
    /// else its parent.
    pub fn dir(&self) -> Option<PathBuf> {
        match self {
            Error::Io { path, .. } if path.is_dir() => Some(path.clone()),
            Error::Io { path, .. } => path.parent().map(Path::to_path_buf),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the action and the path to an `io::Result`.
pub trait IoContext<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            action,
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_one_line_whatever_the_input() {
        let err = Error::Io {
            action: "read",
            path: PathBuf::from("a\nb"),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert!(!err.to_string().contains('\n'), "{err}");
        assert_eq!(one_line("plain"), "plain");
        assert_eq!(one_line("x\ty"), "x\\ty");
    }
}
