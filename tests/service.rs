//! Running under a service manager: sd_notify messages (READY, STATUS, WATCHDOG, RELOADING,
//! STOPPING) received on a datagram socket the test binds as NOTIFY_SOCKET, WATCHDOG=1
//! withheld while a loop is stuck on a frozen disk, and the hub serving on a socket passed
//! by `systemd-socket-activate`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesync::service::liveness::{DISK_BOUND, MARGIN};
use support::*;

#[test]
fn hub_and_agent_tell_the_service_manager_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub_notes = Notifications::listen(&dir.path().join("hub.notify"));
    let mut hub = Hub::start_with(
        &[],
        &[
            ("NOTIFY_SOCKET", &hub_notes.socket()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let agent_notes = Notifications::listen(&dir.path().join("agent.notify"));
    let mut agent = Agent::new(&hub.url(), "svc")
        .with_env("NOTIFY_SOCKET", &agent_notes.socket())
        .with_env("WATCHDOG_USEC", "1000000");
    agent.start();

    for (who, notes) in [("hub", &hub_notes), ("agent", &agent_notes)] {
        let ready = notes.wait_line(0, "READY=1", &format!("the {who}'s READY=1"));
        notes.wait_line(ready, "WATCHDOG=1", &format!("the {who}'s WATCHDOG=1"));
        // READY=1 comes with a first status line; a second one comes from the loop that
        // keeps the status up to date.
        notes.wait_for(0, TIMEOUT, &format!("the {who}'s status kept up"), |n| {
            n.iter().filter(|(_, l)| l.starts_with("STATUS=")).count() >= 2
        });
    }

    let status = agent.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent exits 0 on SIGTERM: {status:?}"
    );
    agent_notes.wait_line(0, "STOPPING=1", "the agent's STOPPING=1");
    let status = hub.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "the hub exits 0 on SIGTERM: {status:?}"
    );
    hub_notes.wait_line(0, "STOPPING=1", "the hub's STOPPING=1");
}

#[test]
fn without_a_watchdog_there_is_no_watchdog_ping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notes = Notifications::listen(&dir.path().join("hub.notify"));
    let _hub = Hub::start_with(&[], &[("NOTIFY_SOCKET", &notes.socket())]);
    let ready = notes.wait_line(0, "READY=1", "the hub's READY=1");
    // A ping would come every 0.5 s of WATCHDOG_USEC at the latest; none comes in 3 s.
    let since = Instant::now();
    wait_until(TIMEOUT, "3 s after READY=1", || {
        since.elapsed() >= Duration::from_secs(3)
    });
    assert!(
        !notes.has(ready, "WATCHDOG=1"),
        "no WATCHDOG_USEC, no pings: {:?}",
        notes.lines()
    );
}

