//! The service files shipped beside the binary: systemd units under `systemd/` and launchd
//! plists under `launchd/`.
//!
//! Each one is accepted by the tool that reads it (`systemd-analyze verify`, python3's
//! `plistlib`), starts the right subcommand of the binary, and opens with a comment saying
//! how it is installed. The hub's unit stays hardened: `systemd-analyze security` rates it
//! at most 2.0, and every system call the real hub makes while it serves, reloads and stops
//! under the unit's conditions (socket activation, sd_notify, watchdog) is one that the
//! unit's `SystemCallFilter=` allows, as traced by strace.
//!
//! A test whose tool (systemd-analyze, python3, strace) is missing says why and passes,
//! unless `MESYNC_REQUIRE_TOOLS=1`, under which it fails.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;

use serde_json::{Value, json};
use support::*;

/// Every file that must be shipped; a new unit or plist is checked as soon as it exists.
const SHIPPED: [&str; 6] = [
    "systemd/mesync-hub.service",
    "systemd/mesync-hub.socket",
    "systemd/mesync-agent.service",
    "systemd/mesync-agent-system.service",
    "launchd/com.mesync.hub.plist",
    "launchd/com.mesync.agent.plist",
];

/// Units for the per-user service manager (`systemctl --user`); the others are system units.
const USER_UNITS: [&str; 1] = ["mesync-agent.service"];

/// Where the packages install the binary, as the units name it.
const PACKAGED_BIN: &str = "/usr/bin/mesync";

/// The exposure `systemd-analyze security` may give the hub's unit at most.
const MAX_HUB_EXPOSURE: f64 = 2.0;

// ---------------------------------------------------------------------------------------
// Tidy: comments and commands
// ---------------------------------------------------------------------------------------

#[test]
fn every_unit_and_plist_opens_with_how_to_install_it() {
    for name in SHIPPED {
        assert!(root().join(name).is_file(), "{name} is missing");
    }
    for path in units() {
        let header = leading_comment(&read(&path));
        let name = file_name(&path);
        assert!(
            !header.is_empty(),
            "{name} must start with a comment saying how it is installed"
        );
        for needed in ["install", "systemctl", "enable", "journalctl"] {
            assert!(
                header.contains(needed),
                "{name}: its opening comment must say how it is installed, enabled and where \
                 it logs; it does not mention `{needed}`"
            );
        }
    }
    for path in plists() {
        let text = read(&path);
        let name = file_name(&path);
        let body = text
            .strip_prefix("<?xml")
            .and_then(|rest| rest.split_once("?>"))
            .map_or(text.as_str(), |(_, rest)| rest)
            .trim_start();
        let comment = body
            .strip_prefix("<!--")
            .and_then(|rest| rest.split_once("-->"))
            .map(|(comment, _)| comment)
            .unwrap_or_else(|| {
                panic!(
                    "{name} must open, after the XML declaration, with a comment saying how \
                     it is installed"
                )
            });
        for needed in ["launchctl bootstrap", "launchctl bootout", "Logs:"] {
            assert!(
                comment.contains(needed),
                "{name}: its opening comment must say how it is installed, removed and where \
                 it logs; it does not mention `{needed}`"
            );
        }
    }
}

#[test]
fn units_start_the_packaged_binary_with_the_right_subcommand() {
    for path in units().into_iter().filter(|p| extension(p) == "service") {
        let name = file_name(&path);
        let exec = values(&read(&path), "ExecStart");
        assert_eq!(
            exec.len(),
            1,
            "{name}: one ExecStart= expected, got {exec:?}"
        );
        let words: Vec<&str> = exec[0].split_whitespace().collect();
        assert_eq!(
            words.first().copied(),
            Some(PACKAGED_BIN),
            "{name}: ExecStart= must run {PACKAGED_BIN}"
        );
        assert_eq!(
            words.get(1).copied(),
            Some(expected_subcommand(&name)),
            "{name}: wrong subcommand in ExecStart={}",
            exec[0]
        );
        // `systemctl reload` is how the README says to apply a changed config: SIGHUP.
        assert_eq!(
            values(&read(&path), "ExecReload"),
            vec!["/bin/kill -HUP $MAINPID".to_string()],
            "{name}: `systemctl reload` must send SIGHUP"
        );
    }
}

