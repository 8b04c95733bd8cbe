//! Atomic, durable file queues: the one way mesync writes, moves and lists queue files.
//!
//! A file lands in a queue in four steps: write it under a dot-prefixed temporary name in the
//! same directory, make its data durable, rename(2) it to its final name, make the rename
//! durable. Readers ignore dot-files, so nobody sees half a file, and a crash (of the process
//! or of the machine) leaves either the old state or the new.
//!
//! Making things durable is the expensive part, so [`Commit`] does it for many files at once
//! (group commit). A few files are flushed one by one (fsync each file, then each directory);
//! many are flushed with one `syncfs(2)` per file system, which costs about what one fsync
//! does. The data is flushed before the renames that publish it and the renames are flushed
//! before the commit returns, so a machine crash never leaves a published file without its
//! data.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{IoContext, Result};

/// Above this many flushes (files and directories), a commit flushes the whole file system
/// once instead: `syncfs` costs about one fsync, but also writes out other programs' dirty
/// data, so a single file is cheaper to fsync on its own.
const SYNCFS_THRESHOLD: usize = 1;

/// A dot-file older than this is debris from a crash.
pub const DEBRIS_AGE: Duration = Duration::from_secs(3600);

/// A group of file changes made durable together, in two steps: [`Commit::sync_data`] after
/// the data is written and before it is published (renamed or linked into place), then
/// [`Commit::sync`] for the rest.
pub struct Commit {
    /// Permission bits new files are created with (before the umask).
    mode: u32,
    /// Files whose data must be durable, each with its handle while it may be fsync'd on
    /// its own. Past [`SYNCFS_THRESHOLD`] pending files the commit flushes with `syncfs`,
    /// which needs no handle, so they are closed: a commit of thousands of files would
    /// otherwise hold thousands of descriptors (the default soft limit is 1,024).
    files: Vec<(PathBuf, Option<File>)>,
    /// How many of `files` are durable already.
    synced_files: usize,
    /// Directories whose entries changed.
    dirs: BTreeSet<PathBuf>,
}

impl Default for Commit {
    fn default() -> Commit {
        Commit::new()
    }
}

impl Commit {
    pub fn new() -> Commit {
        Commit::with_mode(0o666)
    }

    /// A commit whose new files get `mode` from the start (0o600 for secrets: a file that is
    /// chmod-ed after it was written is readable by others for a moment).
    pub fn with_mode(mode: u32) -> Commit {
        Commit {
            mode,
            files: Vec::new(),
            synced_files: 0,
            dirs: BTreeSet::new(),
        }
    }

    /// Writes `bytes` to a new dot-prefixed temporary file in `dir` and returns its path.
    /// The data is not durable until [`Commit::sync_data`].
    pub fn write_temp(&mut self, dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        self.write_temp_reusing(dir, name, bytes, None)
    }

    /// Like [`Commit::write_temp`], but when `spare` names a file that is no longer needed,
    /// renames it into place and overwrites it instead of creating a new file. Creating and
    /// freeing an inode per message is the costliest part of a file queue on some file
    /// systems (ext4 without a journal scans for recently freed inodes on every create), so
    /// the hub recycles its files the way databases recycle log segments.
    pub fn write_temp_reusing(
        &mut self,
        dir: &Path,
        name: &str,
        bytes: &[u8],
        spare: Option<&Path>,
    ) -> Result<PathBuf> {
        let path = dir.join(temp_name(name));
        let reused = spare.is_some_and(|spare| fs::rename(spare, &path).is_ok());
        let opened = if reused {
            OpenOptions::new().write(true).open(&path)
        } else {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(self.mode)
                .open(&path)
        };
        let mut file = opened.ctx("create", &path)?;
        let written = file
            .write_all(bytes)
            .and_then(|()| file.set_len(bytes.len() as u64));
        if let Err(e) = written {
            let _ = fs::remove_file(&path);
            return Err(e).ctx("write", &path);
        }
        self.keep(path.clone(), file);
        Ok(path)
    }

