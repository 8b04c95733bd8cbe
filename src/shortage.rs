//! Scarce resources: telling a shortage (no space, no inodes, a quota, a read-only file
//! system, too many open files) from other I/O failures, and keeping track of which
//! directories are short right now.
//!
//! A shortage is transient by nature: an operator frees space, remounts, raises a limit.
//! So nothing that meets one gives up: the hub refuses what it cannot store with a status a
//! sender retries (507, 503), a receiver writes what fits and does not acknowledge the rest,
//! and both retry until the resource returns, without a restart. [`Shortages`] remembers the
//! ones in progress, so that each is logged once when it starts and once when it ends, and
//! so that `/healthz`, `/metrics` and `mesync status` can show it.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::message::Timestamp;

/// A resource whose lack makes a write fail, whatever is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// ENOSPC with free inodes: the file system's blocks are used up.
    Space,
    /// ENOSPC with free blocks: the file system has no inode left for a new file.
    Inodes,
    /// EDQUOT: the user's (or group's, or project's) quota is used up.
    Quota,
    /// EROFS: the file system is mounted read-only (often remounted so after an error).
    ReadOnly,
    /// EMFILE or ENFILE: the process's (or the system's) open-file limit is reached.
    OpenFiles,
}

impl Resource {
    /// Every resource, in the order `/metrics` lists them.
    pub const ALL: [Resource; 5] = [
        Resource::Space,
        Resource::Inodes,
        Resource::Quota,
        Resource::ReadOnly,
        Resource::OpenFiles,
    ];

    /// The shortage behind `err`, if it is one. `near` is the path the failed call worked
    /// on (or its directory): ENOSPC is told apart into blocks and inodes by asking its file
    /// system which of the two it ran out of.
    pub fn of(err: &io::Error, near: &Path) -> Option<Resource> {
        match err.raw_os_error()? {
            libc::ENOSPC => Some(if inodes_exhausted(near) {
                Resource::Inodes
            } else {
                Resource::Space
            }),
            libc::EDQUOT => Some(Resource::Quota),
            libc::EROFS => Some(Resource::ReadOnly),
            libc::EMFILE | libc::ENFILE => Some(Resource::OpenFiles),
            _ => None,
        }
    }

    /// The label value on `/metrics` and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Space => "space",
            Resource::Inodes => "inodes",
            Resource::Quota => "quota",
            Resource::ReadOnly => "read_only",
            Resource::OpenFiles => "open_files",
        }
    }

    /// What is missing, for a person.
    pub fn describe(self) -> &'static str {
        match self {
            Resource::Space => "no free disk space (the disk is full)",
            Resource::Inodes => "no free inodes (the file system is full)",
            Resource::Quota => "the disk quota is exceeded",
            Resource::ReadOnly => "the file system is read-only",
            Resource::OpenFiles => "too many open files",
        }
    }

    /// The HTTP status that tells a sender to come back later: 507 when the hub has no room,
    /// 503 when it cannot write at all for now.
    pub fn status(self) -> u16 {
        match self {
            Resource::Space | Resource::Inodes | Resource::Quota => 507,
            Resource::ReadOnly | Resource::OpenFiles => 503,
        }
    }
}

/// True when the file system holding `near` (or its nearest existing ancestor) has no free
/// inode left for an unprivileged user. False when that cannot be told.
fn inodes_exhausted(near: &Path) -> bool {
    near.ancestors()
        .find_map(|p| nix::sys::statvfs::statvfs(p).ok())
        .is_some_and(|s| s.files() > 0 && s.files_available() == 0)
}

/// What the file system holding `dir` lacks right now, as `statvfs` tells: read-only,
/// no inode or no block left for an unprivileged user. A quota or the descriptor limit
/// cannot be seen this way; only a failed write tells those.
pub fn probe(dir: &Path) -> Option<Resource> {
    use nix::sys::statvfs::FsFlags;
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    if s.flags().contains(FsFlags::ST_RDONLY) {
        Some(Resource::ReadOnly)
    } else if s.files() > 0 && s.files_available() == 0 {
        Some(Resource::Inodes)
    } else if s.blocks() > 0 && s.blocks_available() == 0 {
        Some(Resource::Space)
    } else {
        None
    }
}

/// Bytes an unprivileged user may still write on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let s = dir
        .ancestors()
        .find_map(|p| nix::sys::statvfs::statvfs(p).ok())?;
    // The field types differ between platforms (u32 on macOS).
    #[allow(clippy::useless_conversion)]
    Some(u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size())))
}

/// Writes the longest prefix of `items` that fits, with `write`, which writes a prefix
/// whole or not at all and, when it fails, says how many leading items it had written
/// before the failure. A shortage at the n-th item means the n - 1 before it fit; one after
/// every item was written (a flush, a log append) means fewer than all: then half are
/// tried. Returns how many items were written, and the error that stopped the others.
///
/// This is how a batch larger than the free space makes progress: what fits is written
/// (and acknowledged), the rest waits for the resource.
pub fn longest_prefix<T>(
    items: &[T],
    mut write: impl FnMut(&[T]) -> Result<(), (Error, usize)>,
) -> (usize, Option<Error>) {
    let mut fits = items.len();
    let mut stopped: Option<Error> = None;
    loop {
        let (err, written) = match write(&items[..fits]) {
            Ok(()) => return (fits, stopped),
            Err(failure) => failure,
        };
        let next = if written < fits { written } else { fits / 2 };
        if err.shortage().is_none() || next == 0 {
            return (0, Some(err));
        }
        stopped = Some(err);
        fits = next;
    }
}

