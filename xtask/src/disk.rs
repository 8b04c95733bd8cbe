//! The machine's own file-system limits, measured next to the benchmark's data.
//!
//! mesync's durability rests on fsync, so its throughput is bounded by how fast this disk
//! makes files durable, not by the CPU. The disk of a shared machine drifts by 3x within
//! minutes, so an absolute mesync figure means little on its own; the bench prints these
//! limits in the same run so that mesync is read as a ratio of what the disk allows.
//!
//! Each figure is one way of making small files (or records) durable:
//! - `fsync_per_file`: the classic safe write, two fsyncs per file (data, then directory);
//!   the floor for anything that syncs every message on its own.
//! - `syncfs_batch`: group commit, one `syncfs` per 256 files; the ceiling for a spool that
//!   batches its syncs.
//! - `syncfs_safe_order`: the same batch, but no rename may reach the disk before the data
//!   it names (temps, syncfs, renames, syncfs); two syncs per batch.
//! - `log_fdatasync`: an append-only log with one `fdatasync` per 100 records, which is
//!   what a database's log (Redis AOF and the like) does; the ceiling for a log design.
//! - `pipeline`: the file work one message implies in mesync (read it from `outbox/`, move
//!   it to `sent/`, create it in `inbox/`), one `syncfs` per 256 messages; the ceiling for
//!   mesync with a free network and no CPU cost.
//!
//! Every measurement starts with a `syncfs`, so it does not pay for the previous one's
//! dirty pages, and removes its files when done, so the next one starts from an empty
//! directory.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Files (or messages, for `log_fdatasync` and `pipeline`) per second.
#[derive(Debug, Clone, Copy)]
pub struct DiskLimits {
    pub fsync_per_file: f64,
    pub syncfs_batch: f64,
    pub syncfs_safe_order: f64,
    pub log_fdatasync: f64,
    pub pipeline: f64,
}

/// The size of one message file; close to a small mesync JSON message.
const BODY_SIZE: usize = 300;
/// Files per `syncfs`, as in mesync's own group commit.
const BATCH: usize = 256;
/// Log records per `fdatasync`.
const LOG_SYNC_EVERY: usize = 100;

/// Measures all the limits in `dir`, which must be on the same file system as the data
/// being compared. `quick` uses about a fifth of the files.
pub fn measure(dir: &Path, quick: bool) -> Result<DiskLimits, String> {
    let pick = |q: usize, full: usize| if quick { q } else { full };
    Ok(DiskLimits {
        fsync_per_file: in_scratch(dir, "fsync-per-file", |d| {
            fsync_per_file(d, pick(200, 1000))
        })?,
        syncfs_batch: in_scratch(dir, "syncfs-batch", |d| syncfs_batch(d, pick(2048, 10240)))?,
        syncfs_safe_order: in_scratch(dir, "syncfs-safe-order", |d| {
            syncfs_safe_order(d, pick(2048, 10240))
        })?,
        log_fdatasync: in_scratch(dir, "log-fdatasync", |d| {
            log_fdatasync(d, pick(20_000, 100_000))
        })?,
        pipeline: in_scratch(dir, "pipeline", |d| pipeline(d, pick(2048, 10240)))?,
    })
}

/// Runs `work` in a fresh subdirectory of `dir`. The files are left for the caller to
/// remove at the end of the whole run: on ext4 without a journal, creating files right
/// after deleting many is several times slower (the allocator skips recently freed
/// inodes), and that would penalise whatever is measured next.
fn in_scratch(
    dir: &Path,
    name: &str,
    work: impl FnOnce(&Path) -> Result<f64, String>,
) -> Result<f64, String> {
    let scratch = dir.join(format!("disk-{name}"));
    fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    syncfs(&scratch)?;
    work(&scratch).map_err(|e| format!("disk {name}: {e}"))
}

/// Write, fsync, rename, fsync the directory: per file.
fn fsync_per_file(dir: &Path, count: usize) -> Result<f64, String> {
    let body = body();
    let dir_handle = open(dir)?;
    let start = Instant::now();
    for i in 0..count {
        let temp = dir.join(format!(".{i}.tmp"));
        let mut file = create(&temp)?;
        write_all(&mut file, &temp, &body)?;
        file.sync_data()
            .map_err(|e| format!("fsync {}: {e}", temp.display()))?;
        rename(&temp, &dir.join(format!("{i}.msg")))?;
        dir_handle
            .sync_all()
            .map_err(|e| format!("fsync {}: {e}", dir.display()))?;
    }
    Ok(rate(count, start))
}

/// Write and rename each file, one `syncfs` per batch.
fn syncfs_batch(dir: &Path, count: usize) -> Result<f64, String> {
    let body = body();
    let start = Instant::now();
    for batch in batches(count) {
        for i in batch {
            let temp = write_temp(dir, i, &body)?;
            rename(&temp, &dir.join(format!("{i}.msg")))?;
        }
        syncfs(dir)?;
    }
    Ok(rate(count, start))
}