// ---------------------------------------------------------------------------------------
// systemd-analyze
// ---------------------------------------------------------------------------------------

#[test]
fn systemd_analyze_verify_accepts_every_unit() {
    if let Err(why) = systemd_analyze_usable() {
        return unavailable("systemd_analyze_verify_accepts_every_unit", &why);
    }
    // `verify` insists that every ExecStart= binary exists: point the copies at the binary
    // under test instead of the packaged path.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut system = Vec::new();
    let mut user = Vec::new();
    for path in units() {
        let name = file_name(&path);
        let copy = dir.path().join(&name);
        fs::write(&copy, read(&path).replace(PACKAGED_BIN, BIN)).expect("copy unit");
        if USER_UNITS.contains(&name.as_str()) {
            user.push(copy);
        } else {
            system.push(copy);
        }
    }
    assert!(!system.is_empty() && !user.is_empty(), "no units found");

    let mut cmd = Command::new("systemd-analyze");
    cmd.args(["verify", "--man=no"]).args(&system);
    check_verify(cmd, &system, "system");

    // The user manager wants a runtime directory even offline; give it a private one, and a
    // home without unit files of its own.
    let runtime = dir.path().join("runtime");
    fs::create_dir(&runtime).expect("runtime dir");
    fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).expect("chmod");
    let mut cmd = Command::new("systemd-analyze");
    cmd.args(["--user", "verify", "--man=no"])
        .args(&user)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("HOME", dir.path());
    check_verify(cmd, &user, "user");
}

/// Runs one `systemd-analyze verify`: it must exit 0 and say nothing about our units (it
/// only warns, and exits 0, about unknown keys and system calls, for instance).
fn check_verify(mut cmd: Command, units: &[PathBuf], kind: &str) {
    let out = output(&mut cmd);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = units.iter().map(|u| file_name(u)).collect();
    let complaints: Vec<&str> = said
        .lines()
        .filter(|line| names.iter().any(|n| line.contains(n.as_str())))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify ({kind} units {names:?}): {}\n{said}",
        out.status
    );
}

#[test]
fn hub_unit_exposure_is_at_most_2() {
    if let Err(why) = systemd_analyze_usable() {
        return unavailable("hub_unit_exposure_is_at_most_2", &why);
    }
    let unit = root().join("systemd/mesync-hub.service");
    let out = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&unit),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mark = "Overall exposure level for mesync-hub.service:";
    let Some(exposure) = text.lines().find_map(|line| {
        let rest = &line[line.find(mark)? + mark.len()..];
        rest.split_whitespace().next()?.parse::<f64>().ok()
    }) else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("--offline") {
            // systemd before 250 cannot rate a unit file without a running manager.
            return unavailable(
                "hub_unit_exposure_is_at_most_2",
                &format!("systemd-analyze security has no --offline here: {stderr}"),
            );
        }
        panic!(
            "no `{mark}` line from systemd-analyze security ({}):\n{text}\n{stderr}",
            out.status
        );
    };
    eprintln!("mesync-hub.service: exposure {exposure}");
    assert!(
        exposure <= MAX_HUB_EXPOSURE,
        "mesync-hub.service is rated {exposure}, above {MAX_HUB_EXPOSURE}:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------
// The hub's system calls against its unit's filter
// ---------------------------------------------------------------------------------------

#[test]
fn hub_makes_only_system_calls_its_unit_allows() {
    const TEST: &str = "hub_makes_only_system_calls_its_unit_allows";
    if let Err(why) = systemd_analyze_usable() {
        return unavailable(TEST, &why);
    }
    if let Err(why) = strace_usable() {
        return unavailable(TEST, &why);
    }
    let unit = read(&root().join("systemd/mesync-hub.service"));
    let allowed = allowed_system_calls(&unit);

    let made = trace_hub(&unit);
    assert!(
        made.contains("accept4") || made.contains("accept"),
        "the trace does not show the hub serving at all: {made:?}"
    );
    let refused: Vec<&String> = made.difference(&allowed).collect();
    assert!(
        refused.is_empty(),
        "the hub made system calls that mesync-hub.service's SystemCallFilter= refuses \
         (with EPERM): {refused:?}; allow them in the unit or stop making them"
    );
}

/// The system calls `SystemCallFilter=` lines allow, merged as systemd merges them: the
/// first line is an allow list (this helper does not model a unit that starts with a deny
/// list), each later line adds to it or, with `~`, takes away from it.
fn allowed_system_calls(unit: &str) -> BTreeSet<String> {
    let mut groups = BTreeMap::new();
    let mut allowed: Option<BTreeSet<String>> = None;
    for value in values(unit, "SystemCallFilter") {
        let (deny, list) = match value.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, value.as_str()),
        };
        let mut names = BTreeSet::new();
        for item in list.split_whitespace() {
            // An errno suffix (`@privileged:EPERM`) changes the action, not the set.
            let item = item.split(':').next().unwrap_or(item);
            names.extend(expand(item, &mut groups));
        }
        match (allowed.as_mut(), deny) {
            (None, false) => {
                // systemd always allows these with an allow list (systemd.exec(5)).
                let mut set = expand("@default", &mut groups);
                set.extend(
                    [
                        "execve",
                        "exit",
                        "exit_group",
                        "getrlimit",
                        "rt_sigreturn",
                        "sigreturn",
                    ]
                    .map(String::from),
                );
                set.extend(names);
                allowed = Some(set);
            }
            (None, true) => panic!("SystemCallFilter= must start with an allow list"),
            (Some(set), false) => set.extend(names),
            (Some(set), true) => set.retain(|n| !names.contains(n)),
        }
    }
    allowed.expect("mesync-hub.service has no SystemCallFilter=")
}