#[test]
fn the_hub_serves_on_a_socket_passed_by_systemd_socket_activate() {
    let tool = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists());
    let Some(tool) = tool else {
        return unavailable(
            "socket activation",
            "systemd-socket-activate (Debian package systemd) is not installed",
        );
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // Two sockets, as from a .socket unit with two ListenStream= lines, named like
    // FileDescriptorName= would.
    let listens = [
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ];
    let stderr_path = dir.path().join("hub.stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("create stderr file");
    let child = Command::new(tool)
        .args([
            "-l",
            &listens[0],
            "-l",
            &listens[1],
            "--fdname=public:internal",
        ])
        .args([BIN, "serve", "--data-dir"])
        .arg(dir.path().join("hub"))
        .env("HOME", dir.path())
        .env_remove("MESYNC_LISTEN")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start systemd-socket-activate");
    // systemd-socket-activate execs the hub in its own process: killing it stops the hub.
    let _hub = ChildGuard(child);
    // The first connection starts the hub, which takes the sockets it was given.
    for listen in &listens {
        let mut answer = None;
        let start = Instant::now();
        while start.elapsed() < TIMEOUT && answer.is_none() {
            answer = http_request(listen, "GET", "/healthz", None, Duration::from_secs(10)).ok();
            if answer.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let answer = answer.unwrap_or_else(|| panic!("an answer on activated socket {listen}"));
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let logs = std::fs::read_to_string(&stderr_path).expect("read hub stderr");
    for (listen, name) in listens.iter().zip(["public", "internal"]) {
        assert!(
            logs.lines()
                .any(|l| l.contains("passed by the service manager")
                    && l.contains(&format!("name={name}"))
                    && l.contains(listen.as_str())),
            "the log names socket {name} on {listen}: {logs}"
        );
    }
    assert!(
        !logs.contains("listening on http://0.0.0.0"),
        "no socket of its own: {logs}"
    );
}

/// How many times `state/status.json` is rewritten (one per housekeeping tick) in `window`.
fn ticks_in(agent: &Agent, window: Duration) -> usize {
    let status = agent.dir("state").join("status.json");
    let mtime = || std::fs::metadata(&status).and_then(|m| m.modified()).ok();
    let start = Instant::now();
    let mut last = mtime();
    let mut ticks = 0;
    while start.elapsed() < window {
        std::thread::sleep(Duration::from_millis(50));
        let now = mtime();
        if now != last {
            ticks += 1;
            last = now;
        }
    }
    ticks
}

#[test]
fn sighup_picks_up_a_changed_poll_interval_and_refuses_a_broken_config() {
    let hub = Hub::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let notes = Notifications::listen(&dir.path().join("agent.notify"));
    let mut agent = Agent::new(&hub.url(), "hup")
        .without_env("MESYNC_POLL_INTERVAL")
        .with_env("NOTIFY_SOCKET", &notes.socket());
    let config = agent.base().join("config.toml");
    std::fs::write(&config, "poll_interval = 60\n").expect("config");
    agent.start();
    notes.wait_line(0, "READY=1", "the agent's READY=1");
    assert!(
        ticks_in(&agent, Duration::from_secs(2)) == 0,
        "no housekeeping tick within 2 s at poll_interval 60"
    );

    std::fs::write(&config, "poll_interval = 1\n").expect("config");
    let mark = notes.len();
    hangup(agent.pid().expect("running"));
    let reloading = notes.wait_line(mark, "RELOADING=1", "RELOADING=1 on SIGHUP");
    notes.wait_line(reloading, "READY=1", "READY=1 after the reload");
    assert!(
        ticks_in(&agent, Duration::from_secs(4)) >= 2,
        "poll_interval 1 is in force after SIGHUP"
    );

    std::fs::write(&config, "poll_intervall = 1\n").expect("config");
    hangup(agent.pid().expect("running"));
    wait_until(TIMEOUT, "the broken config is refused", || {
        agent.logs.contains("keeping the one in force")
    });
    assert!(
        agent.logs.contains("poll_intervall"),
        "the log names the bad key"
    );
    assert!(
        agent.is_running(),
        "a broken config does not stop the agent"
    );
    assert!(
        ticks_in(&agent, Duration::from_secs(4)) >= 2,
        "the configuration in force is kept"
    );
}

#[test]
fn sighup_makes_the_hub_read_its_config_file_again_keeping_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, "[hub]\nmax_message_bytes = 1000\n").expect("config");
    let notes = Notifications::listen(&dir.path().join("hub.notify"));
    let hub = Hub::start_with(
        &["--config", &config.to_string_lossy()],
        &[("NOTIFY_SOCKET", &notes.socket())],
    );
    notes.wait_line(0, "READY=1", "READY=1 at start-up");
    let big = message(
        "hup.big",
        "src",
        None,
        "normal",
        serde_json::json!({"pad": "x".repeat(3000)}),
    );
    hub.post("/v1/messages", &big)
        .assert_error(413, "over max_message_bytes 1000");

    // A long-poll held open across the reload must still be answered.
    let addr = hub.addr().to_string();
    let poll = std::thread::spawn(move || {
        http_request(
            &addr,
            "GET",
            "/v1/messages?host=waiting&wait=5",
            None,
            Duration::from_secs(30),
        )
    });
    wait_until(TIMEOUT, "the long-poll is open", || {
        hub.get("/metrics")
            .text()
            .contains("mesync_long_polls_open 1")
    });

    std::fs::write(&config, "[hub]\nmax_message_bytes = 100000\n").expect("config");
    let mark = hub.logs.len();
    let notes_mark = notes.len();
    hangup(hub.pid().expect("running"));
    wait_until(TIMEOUT, "the hub reloads its config file", || {
        hub.logs.lines()[mark..]
            .iter()
            .any(|l| l.contains("configuration reloaded"))
    });
    // The service manager hears RELOADING=1 when the reload begins, READY=1 once it is done.
    let lines = notes.wait_for(notes_mark, TIMEOUT, "RELOADING=1, then READY=1", |n| {
        find(n, 0, "RELOADING=1").is_some_and(|r| find(n, r + 1, "READY=1").is_some())
    });
    let reloading = find(&lines, notes_mark, "RELOADING=1").expect("RELOADING=1");
    assert!(
        find(&lines, notes_mark, "READY=1").is_some_and(|ready| ready > reloading),
        "READY=1 comes after RELOADING=1, not before"
    );
    let r = hub.post("/v1/messages", &big);
    assert_eq!(r.status, 200, "the new limit is in force: {}", r.text());
    let answered = poll
        .join()
        .expect("poll thread")
        .expect("the long-poll is answered");
    assert_eq!(answered.status, 200, "the reload dropped no connection");

    std::fs::write(&config, "[hub]\nmax_message_bytez = 10\n").expect("config");
    let mark = hub.logs.len();
    hangup(hub.pid().expect("running"));
    wait_until(TIMEOUT, "the broken config is refused", || {
        hub.logs.lines()[mark..]
            .iter()
            .any(|l| l.contains("keeping the one in force") && l.contains("max_message_bytez"))
    });
    let again = message(
        "hup.big",
        "src",
        None,
        "normal",
        serde_json::json!({"pad": "y".repeat(3000)}),
    );
    let r = hub.post("/v1/messages", &again);
    assert_eq!(r.status, 200, "the limit in force is kept: {}", r.text());
}

#[test]
fn sigint_stops_hub_and_agent_cleanly_as_sigterm_does() {
    let mut hub = Hub::start();
    let mut agent = Agent::new(&hub.url(), "int-host");
    agent.start();
    hub.wait_registered(&["int-host"]);
    let agent_status = agent.stop_with("INT");
    let hub_status = hub.stop_with("INT");
    for (who, status, logs) in [
        ("agent", agent_status, &agent.logs),
        ("hub", hub_status, &hub.logs),
    ] {
        assert!(
            status.is_some_and(|s| s.success()),
            "the {who} exits 0 on SIGINT: {status:?}"
        );
        let said = format!("{who} stopped");
        wait_until(TIMEOUT, &format!("the {who} logs that it stopped"), || {
            logs.lines()
                .iter()
                .any(|l| !l.starts_with("[harness]") && l.contains(&said))
        });
    }
}

#[test]
fn sigterm_lets_a_hook_in_progress_finish_and_records_its_outcome() {
    let hub = Hub::start();
    let mut rx = Agent::new(&hub.url(), "grace-rx");
    let marks = rx.base().join("marks");
    std::fs::create_dir_all(&marks).expect("marks dir");
    rx.install_hook(
        "slow.hook",
        &format!(
            "#!/bin/sh\ntouch '{m}/started'\nsleep 2\ntouch '{m}/finished'\n",
            m = marks.display()
        ),
    );
    rx.start();
    hub.wait_registered(&["grace-rx"]);
    let msg = message(
        "slow.hook",
        "tester",
        Some("grace-rx"),
        "normal",
        serde_json::json!({}),
    );
    hub.post_message(&msg);
    wait_until(TIMEOUT, "the hook started", || {
        marks.join("started").exists()
    });

    // SIGTERM while the hook sleeps: the agent waits for it (within its grace period).
    let status = rx.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent exits 0: {status:?}"
    );
    assert!(
        marks.join("finished").exists(),
        "the hook in progress was allowed to finish"
    );
    let id = id_of(&msg);
    let listed = rx.list_json("inbox");
    let entry = listed
        .iter()
        .find(|e| e["id"] == id.as_str())
        .expect("the message is in the inbox");
    assert_eq!(entry["hook"], "ok", "its outcome is recorded: {entry}");
}

