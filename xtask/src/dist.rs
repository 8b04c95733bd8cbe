//! `cargo xtask dist [--target-dir DIR]`: builds the release binary and packs it, with the
//! systemd units, the default configuration, man pages and shell completions, into
//! `target/dist/mesync_<version>-<revision>_<arch>.deb` and
//! `target/dist/mesync-<version>-<revision>.<arch>.rpm`, plus
//! `target/dist/mesync-<version>-launchd.tar.gz` (the launchd plists and an install script,
//! to go with a binary built on a Mac).
//!
//! What goes into the packages is checked-in text: `systemd/`, `launchd/` and `packaging/`
//! (control template, maintainer scripts, scriptlets, default configuration, sysusers.d
//! entry, copyright, changelog). This module only fills in the version, the architecture
//! and the sizes, generates the man pages and completions from the clap definitions, and
//! writes the archives.
//!
//! The version is Cargo.toml's; the package revision comes from the newest entry of
//! `packaging/changelog`, which must name that version, so a release cannot be packed
//! without its changelog entry. The output is reproducible: every timestamp is
//! `SOURCE_DATE_EPOCH` if set, else the date of that changelog entry (as dpkg does), entries
//! are sorted, owners are root, and compression embeds no time or name. Directories are
//! the input easiest to miss: the checkout's, cargo's home (the dependencies' sources) and
//! the target directory reach the debug information and panic locations, the linker hashes
//! them into the binary's GNU build id, and stripping leaves that in place. The release
//! build therefore renames them (`--remap-path-prefix` for rustc, `-ffile-prefix-map` for
//! the C compiler; see `build_release`), so the build id, kept, depends on the contents
//! alone: builds of one commit with the same Rust toolchain and C compiler give the same
//! bytes wherever the checkout and cargo's home are.

mod deb;
mod docs;
mod launchd;
mod rpm;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::DateTime;

use crate::project_root;

/// One file the packages install, with its contents and its role.
#[derive(Debug, Clone)]
pub struct Item {
    /// Absolute path on the target system.
    pub path: String,
    pub data: Vec<u8>,
    /// Permission bits (the file type is always "regular file").
    pub mode: u32,
    pub role: Role,
}

/// What a file is to the package manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Plain,
    /// A configuration file the administrator may edit: a deb conffile, rpm
    /// `%config(noreplace)`.
    Config,
    /// Documentation (man pages): rpm `%doc`.
    Doc,
    /// The licence text: rpm `%license`.
    License,
}

/// The two package formats, where their file lists differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Deb,
    Rpm,
}

/// Everything about this release that the package writers need.
#[derive(Debug, Clone)]
pub struct Release {
    /// Cargo.toml's version, e.g. `0.1.0`.
    pub version: String,
    /// The package revision (Debian revision, rpm release), e.g. `1`.
    pub revision: String,
    /// SPDX licence expression, from Cargo.toml.
    pub license: String,
    /// Architecture names: Debian's (`amd64`) and rpm's (`x86_64`).
    pub deb_arch: String,
    pub rpm_arch: String,
    /// The timestamp of every file and archive member, in seconds since the epoch.
    pub source_date: u64,
    /// Newest first.
    pub changelog: Vec<ChangelogEntry>,
}

/// One entry of `packaging/changelog` (Debian changelog format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogEntry {
    /// The full package version, e.g. `0.1.0-1`.
    pub version: String,
    /// `Name <address>`.
    pub maintainer: String,
    /// Seconds since the epoch.
    pub date: u64,
    /// The change lines as written (`  * ...`), without the header and trailer lines.
    pub changes: String,
}