    /// Adds an already written file (e.g. an append-only log) whose data must be durable.
    pub fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).ctx("open", path)?;
        self.keep(path.to_path_buf(), file);
        Ok(())
    }

    fn keep(&mut self, path: PathBuf, file: File) {
        self.files.push((path, Some(file)));
        let pending = &mut self.files[self.synced_files..];
        if pending.len() > SYNCFS_THRESHOLD && cfg!(target_os = "linux") {
            // The earlier ones were closed when they were added, except right past the
            // threshold: closing the last few keeps this O(1) per file.
            for (_, handle) in pending.iter_mut().rev().take(SYNCFS_THRESHOLD + 1) {
                *handle = None;
            }
        }
    }

    /// Records that entries of `dir` changed (a rename, link or new file in it).
    pub fn touch_dir(&mut self, dir: &Path) {
        self.dirs.insert(dir.to_path_buf());
    }

    /// Makes the data of every file written so far durable.
    pub fn sync_data(&mut self) -> Result<()> {
        let pending = &self.files[self.synced_files..];
        if pending.len() > SYNCFS_THRESHOLD && cfg!(target_os = "linux") {
            let parents: Vec<&Path> = pending.iter().filter_map(|(p, _)| p.parent()).collect();
            syncfs_each(&parents)?;
        } else {
            for (path, file) in pending {
                fsync_data(path, file.as_ref())?;
            }
        }
        self.synced_files = self.files.len();
        Ok(())
    }

    /// Makes everything recorded so far durable: the files not flushed yet and the
    /// directory entries (renames, links).
    pub fn sync(&mut self) -> Result<()> {
        let pending = &self.files[self.synced_files..];
        if pending.len() + self.dirs.len() > SYNCFS_THRESHOLD && cfg!(target_os = "linux") {
            let mut places: Vec<&Path> = pending.iter().filter_map(|(p, _)| p.parent()).collect();
            places.extend(self.dirs.iter().map(PathBuf::as_path));
            syncfs_each(&places)?;
        } else {
            for (path, file) in pending {
                fsync_data(path, file.as_ref())?;
            }
            for dir in &self.dirs {
                sync_dir(dir)?;
            }
        }
        self.synced_files = self.files.len();
        self.dirs.clear();
        Ok(())
    }
}

/// fsync of a file's data, through its handle if it is still open (it always is when the
/// commit flushes file by file; opening it again is only a safety net).
fn fsync_data(path: &Path, handle: Option<&File>) -> Result<()> {
    match handle {
        Some(file) => file.sync_data().ctx("fsync", path),
        None => File::open(path)
            .and_then(|file| file.sync_data())
            .ctx("fsync", path),
    }
}

/// One file to publish with [`publish`].
pub struct NewFile<'a> {
    pub dir: &'a Path,
    pub name: &'a str,
    pub bytes: &'a [u8],
}

/// Publishes files atomically and durably, as one group commit: when it returns `Ok`, every
/// file is in place and durable; after a crash, each file is either whole or absent.
pub fn publish(files: &[NewFile<'_>]) -> Result<()> {
    publish_with(Commit::new(), files)
}

fn publish_with(mut commit: Commit, files: &[NewFile<'_>]) -> Result<()> {
    let mut temps = Vec::with_capacity(files.len());
    for file in files {
        commit.touch_dir(file.dir);
        match commit.write_temp(file.dir, file.name, file.bytes) {
            Ok(temp) => temps.push(temp),
            Err(e) => {
                remove_all(&temps);
                return Err(e);
            }
        }
    }
    if let Err(e) = commit.sync_data() {
        remove_all(&temps);
        return Err(e);
    }
    for (file, temp) in files.iter().zip(&temps) {
        let target = file.dir.join(file.name);
        if let Err(e) = fs::rename(temp, &target) {
            remove_all(&temps);
            return Err(e).ctx("rename into place", &target);
        }
    }
    commit.sync()
}

/// Writes one file atomically and durably.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    publish(&[NewFile { dir, name, bytes }])
}

/// Writes one file atomically and durably, readable by its owner only (mode 0600): keys
/// and token hashes.
pub fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    publish_with(Commit::with_mode(0o600), &[NewFile { dir, name, bytes }])
}

/// Reads a queue file, refusing anything but a regular file with [`NOT_REGULAR`]: a named
/// pipe dropped into a queue would block open(2) until someone writes to it, and a device
/// could be read forever. The type is checked before the file is opened (a socket cannot
/// even be opened) and again on the open descriptor, which is opened with `O_NONBLOCK` so
/// that a pipe swapped in between cannot block either. A directory is an `IsADirectory`
/// error.
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    check_regular(&fs::metadata(path)?)?;
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    check_regular(&meta)?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The error kind of [`read_regular`] for a file that is not a regular file.
pub const NOT_REGULAR: std::io::ErrorKind = std::io::ErrorKind::InvalidInput;

fn check_regular(meta: &fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        return Err(std::io::ErrorKind::IsADirectory.into());
    } else if kind.is_fifo() {
        "a named pipe"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "of an unknown type"
    };
    Err(std::io::Error::new(
        NOT_REGULAR,
        format!("not a regular file but {what}"),
    ))
}

/// Moves `from` to `to_dir/to_name` with rename(2). When `durable`, both directories are
/// flushed before it returns.
pub fn move_file(from: &Path, to_dir: &Path, to_name: &str, durable: bool) -> Result<PathBuf> {
    let to = to_dir.join(to_name);
    fs::rename(from, &to).ctx("move", from)?;
    if durable {
        sync_dir(to_dir)?;
        if let Some(from_dir) = from.parent() {
            sync_dir(from_dir)?;
        }
    }
    Ok(to)
}

/// fsync on a directory: makes the creations, renames and removals in it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}

/// Creates `dir` (and its parents) if missing.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).ctx("create directory", dir)
}

/// The queue entries of `dir`: names that do not start with a dot, sorted. A missing
/// directory is an empty queue. Entries are not stat'ed (on file systems that do not record
/// the file type in the directory, that would be one more system call per file for every
/// scan); a reader that finds a directory among them treats it as an unreadable entry.
pub fn list(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).ctx("list", dir),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.ctx("list", dir)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue; // Not UTF-8: never a name mesync wrote; left alone.
        };
        if !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Removes dot-files in `dir` last modified more than `age` ago: temporary files left by a
