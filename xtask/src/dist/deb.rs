//! The .deb: an `ar` archive of `debian-binary`, `control.tar.gz` (control, md5sums,
//! conffiles, maintainer scripts) and `data.tar.gz` (the files), laid out as dpkg-deb
//! lays them out: members in that order, tar entries named `./path` with every parent
//! directory listed first, owned by root.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};

use super::{Item, Release, Role, Tar, fill, glibc_needed, gzip, read_text, write_atomically};

/// The maintainer scripts, from `packaging/deb/`, in the order dpkg-deb lists them.
const SCRIPTS: [&str; 3] = ["postinst", "postrm", "prerm"];

/// Writes `mesync_<version>-<revision>_<arch>.deb` into `out_dir` and returns its path.
pub fn write(
    root: &Path,
    release: &Release,
    program: &[u8],
    items: &[Item],
    out_dir: &Path,
) -> Result<PathBuf, String> {
    let glibc = glibc_needed(program).ok_or("the binary names no GLIBC_2.x symbol version")?;
    let control = control(
        &read_text(&root.join("packaging/deb/control"))?,
        release,
        &glibc,
        installed_size(items),
    )?;

    let mut control_files = vec![
        ("control".to_string(), control.into_bytes(), 0o644),
        ("md5sums".to_string(), md5sums(items).into_bytes(), 0o644),
        (
            "conffiles".to_string(),
            conffiles(items).into_bytes(),
            0o644,
        ),
    ];
    for script in SCRIPTS {
        let text = read_text(&root.join("packaging/deb").join(script))?;
        control_files.push((script.to_string(), text.into_bytes(), 0o755));
    }
    control_files.sort();
    let mut control_tar = Tar::new(release.source_date);
    control_tar.dir("./")?;
    for (name, data, mode) in &control_files {
        control_tar.file(&format!("./{name}"), data, *mode)?;
    }

    let mut data_tar = Tar::new(release.source_date);
    for dir in parent_dirs(items) {
        data_tar.dir(&dir)?;
    }
    for item in items {
        data_tar.file(&format!(".{}", item.path), &item.data, item.mode)?;
    }

    let deb = ar(
        release.source_date,
        &[
            ("debian-binary", b"2.0\n".to_vec()),
            ("control.tar.gz", gzip(&control_tar.finish()?)?),
            ("data.tar.gz", gzip(&data_tar.finish()?)?),
        ],
    )?;
    let name = format!("mesync_{}_{}.deb", release.full_version(), release.deb_arch);
    write_atomically(&out_dir.join(name), &deb)
}

/// DEBIAN/control from the template: comment lines dropped, placeholders filled.
pub fn control(
    template: &str,
    release: &Release,
    glibc: &str,
    installed_size: u64,
) -> Result<String, String> {
    let template: String = template
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| format!("{line}\n"))
        .collect();
    fill(
        "packaging/deb/control",
        &template,
        &[
            ("VERSION", &release.full_version()),
            ("ARCH", &release.deb_arch),
            ("INSTALLED_SIZE", &installed_size.to_string()),
            ("GLIBC", glibc),
        ],
    )
}

/// Installed-Size in KiB, counted as dpkg-gencontrol does: each file rounded up to a whole
/// KiB, and one KiB for each directory.
pub fn installed_size(items: &[Item]) -> u64 {
    let files: u64 = items
        .iter()
        .map(|i| (i.data.len() as u64).div_ceil(1024))
        .sum();
    files + parent_dirs(items).len() as u64
}

/// `md5sum  path` for every file that is not a conffile (dpkg keeps conffiles' sums apart),
/// paths relative to the root, as dh_md5sums writes them.
fn md5sums(items: &[Item]) -> String {
    items
        .iter()
        .filter(|item| item.role != Role::Config)
        .map(|item| {
            let sum: String = Md5::digest(&item.data)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("{sum}  {}\n", item.path.trim_start_matches('/'))
        })
        .collect()
}

