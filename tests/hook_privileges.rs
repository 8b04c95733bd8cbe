//! Hooks with dropped privileges: an agent running as root runs a hook as `hook_user`, else
//! as the hook file's owner, and never as root by accident; a non-root agent runs hooks as
//! itself. The root cases need root (they skip with a note otherwise).

mod support;

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};

use serde_json::json;
use support::*;

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    nix_uid() == 0
}

fn nix_uid() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX)
}

fn skip(why: &str) {
    unavailable("hook privileges", why);
}

/// A world-writable directory where hooks running as anyone can leave what they saw.
fn output_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
    dir
}

/// A hook that writes its uid, gid, user environment and, after a `|`, all its groups to
/// `out/<id>`.
fn install_id_hook(agent: &Agent, ty: &str, out: &Path, owner: Option<u32>, mode: u32) -> PathBuf {
    let script = format!(
        "#!/bin/sh\necho \"$(id -u) $(id -g) $USER $HOME | $(id -G)\" > '{}'/\"$MESYNC_MESSAGE_ID\"\n",
        out.display()
    );
    let hook = agent.dir("hooks").join(ty);
    fs::write(&hook, script).expect("write hook");
    if let Some(uid) = owner {
        chown(&hook, Some(uid), Some(uid)).expect("chown hook");
    }
    fs::set_permissions(&hook, fs::Permissions::from_mode(mode)).expect("chmod hook");
    hook
}

/// Lets other users reach the hooks (the exec happens after the switch of user).
fn open_base(agent: &Agent) {
    for dir in [agent.base().to_path_buf(), agent.dir("hooks")] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod base");
    }
}

fn seen(out: &Path, id: &str) -> String {
    fs::read_to_string(out.join(id)).unwrap_or_default()
}

/// The groups a hook recorded (after the `|`).
fn groups_seen(out: &Path, id: &str) -> String {
    seen(out, id)
        .split_once('|')
        .map(|(_, groups)| groups.trim().to_string())
        .unwrap_or_default()
}

