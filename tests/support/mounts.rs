//! Scarce file systems for the tests, made real with mounts (root only): a small tmpfs
//! (`size=`, `nr_inodes=`), a bind mount that can be remounted read-only, and a FUSE file
//! system with a byte quota (`tests/fixtures/quotafs.py`, for kernels without quota
//! support). Each is unmounted when dropped. Without root or `mount`, [`Tmpfs::mount`] and [`Bind::mount`]
//! say so through [`super::unavailable`] and return `None`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::unavailable;

fn mount(args: &[&str], dir: &Path) -> bool {
    Command::new("mount")
        .args(args)
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

fn unmount(dir: &Path) {
    let _ = Command::new("umount").arg("-l").arg(dir).status();
}

/// A tmpfs mounted over a directory.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// A tmpfs over `dir` with these options (`size=256k`, `nr_inodes=8`, ...).
    pub fn mount(test: &str, dir: &Path, options: &str) -> Option<Tmpfs> {
        let options = format!("{options},mode=0755");
        if mount(&["-t", "tmpfs", "-o", &options, "tmpfs"], dir) {
            Some(Tmpfs(dir.to_path_buf()))
        } else {
            unavailable(test, "mounting a tmpfs (needs root and the mount command)");
            None
        }
    }

    /// Changes the mount's options in place (`size=1m`): the files stay.
    pub fn remount(&self, options: &str) {
        let options = format!("remount,{options}");
        assert!(
            mount(&["-o", &options], &self.0),
            "mount -o {options} {}",
            self.0.display()
        );
    }

    /// Fills the file system with a file named `.filler` until the disk is full.
    pub fn fill(&self) -> PathBuf {
        let path = self.0.join(".filler");
        let mut file = fs::File::create(&path).expect("create filler");
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount(&self.0);
    }
}

/// A directory bind-mounted over itself, so that it can be remounted read-only and back,
/// as a file system that the kernel remounts read-only after an error.
pub struct Bind(PathBuf);

impl Bind {
    pub fn mount(test: &str, dir: &Path) -> Option<Bind> {
        if mount(&["--bind", &dir.to_string_lossy()], dir) {
            Some(Bind(dir.to_path_buf()))
        } else {
            unavailable(test, "a bind mount (needs root and the mount command)");
            None
        }
    }

    pub fn read_only(&self) {
        assert!(
            mount(&["-o", "remount,bind,ro"], &self.0),
            "remount read-only"
        );
    }

    pub fn read_write(&self) {
        assert!(
            mount(&["-o", "remount,bind,rw"], &self.0),
            "remount read-write"
        );
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        unmount(&self.0);
    }
}

/// A directory whose writes fail with EDQUOT past `quota` bytes: a FUSE pass-through to a
/// backing directory, run by Debian's python3-fusepy.
pub struct QuotaFs {
    dir: PathBuf,
    child: Child,
    _backing: tempfile::TempDir,
}

impl QuotaFs {
    pub fn mount(test: &str, dir: &Path, quota: usize) -> Option<QuotaFs> {
        let python = Path::new("/usr/bin/python3");
        let has_fusepy = Command::new(python)
            .args(["-c", "import fusepy"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_fusepy || !Path::new("/dev/fuse").exists() {
            unavailable(
                test,
                "a FUSE quota file system (Debian's python3-fusepy and /dev/fuse)",
            );
            return None;
        }
        let backing = tempfile::tempdir().expect("backing dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quotafs.py");
        let child = Command::new(python)
            .arg(script)
            .arg(backing.path())
            .arg(dir)
            .arg(quota.to_string())
            .stdin(Stdio::null())
            .spawn()
            .expect("start quotafs.py");
        let fs = QuotaFs {
            dir: dir.to_path_buf(),
            child,
            _backing: backing,
        };
        let mounted = || {
            fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
                m.lines()
                    .any(|l| l.split(' ').nth(1) == Some(&*dir.to_string_lossy()))
            })
        };
        super::wait_until(
            Duration::from_secs(10),
            "the quota file system is mounted",
            mounted,
        );
        Some(fs)
    }
}

impl Drop for QuotaFs {
    fn drop(&mut self) {
        unmount(&self.dir);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