/// Per batch: write all temps, syncfs, rename all, syncfs.
fn syncfs_safe_order(dir: &Path, count: usize) -> Result<f64, String> {
    let body = body();
    let start = Instant::now();
    for batch in batches(count) {
        let temps = batch
            .clone()
            .map(|i| write_temp(dir, i, &body))
            .collect::<Result<Vec<_>, _>>()?;
        syncfs(dir)?;
        for (i, temp) in batch.zip(&temps) {
            rename(temp, &dir.join(format!("{i}.msg")))?;
        }
        syncfs(dir)?;
    }
    Ok(rate(count, start))
}

/// Appends records to one file, `fdatasync` every `LOG_SYNC_EVERY` records.
fn log_fdatasync(dir: &Path, count: usize) -> Result<f64, String> {
    let path = dir.join("log");
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut record = body();
    record[BODY_SIZE - 1] = b'\n';
    let start = Instant::now();
    for i in 1..=count {
        write_all(&mut log, &path, &record)?;
        if i % LOG_SYNC_EVERY == 0 || i == count {
            log.sync_data()
                .map_err(|e| format!("fdatasync {}: {e}", path.display()))?;
        }
    }
    Ok(rate(count, start))
}

/// Per message: read from `outbox/`, rename into `sent/`, write a temp in `inbox/` and
/// rename it; one `syncfs` per batch.
fn pipeline(dir: &Path, count: usize) -> Result<f64, String> {
    let [outbox, sent, inbox] = ["outbox", "sent", "inbox"].map(|d| dir.join(d));
    for d in [&outbox, &sent, &inbox] {
        fs::create_dir(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    let body = body();
    for i in 0..count {
        let path = outbox.join(format!("{i}.msg"));
        fs::write(&path, &body).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    // The outbox files exist before the clock starts, as if a script had dropped them.
    syncfs(dir)?;
    let mut buffer = Vec::with_capacity(BODY_SIZE);
    let start = Instant::now();
    for batch in batches(count) {
        for i in batch {
            let name = format!("{i}.msg");
            read_into(&outbox.join(&name), &mut buffer)?;
            rename(&outbox.join(&name), &sent.join(&name))?;
            let temp = write_temp(&inbox, i, &buffer)?;
            rename(&temp, &inbox.join(&name))?;
        }
        syncfs(dir)?;
    }
    Ok(rate(count, start))
}

/// `0..count` in chunks of `BATCH`.
fn batches(count: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..count)
        .step_by(BATCH)
        .map(move |first| first..(first + BATCH).min(count))
}

fn body() -> Vec<u8> {
    vec![b'x'; BODY_SIZE]
}

fn rate(count: usize, start: Instant) -> f64 {
    count as f64 / start.elapsed().as_secs_f64()
}

/// Writes `.{i}.tmp` in `dir` without syncing it; its path.
fn write_temp(dir: &Path, i: usize, body: &[u8]) -> Result<PathBuf, String> {
    let temp = dir.join(format!(".{i}.tmp"));
    let mut file = create(&temp)?;
    write_all(&mut file, &temp, body)?;
    Ok(temp)
}

fn open(path: &Path) -> Result<File, String> {
    File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))
}

fn create(path: &Path) -> Result<File, String> {
    File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

fn write_all(file: &mut File, path: &Path, data: &[u8]) -> Result<(), String> {
    file.write_all(data)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn read_into(path: &Path, buffer: &mut Vec<u8>) -> Result<(), String> {
    buffer.clear();
    open(path)?
        .read_to_end(buffer)
        .map(drop)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn rename(from: &Path, to: &Path) -> Result<(), String> {
    fs::rename(from, to)
        .map_err(|e| format!("cannot rename {} to {}: {e}", from.display(), to.display()))
}

/// `syncfs(2)` on the file system holding `dir`: flushes every dirty page and the journal
/// in one call, which is what makes batching cheaper than one fsync per file.
fn syncfs(dir: &Path) -> Result<(), String> {
    let handle = open(dir)?;
    // SAFETY: `handle` is an open descriptor for the whole call; syncfs only reads it.
    if unsafe { libc::syncfs(handle.as_raw_fd()) } != 0 {
        let err = std::io::Error::last_os_error();
        return Err(format!("syncfs {}: {err}", dir.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_measure_gives_positive_rates_and_stays_in_its_directory() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let limits = measure(tmp.path(), true).expect("measure");
        println!("{limits:?}");
        for rate in [
            limits.fsync_per_file,
            limits.syncfs_batch,
            limits.syncfs_safe_order,
            limits.log_fdatasync,
            limits.pipeline,
        ] {
            assert!(rate.is_finite() && rate > 0.0, "{limits:?}");
        }
        let made: Vec<String> = fs::read_dir(tmp.path())
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(made.iter().all(|n| n.starts_with("disk-")), "{made:?}");
    }

    #[test]
    fn batches_cover_every_index_once() {
        let all: Vec<usize> = batches(600).flatten().collect();
        assert_eq!(all, (0..600).collect::<Vec<_>>());
        assert_eq!(batches(512).count(), 2);
    }

    #[test]
    #[ignore = "full mode takes tens of seconds; run with --ignored --nocapture"]
    fn full_measure() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let limits = measure(tmp.path(), false).expect("measure");
        println!("disk limits (full): {limits:#?}");
    }
}