#[test]
fn sigterm_during_a_burst_leaves_no_partial_files_and_exits_0() {
    let mut hub = Hub::start();
    let mut tx = Agent::new(&hub.url(), "burst-tx");
    let mut rx = Agent::new(&hub.url(), "burst-rx");
    tx.start();
    rx.start();
    hub.wait_registered(&["burst-tx", "burst-rx"]);
    let outbox = tx.dir("outbox");
    for i in 0..500 {
        let msg = message(
            "burst.test",
            "burst-tx",
            Some("burst-rx"),
            "normal",
            serde_json::json!({"i": i}),
        );
        write_atomic(&outbox, &file_name_for(&msg), msg.to_string().as_bytes());
    }
    // Stop everything while the burst is on the wire.
    wait_until(TIMEOUT, "the burst is flowing", || {
        !rx.files("inbox").is_empty()
    });
    let tx_status = tx.stop();
    let rx_status = rx.stop();
    let hub_status = hub.stop();
    for (who, status) in [
        ("sender", tx_status),
        ("receiver", rx_status),
        ("hub", hub_status),
    ] {
        assert!(
            status.is_some_and(|s| s.success()),
            "the {who} exits 0 on SIGTERM: {status:?}"
        );
    }
    for (agent, queues) in [(&tx, ["outbox", "sent"]), (&rx, ["inbox", "state"])] {
        for queue in queues {
            let debris: Vec<String> = list_dir_all(&agent.dir(queue))
                .into_iter()
                .filter(|n| n.starts_with('.'))
                .collect();
            assert!(
                debris.is_empty(),
                "{}/{queue} holds temporary files: {debris:?}",
                agent.host_id
            );
        }
    }
    // The hub's commits leave nothing half-done in its staging area either.
    let staged = list_dir_all(&hub.data_dir().join("staging"));
    assert!(staged.is_empty(), "hub staging/ holds {staged:?}");
    for dir in [rx.dir("inbox"), tx.dir("sent")] {
        for name in list_dir(&dir) {
            let bytes = std::fs::read(dir.join(&name)).expect("read");
            let parsed = serde_json::from_slice::<serde_json::Value>(&bytes);
            assert!(
                parsed.is_ok_and(|m| m["id"].is_string()),
                "{name} is a whole message"
            );
        }
    }
    assert_eq!(
        tx.files("outbox").len() + tx.files("sent").len(),
        500,
        "every message is in outbox/ or sent/"
    );
}

