//! The macOS tarball: the launchd plists, `packaging/launchd/install.sh` and the licence,
//! under one `mesync-<version>/` directory. It holds no binary: a Linux machine cannot
//! build the Mac's, so the install script takes one built there.

use std::path::{Path, PathBuf};

use super::{Release, Tar, gzip, read_bytes, write_atomically};

/// The tarball's files: where they come from, and their mode.
const FILES: [(&str, u32); 4] = [
    ("LICENSE", 0o644),
    ("launchd/com.mesync.agent.plist", 0o644),
    ("launchd/com.mesync.hub.plist", 0o644),
    ("packaging/launchd/install.sh", 0o755),
];

/// Writes `mesync-<version>-launchd.tar.gz` into `out_dir` and returns its path.
pub fn write(root: &Path, release: &Release, out_dir: &Path) -> Result<PathBuf, String> {
    let top = format!("mesync-{}", release.version);
    let mut tar = Tar::new(release.source_date);
    tar.dir(&format!("{top}/"))?;
    let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
    for (source, mode) in FILES {
        let name = Path::new(source)
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(|| format!("{source}: no file name"))?;
        files.push((
            format!("{top}/{name}"),
            read_bytes(&root.join(source))?,
            mode,
        ));
    }
    files.sort();
    for (name, data, mode) in &files {
        tar.file(name, data, *mode)?;
    }
    let name = format!("mesync-{}-launchd.tar.gz", release.version);
    write_atomically(&out_dir.join(name), &gzip(&tar.finish()?)?)
}