/// Runs the task.
pub fn run(args: &[String]) -> Result<(), String> {
    let options = Options::parse(args)?;
    let metadata = CargoMetadata::read()?;
    let root = project_root();
    // Before the build, so that a missing changelog entry fails at once.
    let release = Release::new(&root, &metadata)?;
    let target_dir = options.target_dir.unwrap_or(metadata.target_dir.clone());
    let binary = build_release(&target_dir)?;

    let dist = target_dir.join("dist");
    fs::create_dir_all(&dist).map_err(|e| format!("cannot create {}: {e}", dist.display()))?;
    let program = stripped(&binary, &dist.join(".mesync.stripped"))?;

    let deb_files = items(&root, &release, &program, Format::Deb)?;
    let rpm_files = items(&root, &release, &program, Format::Rpm)?;
    let written = [
        deb::write(&root, &release, &program, &deb_files, &dist)?,
        rpm::write(&root, &release, &program, &rpm_files, &dist)?,
        launchd::write(&root, &release, &dist)?,
    ];
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Options {
    target_dir: Option<PathBuf>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut options = Options::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--target-dir" => {
                    let dir = args.next().ok_or("--target-dir needs a directory")?;
                    options.target_dir = Some(absolute(PathBuf::from(dir)));
                }
                other => match other.strip_prefix("--target-dir=") {
                    Some(dir) => options.target_dir = Some(absolute(PathBuf::from(dir))),
                    None => return Err(format!("dist: unknown argument {other:?}")),
                },
            }
        }
        Ok(options)
    }
}

/// A relative `--target-dir` is taken from where the command was run, as cargo does.
fn absolute(path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        return path;
    }
    std::env::current_dir()
        .map(|dir| dir.join(&path))
        .unwrap_or(path)
}

/// What `cargo metadata` says about the mesync package and the workspace.
struct CargoMetadata {
    version: String,
    license: String,
    /// The target directory cargo uses, honouring `CARGO_TARGET_DIR` and cargo's config.
    target_dir: PathBuf,
}

impl CargoMetadata {
    fn read() -> Result<CargoMetadata, String> {
        let output = Command::new(cargo())
            .args(["metadata", "--format-version", "1", "--no-deps", "--locked"])
            .current_dir(project_root())
            .output()
            .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "cargo metadata failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let json: serde_json::Value = serde_json::from_slice(&output.stdout)
            .map_err(|e| format!("cargo metadata printed no JSON: {e}"))?;
        let package = json["packages"]
            .as_array()
            .and_then(|packages| packages.iter().find(|p| p["name"] == "mesync"))
            .ok_or("cargo metadata lists no mesync package")?;
        let text = |value: &serde_json::Value, what: &str| {
            value
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("cargo metadata gives no {what}"))
        };
        Ok(CargoMetadata {
            version: text(&package["version"], "version")?,
            license: text(&package["license"], "license")?,
            target_dir: PathBuf::from(text(&json["target_directory"], "target directory")?),
        })
    }
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Builds the release binary into `target_dir` and returns its path: the release profile
/// users get with `cargo build --release`, with path remapping added to the user's own
/// flags, for rustc ([`release_rustflags`]) and for the C compiler that build scripts run
/// through the `cc` crate ([`release_cflags`]: ring's C and assembly sources), so that no
/// directory of this machine reaches the binary. Cargo keeps what it builds with different
/// flags apart: the first dist build compiles everything once more, next to what
/// `cargo build --release` compiles, and `target/release/mesync` is the binary of
/// whichever of the two ran last.
fn build_release(target_dir: &Path) -> Result<PathBuf, String> {
    let root = project_root();
    let remaps = path_remaps(&root, target_dir, cargo_home().as_deref());
    let rustflags = release_rustflags(
        std::env::var_os("CARGO_ENCODED_RUSTFLAGS"),
        std::env::var_os("RUSTFLAGS"),
        &remaps,
    )?;
    let cflags = release_cflags(std::env::var_os("CFLAGS"), &remaps);
    let status = Command::new(cargo())
        .args([
            "build",
            "--release",
            "--locked",
            "--bin",
            "mesync",
            "--target-dir",
        ])
        .arg(target_dir)
        .current_dir(&root)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTFLAGS")
        .env("CFLAGS", cflags)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("cargo build --release failed".into());
    }
    Ok(target_dir.join("release").join("mesync"))
}