/// crash. Returns how many were removed.
pub fn remove_debris(dir: &Path, age: Duration) -> Result<usize> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(0);
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with('.') {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|modified| now.duration_since(modified).is_ok_and(|d| d > age));
        if old && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes the temporary files this module leaves in `dir` when a process dies mid-write
/// (`.<name>.<random>.tmp`), whatever their age. Only for directories no one else writes
/// dot-files into: in `outbox/`, a script's file being written looks the same, and only
/// age ([`remove_debris`]) tells debris from work in progress.
pub fn remove_temps(dir: &Path) -> Result<usize> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") && fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    Ok(removed)
}

fn temp_name(name: &str) -> String {
    format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple())
}

/// Removes files, ignoring those already gone: undoing a write that failed.
pub fn remove_all(paths: &[PathBuf]) {
    for path in paths {
        let _ = fs::remove_file(path);
    }
}

/// One `syncfs(2)` per distinct file system among `dirs`.
#[cfg(target_os = "linux")]
fn syncfs_each(dirs: &[&Path]) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    let unique: BTreeSet<&Path> = dirs.iter().copied().collect();
    let mut seen = BTreeSet::new();
    for dir in unique {
        let handle = File::open(dir).ctx("open directory", dir)?;
        let dev = handle.metadata().ctx("stat", dir)?.dev();
        if !seen.insert(dev) {
            continue;
        }
        // SAFETY: syncfs only reads the descriptor, which `handle` keeps open.
        if unsafe { libc::syncfs(handle.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error()).ctx("syncfs", dir);
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn syncfs_each(dirs: &[&Path]) -> Result<()> {
    // Never reached: syncfs is used on Linux only. Flush the directories to be safe.
    for dir in dirs {
        sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_leaves_only_final_files() {
        let tmp = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..10).map(|i| format!("m{i}.json")).collect();
        let files: Vec<NewFile<'_>> = names
            .iter()
            .map(|n| NewFile {
                dir: tmp.path(),
                name: n,
                bytes: b"{}",
            })
            .collect();
        publish(&files).unwrap();
        assert_eq!(list(tmp.path()).unwrap(), names);
        let all = fs::read_dir(tmp.path()).unwrap().count();
        assert_eq!(all, 10, "no temporary file is left behind");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_big_commit_holds_few_descriptors() {
        let tmp = tempfile::tempdir().unwrap();
        let open = || fs::read_dir("/proc/self/fd").unwrap().count();
        let before = open();
        let mut commit = Commit::new();
        commit.touch_dir(tmp.path());
        for i in 0..500 {
            commit
                .write_temp(tmp.path(), &format!("m{i}.json"), b"{}")
                .unwrap();
        }
        // Other tests of this process open files too, but not hundreds at once.
        let held = open().saturating_sub(before);
        assert!(held < 100, "a commit of 500 files holds {held} descriptors");
        commit.sync_data().unwrap();
        commit.sync().unwrap();
    }

    #[test]
    fn debris_is_removed_only_when_old() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(".x.tmp"), b"half").unwrap();
        fs::write(tmp.path().join("keep.json"), b"{}").unwrap();
        assert_eq!(remove_debris(tmp.path(), DEBRIS_AGE).unwrap(), 0);
        assert_eq!(remove_debris(tmp.path(), Duration::ZERO).unwrap(), 1);
        assert_eq!(list(tmp.path()).unwrap(), vec!["keep.json".to_string()]);
    }

    #[test]
    fn temps_left_by_a_crash_are_removed_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let mut commit = Commit::new();
        commit.write_temp(tmp.path(), "m.json", b"{}").unwrap();
        fs::write(tmp.path().join(".keep"), b"").unwrap();
        fs::write(tmp.path().join("m2.json"), b"{}").unwrap();
        assert_eq!(remove_temps(tmp.path()).unwrap(), 1);
        let mut left: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![".keep".to_string(), "m2.json".to_string()]);
    }

    #[test]
    fn only_regular_files_are_read() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("m.json");
        fs::write(&file, b"{}").unwrap();
        assert_eq!(read_regular(&file).unwrap(), b"{}");
        let pipe = tmp.path().join("pipe.json");
        nix::unistd::mkfifo(&pipe, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Would block forever with a plain open(2), no writer ever coming.
        let err = read_regular(&pipe).unwrap_err();
        assert_eq!(err.kind(), NOT_REGULAR);
        assert!(err.to_string().contains("named pipe"), "{err}");
        let socket = tmp.path().join("socket.json");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let err = read_regular(&socket).unwrap_err();
        assert!(err.to_string().contains("socket"), "{err}");
        let err = read_regular(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("device"), "{err}");
        let err = read_regular(tmp.path()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::IsADirectory);
        let err = read_regular(&tmp.path().join("gone")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        let err = write_atomic(&missing, "a.json", b"{}").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(list(tmp.path()).unwrap().is_empty());
    }
}