fn conffiles(items: &[Item]) -> String {
    items
        .iter()
        .filter(|item| item.role == Role::Config)
        .map(|item| format!("{}\n", item.path))
        .collect()
}

/// Every directory above the files, as `./usr/` ... `./usr/bin/`, sorted so that each
/// comes before what it holds.
fn parent_dirs(items: &[Item]) -> BTreeSet<String> {
    let mut dirs = BTreeSet::from(["./".to_string()]);
    for item in items {
        let mut dir = String::from(".");
        let parts: Vec<&str> = item.path.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len() - 1] {
            dir.push('/');
            dir.push_str(part);
            dirs.insert(format!("{dir}/"));
        }
    }
    dirs
}

/// The outer `ar` archive, members in the given order.
fn ar(mtime: u64, members: &[(&str, Vec<u8>)]) -> Result<Vec<u8>, String> {
    let mut builder = ar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut header = ar::Header::new(name.as_bytes().to_vec(), data.len() as u64);
        header.set_mtime(mtime);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(0o100644);
        builder
            .append(&header, data.as_slice())
            .map_err(|e| format!("ar {name}: {e}"))?;
    }
    builder.into_inner().map_err(|e| format!("ar: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(path: &str, size: usize, role: Role) -> Item {
        Item {
            path: path.into(),
            data: vec![b'x'; size],
            mode: 0o644,
            role,
        }
    }

    fn release() -> Release {
        Release {
            version: "1.2.3".into(),
            revision: "1".into(),
            license: "MIT".into(),
            deb_arch: "amd64".into(),
            rpm_arch: "x86_64".into(),
            source_date: 0,
            changelog: Vec::new(),
        }
    }

    #[test]
    fn control_is_filled_and_has_no_comments() {
        let template = "# how it is made\nPackage: mesync\nVersion: @VERSION@\nArchitecture: @ARCH@\nInstalled-Size: @INSTALLED_SIZE@\nDepends: libc6 (>= @GLIBC@)\n";
        let text = control(template, &release(), "2.34", 7).unwrap();
        assert_eq!(
            text,
            "Package: mesync\nVersion: 1.2.3-1\nArchitecture: amd64\nInstalled-Size: 7\nDepends: libc6 (>= 2.34)\n"
        );
    }

    #[test]
    fn the_shipped_control_template_fills_completely() {
        let template = read_text(&crate::project_root().join("packaging/deb/control")).unwrap();
        let text = control(&template, &release(), "2.34", 1).unwrap();
        assert!(text.starts_with("Package: mesync\n"), "{text}");
        assert!(text.contains("\nDescription: "), "{text}");
    }

    #[test]
    fn sizes_count_whole_kib_and_directories() {
        let items = [
            item("/usr/bin/a", 1, Role::Plain),
            item("/usr/bin/b", 1025, Role::Plain),
        ];
        // 1 + 2 KiB of files; ./, ./usr/, ./usr/bin/.
        assert_eq!(installed_size(&items), 6);
    }

    #[test]
    fn conffiles_are_listed_and_kept_out_of_md5sums() {
        let items = [
            item("/etc/mesync/hub.toml", 3, Role::Config),
            item("/usr/bin/mesync", 3, Role::Plain),
        ];
        assert_eq!(conffiles(&items), "/etc/mesync/hub.toml\n");
        let sums = md5sums(&items);
        assert_eq!(sums, "f561aaf6ef0bf14d4208bb46a4ccb3ad  usr/bin/mesync\n");
    }

    #[test]
    fn parent_directories_come_before_their_contents() {
        let dirs: Vec<String> = parent_dirs(&[item("/usr/share/man/man1/x.1.gz", 1, Role::Doc)])
            .into_iter()
            .collect();
        assert_eq!(
            dirs,
            [
                "./",
                "./usr/",
                "./usr/share/",
                "./usr/share/man/",
                "./usr/share/man/man1/"
            ]
        );
    }
}