/// Cargo's home, where the registry's sources are unpacked: `CARGO_HOME`, else `~/.cargo`.
fn cargo_home() -> Option<PathBuf> {
    match std::env::var_os("CARGO_HOME") {
        Some(home) if !home.is_empty() => Some(absolute(PathBuf::from(home))),
        _ => std::env::var_os("HOME")
            .filter(|home| !home.is_empty())
            .map(|home| PathBuf::from(home).join(".cargo")),
    }
}

/// The directories that would otherwise reach the binary, each with the fixed name it is
/// given there, in the order rustc must see them (when several prefixes match a path, the
/// last one given wins, so the innermost comes last): cargo's home, whose registry
/// sources give the paths of the dependencies' panic locations and debug information, as
/// `/cargo`; the workspace root, which is rustc's working directory and so the debug
/// information's compilation directory, as `.`; the target directory, where build scripts
/// write generated sources, as `target`. Each also under its real path if that differs
/// (a symbolic link on the way), since rustc sees the working directory that way.
fn path_remaps(
    root: &Path,
    target_dir: &Path,
    cargo_home: Option<&Path>,
) -> Vec<(PathBuf, &'static str)> {
    let mut remaps = Vec::new();
    let dirs = [
        (cargo_home, "/cargo"),
        (Some(root), "."),
        (Some(target_dir), "target"),
    ];
    for (dir, name) in dirs {
        let Some(dir) = dir else { continue };
        if let Ok(real) = dir.canonicalize()
            && real != dir
        {
            remaps.push((real, name));
        }
        remaps.push((dir.to_path_buf(), name));
    }
    remaps
}

/// `CFLAGS` for the C compilers the `cc` crate runs in build scripts: the user's, then a
/// `-ffile-prefix-map` (GCC 8, Clang 10) for each of `remaps`, which renames the paths in
/// debug information and `__FILE__`. cc splits `CFLAGS` at whitespace and GCC splits the
/// mapping at its first `=`: a directory with either is left out, with a note.
fn release_cflags(
    user: Option<std::ffi::OsString>,
    remaps: &[(PathBuf, &str)],
) -> std::ffi::OsString {
    let mut cflags = user.unwrap_or_default();
    for (from, to) in remaps {
        let text = from.to_string_lossy();
        if text.contains(|c: char| c.is_whitespace() || c == '=') {
            eprintln!(
                "xtask: note: {}: a space or `=` in the path; C sources' debug information \
                 keeps it",
                from.display()
            );
            continue;
        }
        if !cflags.is_empty() {
            cflags.push(" ");
        }
        cflags.push("-ffile-prefix-map=");
        cflags.push(from);
        cflags.push(format!("={to}"));
    }
    cflags
}

/// The rustc flags of the release build, as `CARGO_ENCODED_RUSTFLAGS` (flags separated by
/// 0x1f): the user's own, taken as cargo would (`CARGO_ENCODED_RUSTFLAGS` if set, else
/// `RUSTFLAGS` split at spaces), then a `--remap-path-prefix` for each of `remaps`. Setting
/// the variable hides rustflags from cargo's configuration files (`build.rustflags`,
/// `target.*.rustflags`), as any `RUSTFLAGS` does: a package is built from the
/// environment's flags alone.
fn release_rustflags(
    encoded: Option<std::ffi::OsString>,
    plain: Option<std::ffi::OsString>,
    remaps: &[(PathBuf, &str)],
) -> Result<String, String> {
    let text = |value: std::ffi::OsString, name: &str| {
        value
            .into_string()
            .map_err(|_| format!("{name} is not valid UTF-8"))
    };
    let mut flags: Vec<String> = match (encoded, plain) {
        (Some(encoded), _) => {
            let encoded = text(encoded, "CARGO_ENCODED_RUSTFLAGS")?;
            if encoded.is_empty() {
                Vec::new()
            } else {
                encoded.split('\x1f').map(str::to_string).collect()
            }
        }
        (None, Some(plain)) => text(plain, "RUSTFLAGS")?
            .split(' ')
            .map(str::trim)
            .filter(|flag| !flag.is_empty())
            .map(str::to_string)
            .collect(),
        (None, None) => Vec::new(),
    };
    for (from, to) in remaps {
        let from = from.to_str().ok_or_else(|| {
            format!(
                "{}: a path that is not UTF-8 cannot be remapped out of the binary",
                from.display()
            )
        })?;
        if from.contains('\x1f') {
            return Err(format!(
                "{from:?}: a path with a 0x1f byte cannot be passed to rustc"
            ));
        }
        flags.push(format!("--remap-path-prefix={from}={to}"));
    }
    Ok(flags.join("\x1f"))
}