/// WATCHDOG_USEC for the watchdog tests: a ping every 200 ms.
const FAST_WATCHDOG: &str = "400000";

fn pings(lines: &[(Instant, String)]) -> usize {
    lines.iter().filter(|(_, l)| l == "WATCHDOG=1").count()
}

#[test]
fn watchdog_pings_go_on_while_the_loops_wait_longer_than_the_margin() {
    // Every loop waits longer than MARGIN at a time here: a long-poll of 9 s (three HTTP
    // timeouts), a hook of 7 s, the hook runner and the commit thread idle for the rest.
    // None of that is being stuck.
    const WINDOW: Duration = Duration::from_secs(16);
    let dir = tempfile::tempdir().expect("tempdir");
    let hub_notes = Notifications::listen(&dir.path().join("hub.notify"));
    let hub = Hub::start_with(
        &[],
        &[
            ("NOTIFY_SOCKET", &hub_notes.socket()),
            ("WATCHDOG_USEC", FAST_WATCHDOG),
        ],
    );
    let agent_notes = Notifications::listen(&dir.path().join("agent.notify"));
    let mut agent = Agent::new(&hub.url(), "patient")
        .with_env("NOTIFY_SOCKET", &agent_notes.socket())
        .with_env("WATCHDOG_USEC", FAST_WATCHDOG)
        .with_env("MESYNC_HTTP_TIMEOUT", "3")
        .with_env("MESYNC_HOOK_TIMEOUT", "30");
    let hook = agent.dir("hooks").join("slow.job");
    std::fs::write(&hook, "#!/bin/sh\ncat >/dev/null\nsleep 7\n").expect("write hook");
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    agent.start();
    agent_notes.wait_line(0, "READY=1", "the agent's READY=1");
    let start = Instant::now();
    agent.send("slow.job", "{}", &["--target", "patient"]);
    wait_until(TIMEOUT + WINDOW, "the 7 s hook succeeded", || {
        agent.logs.contains("hook succeeded")
    });
    for (who, notes) in [("agent", &agent_notes), ("hub", &hub_notes)] {
        let lines = notes.wait_for(0, TIMEOUT + WINDOW, "a ping after the window", |n| {
            n.iter()
                .any(|(at, l)| l == "WATCHDOG=1" && at.duration_since(start) >= WINDOW)
        });
        let withheld: Vec<&String> = lines
            .iter()
            .map(|(_, l)| l)
            .filter(|l| l.contains("withheld") || l.contains("stuck"))
            .collect();
        assert!(withheld.is_empty(), "{who}: no loop is stuck: {withheld:?}");
        // 80 ticks in the window; a loaded machine may skip many, not nine in ten, and
        // never leave a gap as long as the margin (a withheld ping would).
        let in_window: Vec<Instant> = lines
            .iter()
            .filter(|(at, l)| {
                l == "WATCHDOG=1" && *at >= start && at.duration_since(start) <= WINDOW
            })
            .map(|(at, _)| *at)
            .collect();
        assert!(
            in_window.len() >= 8,
            "{who}: pings kept coming: {}",
            in_window.len()
        );
        let widest = in_window
            .windows(2)
            .map(|pair| pair[1].duration_since(pair[0]))
            .max()
            .unwrap_or_default();
        assert!(widest < MARGIN, "{who}: a gap of {widest:?} between pings");
    }
    for (who, logs) in [("agent", &agent.logs), ("hub", &hub.logs)] {
        assert!(!logs.contains("stuck since"), "{who} logs no stuck loop");
    }
}

