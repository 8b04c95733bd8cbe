//! The `mesync` binary: parse the command line, set up logging, run, map errors to exit codes
//! (0 success, 1 error, 2 usage error from clap).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use mesync::cli::{self, Cli, LogFormat};
use mesync::service;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mesync: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to the journal, with structured fields, when stderr is the journal (or when
/// asked), else as text to stderr. `RUST_LOG` filters them.
fn init_logging(cli: &Cli) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cli.command.default_log_filter()));
    let to_journal = match cli.log_format {
        LogFormat::Auto => service::stderr_is_journal(),
        LogFormat::Journal => true,
        LogFormat::Text => false,
    };
    let registry = tracing_subscriber::registry().with(filter);
    if to_journal {
        if let Some(journal) = service::journal_layer() {
            registry.with(journal).init();
            return;
        }
        eprintln!("mesync: the journal is not reachable; logging to stderr");
    }
    let text = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    registry.with(text).init();
}