/// Copies the binary to `copy` without its debug information and symbol table, as
/// distributions ship binaries (dh_strip's options). The release profile keeps line
/// tables for backtraces, and stripping a copy leaves the shared profile alone. `strip`
/// comes with binutils, which any Linux Rust toolchain links with; without it the copy is
/// left unstripped, with a note.
fn stripped(binary: &Path, copy: &Path) -> Result<Vec<u8>, String> {
    fs::copy(binary, copy).map_err(|e| format!("cannot copy {}: {e}", binary.display()))?;
    match Command::new("strip")
        .args(["--remove-section=.comment", "--remove-section=.note"])
        .arg(copy)
        .status()
    {
        Ok(status) if status.success() => {}
        Ok(status) => return Err(format!("strip {} failed: {status}", copy.display())),
        Err(e) => eprintln!("xtask: note: cannot run strip ({e}); packing the binary unstripped"),
    }
    let data = fs::read(copy).map_err(|e| format!("cannot read {}: {e}", copy.display()))?;
    let _ = fs::remove_file(copy);
    Ok(data)
}

impl Release {
    fn new(root: &Path, metadata: &CargoMetadata) -> Result<Release, String> {
        let changelog = parse_changelog(&read_text(&root.join("packaging/changelog"))?)?;
        let newest = changelog
            .first()
            .ok_or("packaging/changelog has no entry")?;
        let revision = newest
            .version
            .strip_prefix(&format!("{}-", metadata.version))
            .filter(|revision| !revision.is_empty() && !revision.contains('-'))
            .ok_or_else(|| {
                format!(
                    "packaging/changelog's newest entry is for {}, not for Cargo.toml's version \
                     {}: add an entry `mesync ({}-1)` at the top",
                    newest.version, metadata.version, metadata.version
                )
            })?
            .to_string();
        let (deb_arch, rpm_arch) = architectures(std::env::consts::ARCH)?;
        Ok(Release {
            version: metadata.version.clone(),
            revision,
            license: metadata.license.clone(),
            deb_arch: deb_arch.into(),
            rpm_arch: rpm_arch.into(),
            source_date: source_date(newest)?,
            changelog,
        })
    }

    /// `<version>-<revision>`, as Debian and rpm both write it.
    pub fn full_version(&self) -> String {
        format!("{}-{}", self.version, self.revision)
    }
}

/// Debian's and rpm's names of the architecture the binary is built for (the host's).
fn architectures(rust_arch: &str) -> Result<(&'static str, &'static str), String> {
    match rust_arch {
        "x86_64" => Ok(("amd64", "x86_64")),
        "aarch64" => Ok(("arm64", "aarch64")),
        "riscv64" => Ok(("riscv64", "riscv64")),
        "powerpc64" => Ok(("ppc64el", "ppc64le")),
        "s390x" => Ok(("s390x", "s390x")),
        other => Err(format!("no package architecture known for {other}")),
    }
}

/// `SOURCE_DATE_EPOCH` when set (the reproducible-builds convention), else the date of the
/// newest changelog entry.
fn source_date(newest: &ChangelogEntry) -> Result<u64, String> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(text) if !text.is_empty() => text
            .trim()
            .parse()
            .map_err(|_| format!("SOURCE_DATE_EPOCH={text:?} is not a number of seconds")),
        _ => Ok(newest.date),
    }
}