/// A small ext4 file system in a file, mounted over a directory: a disk that can be made to
/// stop answering with `fsfreeze`, the way a failing disk or a hung network block device
/// does (writers wait in uninterruptible sleep). Thawed and unmounted when dropped.
struct LoopDisk {
    dir: PathBuf,
    _image: tempfile::TempDir,
}

impl LoopDisk {
    fn mount(dir: &Path) -> Result<LoopDisk, String> {
        let image_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = image_dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(64 << 20))
            .map_err(|e| format!("cannot create a disk image: {e}"))?;
        let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
            match cmd.stdout(Stdio::null()).stderr(Stdio::null()).status() {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("{what} failed ({s}); needs root and loop devices")),
                Err(e) => Err(format!("{what} cannot be run: {e}")),
            }
        };
        run(
            Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image),
            "mkfs.ext4",
        )?;
        run(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(dir),
            "mount -o loop",
        )?;
        let disk = LoopDisk {
            dir: dir.to_path_buf(),
            _image: image_dir,
        };
        // Freezing needs fsfreeze (util-linux) and a file system that supports it.
        disk.freeze_command("-f", "fsfreeze -f")?;
        disk.freeze_command("-u", "fsfreeze -u")?;
        Ok(disk)
    }

    fn freeze_command(&self, flag: &str, what: &str) -> Result<(), String> {
        match Command::new("fsfreeze").arg(flag).arg(&self.dir).status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("{what} failed ({s})")),
            Err(e) => Err(format!("{what} cannot be run: {e}")),
        }
    }

    fn freeze(&self) {
        self.freeze_command("-f", "fsfreeze -f").expect("freeze");
    }

    fn thaw(&self) {
        self.freeze_command("-u", "fsfreeze -u").expect("thaw");
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn a_hub_whose_disk_stops_answering_stops_its_watchdog_pings_until_the_disk_is_back() {
    const TEST: &str = "a_hub_whose_disk_stops_answering_stops_its_watchdog_pings";
    let dir = tempfile::tempdir().expect("tempdir");
    let notes = Notifications::listen(&dir.path().join("hub.notify"));
    let mut hub = Hub::start_with(
        &[],
        &[
            ("NOTIFY_SOCKET", &notes.socket()),
            ("WATCHDOG_USEC", FAST_WATCHDOG),
        ],
    );
    // The data dir moves to a disk of its own: stop the hub, mount, start it again. The
    // disk is declared after the hub, so it is thawed before the hub is killed, even when
    // the test fails.
    hub.kill9();
    let disk = match LoopDisk::mount(hub.data_dir()) {
        Ok(disk) => disk,
        Err(why) => return unavailable(TEST, &why),
    };
    let mark = notes.len();
    hub.restart();
    notes.wait_for(mark, TIMEOUT, "pings from the hub on its new disk", |n| {
        find_in(n, "WATCHDOG=1")
    });
    // The sender is registered now, so that the message below goes straight to the commit
    // thread (a first contact writes the host's file before anything else).
    hub.post_message(&message(
        "frozen.before",
        "src",
        Some("dst"),
        "normal",
        serde_json::json!({}),
    ));

    disk.freeze();
    let frozen = Instant::now();
    let mark = notes.len();
    let addr = hub.addr().to_string();
    let held = message(
        "frozen.during",
        "src",
        Some("dst"),
        "normal",
        serde_json::json!({}),
    );
    let body = held.to_string().into_bytes();
    let post = std::thread::spawn(move || {
        let timeout = DISK_BOUND * 3;
        http_request(&addr, "POST", "/v1/messages", Some(&body), timeout)
    });

    // The commit thread is stuck once it is MARGIN past its DISK_BOUND.
    let stuck_line = "STATUS=commit thread stuck since";
    let lines = notes.wait_for(
        mark,
        DISK_BOUND + MARGIN + TIMEOUT,
        "a status line naming the stuck commit thread",
        |n| find_in(n, stuck_line),
    );
    let first = find(&lines, mark, stuck_line).expect("stuck status");
    assert!(
        lines[first].0.duration_since(frozen) >= DISK_BOUND,
        "not stuck before its bound: {:?} after the freeze",
        lines[first].0.duration_since(frozen)
    );
    assert!(
        lines[mark..first]
            .iter()
            .any(|(at, l)| l == "WATCHDOG=1" && at.duration_since(frozen) >= DISK_BOUND / 2),
        "pings go on while the commit is within its bound"
    );
    assert!(
        lines[first].1.contains("WATCHDOG=1 withheld"),
        "{}",
        lines[first].1
    );
    // Ten more report ticks: each says the thread is still stuck, none pings.
    let lines = notes.wait_for(first, TIMEOUT, "ten more ticks while stuck", |n| {
        n.iter().filter(|(_, l)| l.starts_with(stuck_line)).count() > 10
    });
    assert_eq!(
        pings(&lines[first..]),
        0,
        "no WATCHDOG=1 while the commit thread is stuck"
    );
    let warnings = hub
        .logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("commit thread stuck since"))
        .collect::<Vec<_>>();
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("WATCHDOG=1 withheld"),
        "{}",
        warnings[0]
    );

    disk.thaw();
    let mark = notes.len();
    let answered = post
        .join()
        .expect("post thread")
        .expect("the message held up by the disk is answered");
    assert_eq!(answered.status, 200, "{}", answered.text());
    notes.wait_for(mark, TIMEOUT, "pings again once the disk is back", |n| {
        find_in(n, "WATCHDOG=1")
    });
    wait_until(TIMEOUT, "the hub logs that the loop is going again", || {
        hub.logs.contains("stuck loop is going again")
    });
}
