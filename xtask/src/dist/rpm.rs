//! The .rpm, written with the `rpm` crate: the same files as the .deb (with the zsh
//! completion where Fedora puts it and the licence under /usr/share/licenses), the
//! scriptlets and the tags only rpm has (Group, Requires) from `packaging/rpm/`,
//! `%changelog` from `packaging/changelog`, and the summary, description and packager from
//! the .deb's control template, so that each is written once.

use std::path::{Path, PathBuf};

use rpm::{BuildConfig, CompressionType, Dependency, FileMode, FileOptions, PackageBuilder};

use super::{ChangelogEntry, Item, Release, Role, fill, glibc_needed, read_text, write_atomically};

/// Directories the package owns (created with it, removed with it when empty); the others
/// belong to the distribution's base packages.
const OWNED_DIRS: [&str; 2] = ["/etc/mesync", "/usr/share/licenses/mesync"];

/// Writes `mesync-<version>-<revision>.<arch>.rpm` into `out_dir` and returns its path.
pub fn write(
    root: &Path,
    release: &Release,
    program: &[u8],
    items: &[Item],
    out_dir: &Path,
) -> Result<PathBuf, String> {
    let control = read_text(&root.join("packaging/deb/control"))?;
    let (summary, description) = summary_and_description(&control)?;
    let packager = control_field(&control, "Maintainer")?;
    let tags = Tags::parse(
        &read_text(&root.join("packaging/rpm/tags"))?,
        release,
        program,
    )?;
    let mut builder = PackageBuilder::new(
        "mesync",
        &release.version,
        &release.license,
        &release.rpm_arch,
        &summary,
    );
    builder
        .using_config(
            BuildConfig::default()
                .compression(CompressionType::Gzip)
                .source_date(timestamp(release.source_date)?),
        )
        .release(release.revision.as_str())
        .description(description)
        .packager(packager)
        .group(tags.group)
        // rpm records the build machine's name; a fixed one keeps the output reproducible.
        .build_host("localhost");

    let scriptlet = |name: &str| read_text(&root.join("packaging/rpm").join(name));
    let sysusers = sysusers_line(&read_text(&root.join("packaging/sysusers.conf"))?)?;
    builder
        .pre_install_script(fill(
            "packaging/rpm/pre.sh",
            &scriptlet("pre.sh")?,
            &[("SYSUSERS", &sysusers)],
        )?)
        .post_install_script(scriptlet("post.sh")?)
        .pre_uninstall_script(scriptlet("preun.sh")?)
        .post_uninstall_script(scriptlet("postun.sh")?);

    for requirement in tags.requires {
        builder.requires(Dependency::any(requirement));
    }
    for dir in OWNED_DIRS {
        builder
            .with_dir_entry(FileOptions::dir(dir).permissions(0o755))
            .map_err(|e| format!("rpm {dir}: {e}"))?;
    }
    for item in items {
        builder
            .with_file_contents(item.data.clone(), file_options(item))
            .map_err(|e| format!("rpm {}: {e}", item.path))?;
    }
    for entry in &release.changelog {
        let (name, text) = changelog_entry(entry);
        builder.add_changelog_entry(name, text, timestamp(entry.date)?);
    }

    let package = builder.build().map_err(|e| format!("rpm: {e}"))?;
    let mut bytes = Vec::new();
    package.write(&mut bytes).map_err(|e| format!("rpm: {e}"))?;
    let name = format!("mesync-{}.{}.rpm", release.full_version(), release.rpm_arch);
    write_atomically(&out_dir.join(name), &bytes)
}

fn file_options(item: &Item) -> rpm::FileOptionsBuilder {
    let options = FileOptions::new(item.path.as_str())
        .mode(FileMode::regular(item.mode as u16))
        .user("root")
        .group("root");
    match item.role {
        Role::Plain => options,
        Role::Config => options.config().noreplace(),
        Role::Doc => options.doc(),
        Role::License => options.license(),
    }
}

fn timestamp(seconds: u64) -> Result<rpm::Timestamp, String> {
    u32::try_from(seconds)
        .map(rpm::Timestamp)
        .map_err(|_| format!("timestamp {seconds} does not fit rpm's 32 bits"))
}

/// The Description field of the .deb's control template: its first line is the summary,
/// the rest (one leading space stripped, ` .` for a blank line) the description.
pub fn summary_and_description(control: &str) -> Result<(String, String), String> {
    let mut lines = control
        .lines()
        .skip_while(|line| !line.starts_with("Description:"));
    let summary = lines
        .next()
        .and_then(|line| line.strip_prefix("Description:"))
        .map(|summary| summary.trim().to_string())
        .ok_or("packaging/deb/control has no Description")?;
    let description: Vec<&str> = lines
        .map_while(|line| line.strip_prefix(' '))
        .map(|line| if line == "." { "" } else { line })
        .collect();
    Ok((summary, description.join("\n")))
}