/// Parses a Debian changelog: entries of a header line `name (version) dist; urgency=...`,
/// change lines, and a trailer ` -- Name <address>  Date` (RFC 2822 date).
pub fn parse_changelog(text: &str) -> Result<Vec<ChangelogEntry>, String> {
    let mut entries = Vec::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    for (number, line) in text.lines().enumerate() {
        let at = |what: &str| format!("packaging/changelog:{}: {what}", number + 1);
        if line.trim().is_empty() && current.is_none() {
            continue;
        }
        if let Some(trailer) = line.strip_prefix(" -- ") {
            let (version, changes) = current.take().ok_or_else(|| at("trailer without header"))?;
            let (maintainer, date) = trailer
                .split_once("  ")
                .ok_or_else(|| at("expected ` -- Name <address>  Date`"))?;
            let date = DateTime::parse_from_rfc2822(date.trim())
                .map_err(|e| at(&format!("bad date {date:?}: {e}")))?;
            let date = u64::try_from(date.timestamp()).map_err(|_| at("date before 1970"))?;
            entries.push(ChangelogEntry {
                version,
                maintainer: maintainer.to_string(),
                date,
                changes: changes.join("\n").trim_matches('\n').to_string(),
            });
        } else if let Some((_, changes)) = current.as_mut() {
            changes.push(line);
        } else {
            let version = line
                .split_once(" (")
                .and_then(|(_, rest)| rest.split_once(')'))
                .map(|(version, _)| version.to_string())
                .ok_or_else(|| at("expected `mesync (VERSION) DIST; urgency=...`"))?;
            current = Some((version, Vec::new()));
        }
    }
    if current.is_some() {
        return Err("packaging/changelog: the last entry has no ` -- ` trailer".into());
    }
    Ok(entries)
}

/// The files both packages install, for one format: the binary, the units, the sysusers.d
/// entry, the default configuration, man pages and completions, and the format's own
/// copyright, licence and changelog files.
pub fn items(
    root: &Path,
    release: &Release,
    program: &[u8],
    format: Format,
) -> Result<Vec<Item>, String> {
    let file = |path: &str, source: &str, mode: u32, role: Role| -> Result<Item, String> {
        Ok(Item {
            path: path.into(),
            data: read_bytes(&root.join(source))?,
            mode,
            role,
        })
    };
    let mut items = vec![
        Item {
            path: "/usr/bin/mesync".into(),
            data: program.to_vec(),
            mode: 0o755,
            role: Role::Plain,
        },
        file(
            "/usr/lib/systemd/system/mesync-hub.service",
            "systemd/mesync-hub.service",
            0o644,
            Role::Plain,
        )?,
        file(
            "/usr/lib/systemd/system/mesync-hub.socket",
            "systemd/mesync-hub.socket",
            0o644,
            Role::Plain,
        )?,
        file(
            "/usr/lib/systemd/system/mesync-agent-system.service",
            "systemd/mesync-agent-system.service",
            0o644,
            Role::Plain,
        )?,
        file(
            "/usr/lib/systemd/user/mesync-agent.service",
            "systemd/mesync-agent.service",
            0o644,
            Role::Plain,
        )?,
        file(
            "/usr/lib/sysusers.d/mesync.conf",
            "packaging/sysusers.conf",
            0o644,
            Role::Plain,
        )?,
        // The hub runs as "mesync" and must read its file. The system agent runs as root,
        // and its file may hold a token.
        file(
            "/etc/mesync/hub.toml",
            "packaging/hub.toml",
            0o644,
            Role::Config,
        )?,
        file(
            "/etc/mesync/agent.toml",
            "packaging/agent.toml",
            0o600,
            Role::Config,
        )?,
    ];
    let date = docs::man_date(release.source_date);
    for page in docs::man_pages(&release.version, &date)? {
        items.push(Item {
            path: format!("/usr/share/man/man1/{}.gz", page.name),
            data: gzip(&page.text)?,
            mode: 0o644,
            role: Role::Doc,
        });
    }
    let completions = docs::completions()?;
    let zsh_dir = match format {
        Format::Deb => "/usr/share/zsh/vendor-completions",
        Format::Rpm => "/usr/share/zsh/site-functions",
    };
    for (path, data) in [
        (
            "/usr/share/bash-completion/completions/mesync".to_string(),
            completions.bash,
        ),
        (format!("{zsh_dir}/_mesync"), completions.zsh),
        (
            "/usr/share/fish/vendor_completions.d/mesync.fish".to_string(),
            completions.fish,
        ),
    ] {
        items.push(Item {
            path,
            data,
            mode: 0o644,
            role: Role::Plain,
        });
    }
    match format {
        Format::Deb => {
            items.push(file(
                "/usr/share/doc/mesync/copyright",
                "packaging/copyright",
                0o644,
                Role::Plain,
            )?);
            items.push(Item {
                path: "/usr/share/doc/mesync/changelog.Debian.gz".into(),
                data: gzip(&read_bytes(&root.join("packaging/changelog"))?)?,
                mode: 0o644,
                role: Role::Plain,
            });
            items.push(file(
                "/usr/share/lintian/overrides/mesync",
                "packaging/deb/lintian-overrides",
                0o644,
                Role::Plain,
            )?);
        }
        Format::Rpm => items.push(file(
            "/usr/share/licenses/mesync/LICENSE",
            "LICENSE",
            0o644,
            Role::License,
        )?),
    }
    items.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(items)
}