/// One shortage in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shortage {
    pub dir: PathBuf,
    pub resource: Resource,
    /// When it was first seen (RFC 3339).
    pub since: String,
}

/// The shortages in progress, by directory. Each start and end is logged once.
#[derive(Debug, Default)]
pub struct Shortages {
    current: Mutex<BTreeMap<PathBuf, Shortage>>,
}

impl Shortages {
    /// Notes that writing in `dir` failed for want of `resource`; logs it when it is news
    /// (then returns true). `what` says what could not be done (for the log line).
    pub fn report(&self, dir: &Path, resource: Resource, what: &str) -> bool {
        let mut current = self.lock();
        let known = current.get(dir).is_some_and(|s| s.resource == resource);
        if known {
            return false;
        }
        tracing::error!(
            dir = %dir.display(),
            resource = resource.name(),
            free_bytes = free_bytes(dir),
            "{what}: {} in {}; retrying until it returns",
            resource.describe(),
            dir.display()
        );
        current.insert(
            dir.to_path_buf(),
            Shortage {
                dir: dir.to_path_buf(),
                resource,
                since: Timestamp::now().to_string(),
            },
        );
        true
    }

    /// Notes that writing in `dir` works again; logs the end of a shortage there (then
    /// returns true).
    pub fn clear(&self, dir: &Path) -> bool {
        let gone = self.lock().remove(dir);
        if let Some(gone) = &gone {
            tracing::info!(
                dir = %dir.display(),
                resource = gone.resource.name(),
                since = %gone.since,
                "{} again: {} is over",
                dir.display(),
                gone.resource.describe()
            );
        }
        gone.is_some()
    }

    /// The shortages in progress, by directory.
    pub fn current(&self) -> Vec<Shortage> {
        self.lock().values().cloned().collect()
    }

    /// True when some directory is short of `resource`.
    pub fn is_short_of(&self, resource: Resource) -> bool {
        self.lock().values().any(|s| s.resource == resource)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Shortage>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_shortages_are_shortages() {
        let here = Path::new("/");
        let of = |code| Resource::of(&io::Error::from_raw_os_error(code), here);
        assert_eq!(of(libc::EDQUOT), Some(Resource::Quota));
        assert_eq!(of(libc::EROFS), Some(Resource::ReadOnly));
        assert_eq!(of(libc::EMFILE), Some(Resource::OpenFiles));
        assert_eq!(of(libc::ENFILE), Some(Resource::OpenFiles));
        assert!(matches!(
            of(libc::ENOSPC),
            Some(Resource::Space | Resource::Inodes)
        ));
        assert_eq!(of(libc::EACCES), None);
        assert_eq!(of(libc::EIO), None);
        let other = io::Error::other("not an OS error");
        assert_eq!(Resource::of(&other, here), None);
        for r in Resource::ALL {
            assert!(matches!(r.status(), 503 | 507), "{r:?}");
        }
    }

    fn full() -> Error {
        Error::Io {
            action: "write",
            path: PathBuf::from("/"),
            source: io::Error::from_raw_os_error(libc::EDQUOT),
        }
    }

    #[test]
    fn the_longest_prefix_that_fits_is_written() {
        // Room for 5 items of 1; the writer fails at the 6th.
        let items: Vec<u32> = (0..40).collect();
        let mut tries = Vec::new();
        let (n, err) = longest_prefix(&items, |prefix| {
            tries.push(prefix.len());
            if prefix.len() <= 5 {
                Ok(())
            } else {
                Err((full(), 5))
            }
        });
        assert_eq!((n, err.is_some()), (5, true));
        assert_eq!(tries, vec![40, 5]);
        // A failure after everything was written (a flush) halves.
        let mut tries = Vec::new();
        let (n, _) = longest_prefix(&items, |prefix| {
            tries.push(prefix.len());
            if prefix.len() <= 9 {
                Ok(())
            } else {
                Err((full(), prefix.len()))
            }
        });
        assert_eq!((n, tries), (5, vec![40, 20, 10, 5]));
        // Nothing fits: nothing written, the error kept.
        let (n, err) = longest_prefix(&items, |_| Err((full(), 0)));
        assert_eq!(
            (n, err.and_then(|e| e.shortage())),
            (0, Some(Resource::Quota))
        );
        // Another failure is not retried smaller.
        let mut calls = 0;
        let other = || Error::Config("broken".into());
        let (n, _) = longest_prefix(&items, |_| {
            calls += 1;
            Err((other(), 3))
        });
        assert_eq!((n, calls), (0, 1));
    }

    #[test]
    fn a_shortage_is_kept_until_cleared() {
        let shortages = Shortages::default();
        let dir = Path::new("/x/inbox");
        shortages.report(dir, Resource::Space, "cannot write");
        shortages.report(dir, Resource::Space, "cannot write");
        assert_eq!(shortages.current().len(), 1);
        assert!(shortages.is_short_of(Resource::Space));
        assert!(!shortages.is_short_of(Resource::Inodes));
        shortages.report(dir, Resource::Inodes, "cannot write");
        assert_eq!(shortages.current()[0].resource, Resource::Inodes);
        shortages.clear(dir);
        assert!(shortages.current().is_empty());
    }
}