/// What `id -G USER` says: the user's groups from the group database.
fn groups_of(user: &str) -> String {
    let out = std::process::Command::new("id")
        .args(["-G", user])
        .output()
        .expect("id -G");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits until the agent has recorded a refused hook for message `id`.
fn wait_refused(agent: &Agent, id: &str) {
    wait_until(TIMEOUT, "the hook is refused and recorded", || {
        agent
            .cmd(&["list", "inbox", "--json"])
            .json_lines()
            .iter()
            .any(|m| m["id"] == id && m["hook"].as_str().is_some_and(|h| h.starts_with("refused")))
    });
}

#[test]
fn a_root_agent_runs_hooks_as_their_owner_or_hook_user_and_refuses_loose_ones() {
    if !is_root() {
        return skip("the agent must run as root to switch users");
    }
    if !on_path("setpriv") {
        return skip("setpriv (util-linux) is not installed");
    }
    let hub = Hub::start();
    let out = output_dir();
    // The agent runs as root with a supplementary group (adm), which a hook run as another
    // user must not keep.
    let mut rx = Agent::new(&hub.url(), "rx").with_wrapper(&["setpriv", "--groups=4"]);
    let tx = Agent::new(&hub.url(), "tx");
    open_base(&rx);
    install_id_hook(&rx, "owned.by.nobody", out.path(), Some(NOBODY), 0o755);
    install_id_hook(&rx, "owned.by.root", out.path(), None, 0o755);
    install_id_hook(&rx, "world.writable", out.path(), None, 0o757);
    install_id_hook(&rx, "group.writable", out.path(), Some(NOBODY), 0o775);
    rx.start();
    hub.wait_registered(&["rx"]);

    let by_owner = tx.send("owned.by.nobody", "{}", &["--target", "rx"]);
    let by_root = tx.send("owned.by.root", "{}", &["--target", "rx"]);
    let loose = tx.send("world.writable", "{}", &["--target", "rx"]);
    let group_loose = tx.send("group.writable", "{}", &["--target", "rx"]);
    let mut txa = tx;
    txa.start();
    wait_until(TIMEOUT, "the hooks ran", || {
        !seen(out.path(), &by_owner).is_empty() && !seen(out.path(), &by_root).is_empty()
    });
    let owner = seen(out.path(), &by_owner);
    assert!(
        owner.starts_with(&format!("{NOBODY} {NOBODY} nobody")),
        "a hook owned by nobody runs as nobody, with nobody's environment: {owner:?}"
    );
    // The agent really holds group 4...
    let status = fs::read_to_string(format!("/proc/{}/status", rx.pid().expect("running")))
        .expect("the agent's /proc status");
    let groups = status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .unwrap_or_default();
    assert!(
        groups.split_whitespace().any(|g| g == "4"),
        "the agent runs with group 4: {groups:?}"
    );
    // ...and root's supplementary groups are not kept: the hook has exactly nobody's.
    assert_eq!(
        groups_seen(out.path(), &by_owner),
        groups_of("nobody"),
        "a hook run as nobody has nobody's groups: {owner:?}"
    );
    assert!(
        seen(out.path(), &by_root).starts_with("0 0 root"),
        "a root-owned hook runs as root"
    );

    for refused in [&loose, &group_loose] {
        wait_refused(&rx, refused);
        assert!(
            seen(out.path(), refused).is_empty(),
            "a hook writable by group or others did not run"
        );
        assert!(rx.has(refused), "its message stays delivered");
    }
    for mode in ["757", "775"] {
        let said = format!("writable by group or others (mode {mode})");
        wait_until(
            TIMEOUT,
            &format!("the refusal of mode {mode} is logged"),
            || rx.logs.contains(&said),
        );
    }
}

#[test]
fn hook_user_wins_over_the_owner() {
    if !is_root() {
        return skip("the agent must run as root to switch users");
    }
    let hub = Hub::start();
    let out = output_dir();
    let mut rx = Agent::new(&hub.url(), "rx").with_env("MESYNC_HOOK_USER", "nobody");
    open_base(&rx);
    install_id_hook(&rx, "as.hook.user", out.path(), None, 0o755);
    rx.start();
    let mut tx = Agent::new(&hub.url(), "tx");
    tx.start();
    hub.wait_registered(&["rx"]);
    let id = tx.send("as.hook.user", &json!({}).to_string(), &["--target", "rx"]);
    wait_until(TIMEOUT, "the hook ran", || {
        !seen(out.path(), &id).is_empty()
    });
    assert!(
        seen(out.path(), &id).starts_with(&format!("{NOBODY} {NOBODY} nobody")),
        "hook_user=nobody beats the owner, root: {:?}",
        seen(out.path(), &id)
    );
}

#[test]
fn a_non_root_agent_runs_its_own_hooks_as_itself() {
    if !is_root() {
        return skip("needs root to start the agent as another user");
    }
    if !on_path("setpriv") {
        return skip("setpriv (util-linux) is not installed");
    }
    let hub = Hub::start();
    let out = output_dir();
    let uid = NOBODY.to_string();
    let mut rx = Agent::new(&hub.url(), "rx").with_wrapper(&[
        "setpriv",
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
    ]);
    install_id_hook(&rx, "own.hook", out.path(), Some(NOBODY), 0o755);
    // Everything of the agent's belongs to the user it runs as.
    let status = std::process::Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}")])
        .arg(rx.base())
        .status()
        .expect("chown");
    assert!(status.success());
    // A hook owned by another user who is not root (daemon, uid 1): the agent may not
    // run what someone else controls.
    install_id_hook(&rx, "foreign.hook", out.path(), Some(1), 0o755);
    open_base(&rx);
    rx.start();
    let mut tx = Agent::new(&hub.url(), "tx");
    tx.start();
    hub.wait_registered(&["rx"]);
    let foreign = tx.send("foreign.hook", "{}", &["--target", "rx"]);
    let id = tx.send("own.hook", "{}", &["--target", "rx"]);
    wait_until(TIMEOUT, "the hook ran", || {
        !seen(out.path(), &id).is_empty()
    });
    assert!(
        seen(out.path(), &id).starts_with(&format!("{NOBODY} {NOBODY}")),
        "the unprivileged agent ran its hook as itself: {:?}",
        seen(out.path(), &id)
    );
    wait_refused(&rx, &foreign);
    assert!(
        seen(out.path(), &foreign).is_empty(),
        "another user's hook did not run"
    );
    wait_until(TIMEOUT, "the refusal is logged", || {
        rx.logs.contains("owned by uid 1, neither root")
    });
    let inbox_file = rx.inbox_entry(&id).expect("delivered").0;
    let meta = fs::metadata(rx.dir("inbox").join(inbox_file)).expect("inbox file");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        NOBODY,
        "the inbox file is the agent user's"
    );
}