/// gzip at the best level with no name and no timestamp in the header (`gzip -9n`), as
/// Debian wants man pages and changelogs, and with the Unix OS byte gzip itself writes.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;

    let mut encoder = flate2::GzBuilder::new()
        .operating_system(3)
        .write(Vec::new(), flate2::Compression::best());
    encoder
        .write_all(data)
        .and_then(|()| encoder.finish())
        .map_err(|e| format!("gzip: {e}"))
}

/// Replaces each `@KEY@` in `template` and fails if any placeholder is left, so a template
/// that grows a new one is never shipped half filled.
pub fn fill(name: &str, template: &str, values: &[(&str, &str)]) -> Result<String, String> {
    let mut text = template.to_string();
    for (key, value) in values {
        text = text.replace(&format!("@{key}@"), value);
    }
    match leftover_placeholder(&text) {
        Some(key) => Err(format!("{name}: placeholder @{key}@ has no value")),
        None => Ok(text),
    }
}

/// The first `@KEY@` (upper-case letters and underscores between two `@`) in `text`.
fn leftover_placeholder(text: &str) -> Option<&str> {
    text.match_indices('@').find_map(|(at, _)| {
        let rest = &text[at + 1..];
        let key = &rest[..rest.find('@')?];
        let is_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_uppercase() || c == '_');
        is_key.then_some(key)
    })
}

/// The newest glibc symbol version the binary needs (`2.34`), from the `GLIBC_2.N` version
/// names in its dynamic string table, for the packages' libc dependency.
pub fn glibc_needed(binary: &[u8]) -> Option<String> {
    const TAG: &[u8] = b"GLIBC_2.";
    let mut newest: Option<Vec<u32>> = None;
    let mut rest = binary;
    while let Some(at) = rest.windows(TAG.len()).position(|w| w == TAG) {
        let tail = &rest[at + TAG.len()..];
        let end = tail
            .iter()
            .position(|b| !(b.is_ascii_digit() || *b == b'.'))
            .unwrap_or(tail.len());
        let numbers: Option<Vec<u32>> = std::str::from_utf8(&tail[..end])
            .ok()
            .map(|text| text.trim_end_matches('.'))
            .filter(|text| !text.is_empty())
            .and_then(|text| text.split('.').map(|n| n.parse().ok()).collect());
        if let Some(minor) = numbers {
            let version: Vec<u32> = std::iter::once(2).chain(minor).collect();
            if newest.as_ref().is_none_or(|old| version > *old) {
                newest = Some(version);
            }
        }
        rest = &tail[end..];
    }
    newest.map(|v| v.iter().map(u32::to_string).collect::<Vec<_>>().join("."))
}

/// A tar archive in memory, in GNU format, every entry owned by root with one fixed time,
/// entries in the order they are added.
pub struct Tar {
    builder: tar::Builder<Vec<u8>>,
    mtime: u64,
}

impl Tar {
    pub fn new(mtime: u64) -> Tar {
        Tar {
            builder: tar::Builder::new(Vec::new()),
            mtime,
        }
    }

    pub fn dir(&mut self, name: &str) -> Result<(), String> {
        self.append(name, tar::EntryType::Directory, &[], 0o755)
    }

