//! `cargo xtask <task>`: the project's own tooling. This file only dispatches; each task
//! lives in its own module.
//!
//! Tasks:
//! - `bench [--short]`: starts a real hub and real agents (release build) on loopback in a
//!   temporary directory and prints the latency from an outbox file appearing on one agent
//!   to the message being in another agent's inbox, and to its hook starting.
//! - `idle [--short] [--hub BINARY]`: only the bench's idle long-poll rows: the hub's RSS
//!   per idle long-poll (light hosts, TLS, real agents) and its CPU while idle (see `idle.rs`).
//! - `dist [--target-dir DIR]`: builds the release binary and writes the .deb, the .rpm and
//!   the launchd tarball into `target/dist/` (see `dist.rs`).

mod bench;
mod disk;
mod dist;
mod idle;
mod light;
mod peers;
mod procs;
mod torture;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bench") => bench::run(&args[1..]),
        Some("dist") => dist::run(&args[1..]),
        Some("idle") => idle::cli(&args[1..]),
        Some("torture") => torture::cli(&args[1..], procs::build_release),
        Some(other) => Err(format!("unknown task {other:?}\n{USAGE}")),
        None => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <task>\n\ntasks:\n  bench [--short]   latency of a real hub and agents on loopback\n  idle [--short] [--hub BINARY]\n                    the hub's memory and CPU per idle long-poll\n  torture [--kills N] [--seed S] [--agents K] [--short] [--keep]\n                    kill -9 hub and agents under load; check exactly-once delivery\n  dist [--target-dir DIR]\n                    build the .deb, the .rpm and the launchd tarball into target/dist/";

/// The workspace root, from this crate's manifest dir.
pub fn project_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}
