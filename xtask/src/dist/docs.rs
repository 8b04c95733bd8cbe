//! Man pages and shell completions, generated from the CLI's clap definitions
//! (`mesync::cli::Cli`), so they always say what the binary accepts.

use clap::{Command, CommandFactory};
use clap_complete::Shell;

/// One man page: its file name (`mesync-serve.1`) and its roff text.
#[derive(Debug)]
pub struct ManPage {
    pub name: String,
    pub text: Vec<u8>,
}

/// Completion scripts for the shells the packages support.
#[derive(Debug)]
pub struct Completions {
    pub bash: Vec<u8>,
    pub zsh: Vec<u8>,
    pub fish: Vec<u8>,
}

/// `mesync.1` and one page per subcommand, nested ones included (`mesync-token-issue.1`),
/// in section 1. clap's `help` subcommand gets none: `mesync help X` is `mesync X --help`.
pub fn man_pages(version: &str, date: &str) -> Result<Vec<ManPage>, String> {
    let mut command = mesync::cli::Cli::command().disable_help_subcommand(true);
    // Gives every subcommand its display name (`mesync-token-issue`) and usage name
    // (`mesync token issue`), which the pages' titles and synopses use.
    command.build();
    let mut pages = Vec::new();
    collect_pages(&command, version, date, &mut pages)?;
    pages.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(pages)
}

fn collect_pages(
    command: &Command,
    version: &str,
    date: &str,
    pages: &mut Vec<ManPage>,
) -> Result<(), String> {
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        collect_pages(sub, version, date, pages)?;
    }
    let man = clap_mangen::Man::new(command.clone())
        .source(format!("mesync {version}"))
        .manual("mesync manual")
        .date(date);
    let mut text = Vec::new();
    man.render(&mut text)
        .map_err(|e| format!("cannot render the man page of {}: {e}", command.get_name()))?;
    pages.push(ManPage {
        name: man.get_filename(),
        text,
    });
    Ok(())
}

/// The pages' date (`YYYY-MM-DD`) from the release's timestamp, not today's, so that the
/// output is the same on every run.
pub fn man_date(source_date: u64) -> String {
    i64::try_from(source_date)
        .ok()
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .map(|date| date.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

pub fn completions() -> Result<Completions, String> {
    let generate = |shell: Shell| {
        let mut command = mesync::cli::Cli::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, "mesync", &mut script);
        if script.is_empty() {
            return Err(format!("no {shell} completion was generated"));
        }
        Ok(script)
    };
    Ok(Completions {
        bash: generate(Shell::Bash)?,
        zsh: generate(Shell::Zsh)?,
        fish: generate(Shell::Fish)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_has_a_page() {
        let pages = man_pages("0.0.0", "2026-01-01").unwrap();
        let names: Vec<&str> = pages.iter().map(|p| p.name.as_str()).collect();
        for name in [
            "mesync.1",
            "mesync-serve.1",
            "mesync-start.1",
            "mesync-send.1",
            "mesync-token.1",
            "mesync-token-issue.1",
            "mesync-hosts-remove.1",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
        let serve = pages.iter().find(|p| p.name == "mesync-serve.1").unwrap();
        let text = String::from_utf8_lossy(&serve.text);
        assert!(text.contains("mesync serve"), "{text}");
        assert!(
            text.contains("2026\\-01\\-01") || text.contains("2026-01-01"),
            "{text}"
        );
    }

    #[test]
    fn completions_name_the_subcommands() {
        let completions = completions().unwrap();
        for script in [&completions.bash, &completions.zsh, &completions.fish] {
            let text = String::from_utf8_lossy(script);
            assert!(text.contains("serve") && text.contains("token"), "{text}");
        }
    }

    #[test]
    fn man_date_is_the_release_day() {
        assert_eq!(man_date(1_795_600_800), "2026-11-25");
    }
}