    pub fn file(&mut self, name: &str, data: &[u8], mode: u32) -> Result<(), String> {
        self.append(name, tar::EntryType::Regular, data, mode)
    }

    fn append(
        &mut self,
        name: &str,
        kind: tar::EntryType,
        data: &[u8],
        mode: u32,
    ) -> Result<(), String> {
        let mut header = tar::Header::new_gnu();
        // The name is written as given: the tar crate's path setter would drop the leading
        // "./" that dpkg-deb writes.
        let field = &mut header.as_old_mut().name;
        if name.len() >= field.len() {
            return Err(format!("{name}: name too long for a tar header"));
        }
        field[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header
            .set_username("root")
            .and_then(|()| header.set_groupname("root"))
            .map_err(|e| format!("{name}: {e}"))?;
        header.set_mtime(self.mtime);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder
            .append(&header, data)
            .map_err(|e| format!("{name}: {e}"))
    }

    pub fn finish(self) -> Result<Vec<u8>, String> {
        self.builder.into_inner().map_err(|e| format!("tar: {e}"))
    }
}

pub fn read_text(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

pub fn read_bytes(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Writes `data` to `path` through a temporary file and a rename, so an interrupted run
/// never leaves a truncated package behind under the final name.
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<PathBuf, String> {
    let dir = path.parent().ok_or("output path has no directory")?;
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))?;
    std::io::Write::write_all(&mut file, data)
        .and_then(|()| {
            // A temporary file is private (0600); a package is for everyone to read.
            use std::os::unix::fs::PermissionsExt;
            file.as_file()
                .set_permissions(fs::Permissions::from_mode(0o644))
        })
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.persist(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHANGELOG: &str = "mesync (0.2.0-1) unstable; urgency=medium\n\n  * Second.\n    More.\n\n -- A B <a@example.org>  Thu, 26 Nov 2026 10:00:00 +0000\n\nmesync (0.1.0-1) unstable; urgency=medium\n\n  * First.\n\n -- A B <a@example.org>  Wed, 25 Nov 2026 10:00:00 +0000\n";

    #[test]
    fn changelog_entries_parse_newest_first() {
        let entries = parse_changelog(CHANGELOG).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].version, "0.2.0-1");
        assert_eq!(entries[0].maintainer, "A B <a@example.org>");
        assert_eq!(entries[0].changes, "  * Second.\n    More.");
        assert_eq!(entries[1].date, 1_795_600_800);
        assert!(entries[0].date > entries[1].date);
    }

    #[test]
    fn a_changelog_without_trailer_is_refused() {
        assert!(parse_changelog("mesync (0.1.0-1) unstable; urgency=medium\n\n  * x\n").is_err());
    }

    #[test]
    fn the_shipped_changelog_parses() {
        let text = read_text(&project_root().join("packaging/changelog")).unwrap();
        assert!(!parse_changelog(&text).unwrap().is_empty());
    }