/// A system call, or the members of a `@group` (recursively), as this systemd defines them.
fn expand(item: &str, groups: &mut BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    if !item.starts_with('@') {
        return BTreeSet::from([item.to_string()]);
    }
    if let Some(known) = groups.get(item) {
        return known.clone();
    }
    let out = output(Command::new("systemd-analyze").args(["syscall-filter", item]));
    assert!(
        out.status.success(),
        "systemd-analyze syscall-filter {item}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut set = BTreeSet::new();
    // The first line names the group; then one member per line, comments start with `#`.
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let member = line.trim();
        if member.is_empty() || member.starts_with('#') {
            continue;
        }
        set.extend(expand(member, groups));
    }
    assert!(
        !set.is_empty(),
        "systemd-analyze knows no members of {item}"
    );
    groups.insert(item.to_string(), set.clone());
    set
}

/// Runs the hub as its unit does (the same ExecStart= arguments, a socket passed with
/// LISTEN_FDS, NOTIFY_SOCKET and WATCHDOG_USEC, $STATE_DIRECTORY) under `strace -f`,
/// drives it through sends, a broadcast, pulls, acks, a long-poll, a host removal, the
/// read-only endpoints, a SIGHUP reload and a SIGTERM, and returns the names of the system
/// calls it made.
fn trace_hub(unit: &str) -> BTreeSet<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    fs::create_dir(&state).expect("state dir");
    let config = dir.path().join("hub.toml");
    fs::write(&config, "").expect("empty config");
    let trace = dir.path().join("trace");

    // The unit's own arguments, with the packaged paths replaced by the test's.
    let exec = values(unit, "ExecStart");
    let args: Vec<String> = exec[0]
        .split_whitespace()
        .skip(1)
        .map(|word| {
            if word.starts_with("/etc/mesync/") {
                config.display().to_string()
            } else {
                word.to_string()
            }
        })
        .collect();

    let notes = Notifications::listen(&dir.path().join("notify"));

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr").to_string();

    // systemd passes the socket as fd 3 and names the receiving pid in LISTEN_PID: the
    // socket goes in as stdin, and a shell moves it to fd 3, exports its own pid and
    // execs the hub (which keeps that pid).
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-o"])
        .arg(&trace)
        .args([
            "--",
            "sh",
            "-c",
            r#"LISTEN_PID=$$; export LISTEN_PID; exec "$@" 3<&0 </dev/null"#,
            "sh",
            BIN,
        ])
        .args(&args);
    mesync::service::clear_inherited_settings(&mut cmd);
    cmd.env_remove("HOME");
    for value in values(unit, "Environment") {
        // /var/lib/mesync is the unit's $STATE_DIRECTORY.
        let value = value.replace("/var/lib/mesync", &state.display().to_string());
        if let Some((key, value)) = value.split_once('=') {
            cmd.env(key, value);
        }
    }
    cmd.env("STATE_DIRECTORY", &state)
        .env("LISTEN_FDS", "1")
        .env("NOTIFY_SOCKET", notes.socket())
        .env("WATCHDOG_USEC", "200000")
        .stdin(Stdio::from(OwnedFd::from(listener)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn strace");
    let mut guard = ChildGuard(child);
    // After its exec, the shell that strace started is the hub, with the unit's arguments.
    // Killing strace would only detach it: on the way out of a failed test, kill it too.
    let cmdline: Vec<String> = [BIN.to_string()].into_iter().chain(args).collect();
    let _hub = KillByCmdline(cmdline.clone());
    let mut stderr = guard.0.stderr.take().expect("stderr");
    let log = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    notes.wait_line(0, "READY=1", "the hub's READY=1");
    let hub = |method: &str, path: &str, body: Option<&Value>| {
        let body = body.map(|b| b.to_string().into_bytes());
        let r = http_request(&addr, method, path, body.as_deref(), TIMEOUT)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert!(r.status < 300, "{method} {path}: {} {}", r.status, r.text());
        r
    };
    // Two hosts register by pulling; a broadcast is then linked into both queues.
    hub("GET", "/v1/messages?host=alpha&wait=0", None);
    hub("GET", "/v1/messages?host=beta&wait=0", None);
    let targeted = message("unit.check", "alpha", Some("beta"), "high", json!({"n": 1}));
    hub("POST", "/v1/messages", Some(&targeted));
    let batch: Vec<Value> = (0..8)
        .map(|n| message("unit.check", "gamma", None, "normal", json!({ "n": n })))
        .collect();
    hub("POST", "/v1/messages", Some(&json!({ "messages": batch })));
    let pulled = hub("GET", "/v1/messages?host=beta&wait=1&max=100", None).json();
    let ids: Vec<Value> = pulled["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert!(!ids.is_empty(), "beta got nothing: {pulled}");
    hub(
        "POST",
        "/v1/ack",
        Some(&json!({ "host": "beta", "ids": ids })),
    );
    // An empty long-poll that runs out.
    hub("GET", "/v1/messages?host=beta&wait=1", None);
    hub("GET", "/healthz", None);
    hub("GET", "/metrics", None);
    hub("GET", "/v1/hosts", None);
    hub("DELETE", "/v1/hosts/alpha", None);
    notes.wait_line(0, "WATCHDOG=1", "a WATCHDOG=1 ping");

    let cmdline: Vec<&str> = cmdline.iter().map(String::as_str).collect();
    let pids = pids_with_cmdline(&cmdline);
    assert_eq!(pids.len(), 1, "one hub running {cmdline:?}, found {pids:?}");
    let pid = pids[0];
    let before = notes.len();
    signal(pid, "HUP");
    let reloading = notes.wait_line(before, "RELOADING=1", "RELOADING=1 after SIGHUP");
    notes.wait_line(reloading, "READY=1", "READY=1 after the reload");
    hub("GET", "/healthz", None);
    signal(pid, "TERM");
    let status = guard.0.wait().expect("wait for strace");
    let log = log.join().unwrap_or_default();
    assert!(
        status.success(),
        "the hub under strace ended with {status}:\n{log}"
    );

    let text = fs::read_to_string(&trace).expect("read the trace");
    system_calls_after_exec(&text, BIN)
}

/// `kill -SIG pid`.
fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

/// The names of the system calls in an `strace -f` trace from the successful execve of
/// `bin` on (what the shell did before it is not the hub's).
fn system_calls_after_exec(trace: &str, bin: &str) -> BTreeSet<String> {
    let exec = format!("execve(\"{bin}\"");
    let start = trace
        .lines()
        .position(|line| line.contains(&exec) && line.trim_end().ends_with("= 0"))
        .unwrap_or_else(|| panic!("no successful {exec}...) in the trace"));
    trace
        .lines()
        .skip(start)
        .filter_map(|line| {
            // `PID name(args...` ; resumptions, signals and exits are not new calls.
            let rest = line.trim_start().split_once(' ')?.1.trim_start();
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty() && rest[name.len()..].starts_with('(')).then_some(name)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// launchd
// ---------------------------------------------------------------------------------------

#[test]
fn plists_parse_and_start_the_right_subcommand() {
    const TEST: &str = "plists_parse_and_start_the_right_subcommand";
    const LOAD: &str = "import json, plistlib, sys\n\
                        print(json.dumps(plistlib.load(open(sys.argv[1], 'rb')), default=str))";
    let plists = plists();
    assert!(!plists.is_empty(), "no plists found");
    for path in plists {
        let name = file_name(&path);
        let out = match Command::new("python3")
            .arg("-c")
            .arg(LOAD)
            .arg(&path)
            .output()
        {
            Ok(out) => out,
            Err(e) => return unavailable(TEST, &format!("python3 cannot be run ({e})")),
        };
        assert!(
            out.status.success(),
            "{name} does not parse with plistlib: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let plist: Value = serde_json::from_slice(&out.stdout).expect("plistlib's JSON");

        let label = name.strip_suffix(".plist").unwrap_or(&name);
        assert_eq!(plist["Label"], label, "{name}: Label must be the file name");
        let program = plist["ProgramArguments"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no ProgramArguments"));
        let words: Vec<&str> = program.iter().filter_map(Value::as_str).collect();
        assert!(
            words.first().is_some_and(|w| w.ends_with("/mesync")),
            "{name}: ProgramArguments must start with the mesync binary, got {words:?}"
        );
        assert_eq!(
            words.get(1).copied(),
            Some(expected_subcommand(&name)),
            "{name}: wrong subcommand in {words:?}"
        );
        assert_eq!(plist["RunAtLoad"], true, "{name}: RunAtLoad");
        assert!(!plist["KeepAlive"].is_null(), "{name}: no KeepAlive");
        // Paths are absolute once the install step has put the home directory in place of
        // @HOME@ (launchd expands neither ~ nor $HOME).
        for key in ["StandardOutPath", "StandardErrorPath"] {
            let value = plist[key]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no {key}"))
                .replace("@HOME@", "/Users/someone");
            assert!(
                value.starts_with('/') && !value.contains('@') && !value.contains('~'),
                "{name}: {key} {value:?} is not an absolute path"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The files in `dir` (under the repository root) whose extension is one of `extensions`.
fn files(dir: &str, extensions: &[&str]) -> Vec<PathBuf> {
    let dir = root().join(dir);
    let mut found: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| extensions.contains(&extension(p).as_str()))
        .collect();
    found.sort();
    found
}

fn units() -> Vec<PathBuf> {
    files("systemd", &["service", "socket"])
}

fn plists() -> Vec<PathBuf> {
    files("launchd", &["plist"])
}

/// `serve` for the hub's files, `start` for the agents'.
fn expected_subcommand(name: &str) -> &'static str {
    if name.contains("hub") {
        "serve"
    } else if name.contains("agent") {
        "start"
    } else {
        panic!("{name}: neither a hub nor an agent file")
    }
}

/// The comment lines a unit file starts with, joined.
fn leading_comment(text: &str) -> String {
    text.lines()
        .take_while(|line| line.starts_with('#') || line.trim().is_empty())
        .filter(|line| line.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The values of `key=` in a unit file, in order (sections are not told apart: the keys
/// asked for appear in one section only).
fn values(text: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    text.lines()
        .map(str::trim)
        .filter_map(|line| line.strip_prefix(prefix.as_str()))
        .map(str::to_string)
        .collect()
}

/// Runs a command to completion, capturing what it prints.
fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn systemd_analyze_usable() -> Result<(), String> {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("systemd-analyze --version failed ({})", out.status)),
        Err(e) => Err(format!(
            "systemd-analyze is not installed ({e}); Debian's package `systemd` has it"
        )),
    }
}

fn strace_usable() -> Result<(), String> {
    match Command::new("strace")
        .args(["-f", "-o", "/dev/null", "true"])
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "strace cannot trace here ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("strace is not installed ({e})")),
    }
}
