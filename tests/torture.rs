//! Fault injection, short: the same code as `cargo xtask torture --short` (the file is
//! included from the xtask, so there is one copy of it), run with the debug binary in a
//! directory under the target dir. A real hub and four real agents exchange messages while
//! at least 20 SIGKILLs (and a SIGSTOP of the hub) land on them; afterwards every message
//! must be in every recipient's inbox exactly once, nowhere else, with its hook run once
//! (or again only with a higher `MESYNC_ATTEMPT`).
//!
//! The seed is new on every run and printed; `MESYNC_TORTURE_SEED=S` replays its choices
//! and `MESYNC_TORTURE_KILLS=N` deals more kills.

#[allow(dead_code)]
#[path = "../xtask/src/torture.rs"]
mod torture;

use std::path::Path;

fn env_number(key: &str) -> Option<u64> {
    let value = std::env::var(key).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key}={value:?} is not a number")),
    )
}

#[test]
fn every_message_arrives_once_and_hooks_once_whatever_is_killed() {
    let seed = env_number("MESYNC_TORTURE_SEED").unwrap_or_else(torture::random_seed);
    let mut opts = torture::Options::new(true, seed);
    if let Some(kills) = env_number("MESYNC_TORTURE_KILLS") {
        opts.kills = kills as usize;
    }
    opts.replay = format!(
        "MESYNC_TORTURE_SEED={seed} MESYNC_TORTURE_KILLS={} cargo test --test torture",
        opts.kills
    );
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("torture");
    let report = torture::run(Path::new(env!("CARGO_BIN_EXE_mesync")), &parent, &opts)
        .unwrap_or_else(|e| panic!("torture run with seed {seed} could not run: {e}"));
    println!("{}", report.summary);
    assert!(
        report.ok,
        "{}\nreplay: {}\nfiles: {}\n{}",
        report.summary,
        opts.replay,
        report.dir.display(),
        report.details.join("\n")
    );
}