/// The one `u ...` line of the sysusers.d file, for the %pre scriptlet.
fn sysusers_line(text: &str) -> Result<String, String> {
    text.lines()
        .find(|line| line.starts_with("u "))
        .map(str::to_string)
        .ok_or_else(|| "packaging/sysusers.conf has no `u` line".into())
}

/// One field of a control file (`Maintainer`), on one line.
fn control_field(control: &str, name: &str) -> Result<String, String> {
    control
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(|value| value.trim().to_string())
        .ok_or_else(|| format!("packaging/deb/control has no {name} field"))
}

/// `packaging/rpm/tags`: the tags only rpm has.
#[derive(Debug, PartialEq, Eq)]
struct Tags {
    group: String,
    requires: Vec<String>,
}

impl Tags {
    /// Parses `Tag: value` lines (comments dropped), with the glibc version the binary
    /// needs and the 64-bit marker of rpm's automatic library dependencies filled in.
    fn parse(template: &str, release: &Release, program: &[u8]) -> Result<Tags, String> {
        let glibc = glibc_needed(program).ok_or("the binary names no GLIBC_2.x symbol version")?;
        let lib64 = match release.rpm_arch.as_str() {
            "x86_64" | "aarch64" | "ppc64le" | "riscv64" | "s390x" => "(64bit)",
            _ => "",
        };
        let text = fill(
            "packaging/rpm/tags",
            template,
            &[("GLIBC", &glibc), ("LIB64", lib64)],
        )?;
        let mut group = None;
        let mut requires = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(':').map(|(tag, value)| (tag, value.trim())) {
                Some(("Group", value)) => group = Some(value.to_string()),
                Some(("Requires", value)) => requires.push(value.to_string()),
                _ => return Err(format!("packaging/rpm/tags: unknown line {line:?}")),
            }
        }
        let group = group.ok_or("packaging/rpm/tags has no Group")?;
        Ok(Tags { group, requires })
    }
}

/// A Debian changelog entry as rpm's: `Name <address> - version`, and `- change` lines.
fn changelog_entry(entry: &ChangelogEntry) -> (String, String) {
    let name = format!("{} - {}", entry.maintainer, entry.version);
    let text = entry
        .changes
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| match line.trim_start().strip_prefix("* ") {
            Some(change) => format!("- {change}"),
            None => format!("  {}", line.trim_start()),
        })
        .collect::<Vec<_>>()
        .join("\n");
    (name, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_comes_from_the_control_file() {
        let control = "Package: x\nDescription: short words\n first line\n .\n second\nOther: y\n";
        let (summary, description) = summary_and_description(control).unwrap();
        assert_eq!(summary, "short words");
        assert_eq!(description, "first line\n\nsecond");
    }

    #[test]
    fn changelog_bullets_become_rpm_dashes() {
        let entry = ChangelogEntry {
            version: "1.0-1".into(),
            maintainer: "A <a@example.org>".into(),
            date: 0,
            changes: "  * One\n    wrapped.\n\n  * Two.".into(),
        };
        let (name, text) = changelog_entry(&entry);
        assert_eq!(name, "A <a@example.org> - 1.0-1");
        assert_eq!(text, "- One\n  wrapped.\n- Two.");
    }

    #[test]
    fn tags_are_filled_for_the_architecture() {
        let release = Release {
            version: "1.0".into(),
            revision: "1".into(),
            license: "MIT".into(),
            deb_arch: "amd64".into(),
            rpm_arch: "x86_64".into(),
            source_date: 0,
            changelog: Vec::new(),
        };
        let template = "# comment @GLIBC@\nGroup: G\nRequires: libc.so.6(GLIBC_@GLIBC@)@LIB64@\n";
        let tags = Tags::parse(template, &release, b"GLIBC_2.17\0GLIBC_2.34\0").unwrap();
        assert_eq!(
            tags,
            Tags {
                group: "G".into(),
                requires: vec!["libc.so.6(GLIBC_2.34)(64bit)".into()],
            }
        );
        assert!(Tags::parse("Vendor: x\n", &release, b"GLIBC_2.34").is_err());
    }

    #[test]
    fn the_maintainer_is_the_packager() {
        let control = "Package: mesync\nMaintainer: A <a@example.org>\n";
        assert_eq!(
            control_field(control, "Maintainer").unwrap(),
            "A <a@example.org>"
        );
    }

    #[test]
    fn the_sysusers_line_is_found() {
        let text = read_text(&crate::project_root().join("packaging/sysusers.conf")).unwrap();
        assert!(sysusers_line(&text).unwrap().starts_with("u mesync "));
    }
}