    /// The default /etc/mesync/*.toml must be accepted as the units pass them, with
    /// `--config`, and must set nothing (every key commented out, showing its default).
    #[test]
    fn the_shipped_configuration_files_parse_as_all_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let load = |file: &str| {
            let overrides = mesync::config::Overrides {
                config: Some(project_root().join("packaging").join(file)),
                base_dir: Some(dir.path().to_path_buf()),
                host_id: Some("h".into()),
                ..Default::default()
            };
            mesync::config::Config::load_with(&overrides, |_| None)
                .unwrap_or_else(|e| panic!("packaging/{file}: {e}"))
        };
        let defaults = mesync::config::Config::load_with(
            &mesync::config::Overrides {
                base_dir: Some(dir.path().to_path_buf()),
                host_id: Some("h".into()),
                ..Default::default()
            },
            |_| None,
        )
        .unwrap();
        for file in ["hub.toml", "agent.toml"] {
            let config = load(file);
            assert_eq!(config.server_url, defaults.server_url, "{file}");
            assert_eq!(config.poll_interval, defaults.poll_interval, "{file}");
            assert_eq!(config.hub.listen, defaults.hub.listen, "{file}");
            assert_eq!(config.hub.data_dir, defaults.hub.data_dir, "{file}");
            assert!(config.token.is_none(), "{file}");
        }
    }

    #[test]
    fn placeholders_are_all_filled_or_refused() {
        let filled = fill("t", "V=@VERSION@ a@b.org", &[("VERSION", "1")]).unwrap();
        assert_eq!(filled, "V=1 a@b.org");
        let err = fill("t", "@VERSION@ @ARCH@", &[("VERSION", "1")]).unwrap_err();
        assert!(err.contains("@ARCH@"), "{err}");
    }

    #[test]
    fn glibc_version_is_the_newest_named() {
        let binary = b"\0GLIBC_2.2.5\0GLIBC_2.34\0GLIBC_2.9\0GLIBC_PRIVATE\0";
        assert_eq!(glibc_needed(binary).as_deref(), Some("2.34"));
        assert_eq!(glibc_needed(b"no libc here"), None);
    }

    #[test]
    fn gzip_has_no_timestamp_and_the_best_level_flag() {
        let data = gzip(b"hello").unwrap();
        assert_eq!(&data[4..8], &[0, 0, 0, 0], "mtime");
        assert_eq!(data[8], 2, "XFL: best compression");
        assert_eq!(data[9], 3, "OS: Unix");
    }

    #[test]
    fn release_rustflags_keep_the_users_and_add_the_remaps_last() {
        let remaps = [
            (PathBuf::from("/home/u/.cargo"), "/cargo"),
            (PathBuf::from("/src/a=b"), "."),
        ];
        let added = "--remap-path-prefix=/home/u/.cargo=/cargo\x1f--remap-path-prefix=/src/a=b=.";
        let os = |text: &str| Some(std::ffi::OsString::from(text));
        assert_eq!(release_rustflags(None, None, &remaps).unwrap(), added);
        // RUSTFLAGS is split at spaces, as cargo does; CARGO_ENCODED_RUSTFLAGS wins over it
        // and keeps its flags whole.
        assert_eq!(
            release_rustflags(None, os("  -C  target-cpu=x86-64-v2 "), &remaps).unwrap(),
            format!("-C\x1ftarget-cpu=x86-64-v2\x1f{added}")
        );
        assert_eq!(
            release_rustflags(os("--cfg\x1fa b"), os("-C debuginfo=2"), &remaps).unwrap(),
            format!("--cfg\x1fa b\x1f{added}")
        );
        // Set but empty: no flags of the user's.
        assert_eq!(
            release_rustflags(os(""), os("-Cdebuginfo=2"), &remaps).unwrap(),
            added
        );
    }

    #[test]
    fn release_cflags_keep_the_users_and_skip_what_cc_would_split() {
        let remaps = [
            (PathBuf::from("/home/u/.cargo"), "/cargo"),
            (PathBuf::from("/src/my project"), "."),
            (PathBuf::from("/src/a=b"), "."),
            (PathBuf::from("/src/t"), "target"),
        ];
        let added = "-ffile-prefix-map=/home/u/.cargo=/cargo -ffile-prefix-map=/src/t=target";
        assert_eq!(release_cflags(None, &remaps), added);
        assert_eq!(
            release_cflags(Some("-O2 -g".into()), &remaps),
            format!("-O2 -g {added}").as_str()
        );
    }

    #[test]
    fn path_remaps_put_the_innermost_directory_last() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        let link = real.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let remaps = path_remaps(&link, &link.join("target"), Some(Path::new("/nowhere")));
        assert_eq!(
            remaps,
            vec![
                (PathBuf::from("/nowhere"), "/cargo"),
                (real.clone(), "."),
                (link.clone(), "."),
                (link.join("target"), "target"),
            ]
        );
    }

    #[test]
    fn architectures_map_to_both_formats() {
        assert_eq!(architectures("x86_64").unwrap(), ("amd64", "x86_64"));
        assert_eq!(architectures("aarch64").unwrap(), ("arm64", "aarch64"));
        assert!(architectures("m68k").is_err());
    }
}
