//! Running under a service manager: sd_notify messages (READY, STATUS, WATCHDOG, STOPPING)
//! received on a datagram socket the test binds as NOTIFY_SOCKET, and the hub serving on a
//! socket passed by `systemd-socket-activate`.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Collects notifications from a NOTIFY_SOCKET until `done` says enough.
fn collect(
    socket: &UnixDatagram,
    deadline: Duration,
    mut done: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < deadline && !done(&seen) {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            seen.extend(text.lines().map(str::to_string));
        }
    }
    seen
}

fn has(seen: &[String], prefix: &str) -> bool {
    seen.iter().any(|l| l.starts_with(prefix))
}

#[test]
fn hub_and_agent_tell_the_service_manager_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub_socket_path = dir.path().join("hub.notify");
    let hub_socket = UnixDatagram::bind(&hub_socket_path).expect("bind notify socket");
    let notify = hub_socket_path.to_string_lossy().to_string();
    let mut hub = Hub::start_with(
        &[],
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "1000000")],
    );
    let seen = collect(&hub_socket, TIMEOUT, |s| {
        has(s, "READY=1") && has(s, "STATUS=") && has(s, "WATCHDOG=1")
    });
    assert!(has(&seen, "READY=1"), "hub READY: {seen:?}");
    assert!(has(&seen, "STATUS="), "hub STATUS: {seen:?}");
    assert!(
        has(&seen, "WATCHDOG=1"),
        "hub WATCHDOG with WATCHDOG_USEC set: {seen:?}"
    );

    let agent_socket_path = dir.path().join("agent.notify");
    let agent_socket = UnixDatagram::bind(&agent_socket_path).expect("bind notify socket");
    let mut agent = Agent::new(&hub.url(), "svc")
        .with_env("NOTIFY_SOCKET", &agent_socket_path.to_string_lossy())
        .with_env("WATCHDOG_USEC", "1000000");
    agent.start();
    let seen = collect(&agent_socket, TIMEOUT, |s| {
        has(s, "READY=1") && has(s, "STATUS=") && has(s, "WATCHDOG=1")
    });
    assert!(has(&seen, "READY=1"), "agent READY: {seen:?}");
    assert!(has(&seen, "STATUS="), "agent STATUS: {seen:?}");
    assert!(has(&seen, "WATCHDOG=1"), "agent WATCHDOG: {seen:?}");

    let status = agent.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent exits 0 on SIGTERM: {status:?}"
    );
    let seen = collect(&agent_socket, Duration::from_secs(2), |s| {
        has(s, "STOPPING=1")
    });
    assert!(has(&seen, "STOPPING=1"), "agent STOPPING: {seen:?}");

    let status = hub.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "the hub exits 0 on SIGTERM: {status:?}"
    );
    let seen = collect(&hub_socket, Duration::from_secs(2), |s| {
        has(s, "STOPPING=1")
    });
    assert!(has(&seen, "STOPPING=1"), "hub STOPPING: {seen:?}");
}

#[test]
fn without_a_watchdog_there_is_no_watchdog_ping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hub.notify");
    let socket = UnixDatagram::bind(&path).expect("bind");
    let _hub = Hub::start_with(&[], &[("NOTIFY_SOCKET", &path.to_string_lossy())]);
    let seen = collect(&socket, Duration::from_secs(3), |_| false);
    assert!(has(&seen, "READY=1"), "{seen:?}");
    assert!(
        !has(&seen, "WATCHDOG=1"),
        "no WATCHDOG_USEC, no pings: {seen:?}"
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
    let notify_path = dir.path().join("agent.notify");
    let socket = UnixDatagram::bind(&notify_path).expect("bind");
    let mut agent = Agent::new(&hub.url(), "hup")
        .without_env("MESYNC_POLL_INTERVAL")
        .with_env("NOTIFY_SOCKET", &notify_path.to_string_lossy());
    let config = agent.base().join("config.toml");
    std::fs::write(&config, "poll_interval = 60\n").expect("config");
    agent.start();
    let seen = collect(&socket, TIMEOUT, |s| has(s, "READY=1"));
    assert!(has(&seen, "READY=1"), "{seen:?}");
    assert!(
        ticks_in(&agent, Duration::from_secs(2)) == 0,
        "no housekeeping tick within 2 s at poll_interval 60"
    );

    std::fs::write(&config, "poll_interval = 1\n").expect("config");
    hangup(agent.pid().expect("running"));
    let seen = collect(&socket, TIMEOUT, |s| {
        has(s, "RELOADING=1") && has(s, "READY=1")
    });
    assert!(
        has(&seen, "RELOADING=1") && has(&seen, "READY=1"),
        "{seen:?}"
    );
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
    let hub = Hub::start_with(&["--config", &config.to_string_lossy()], &[]);
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
    hangup(hub.pid().expect("running"));
    wait_until(TIMEOUT, "the hub reloads its config file", || {
        hub.logs.lines()[mark..]
            .iter()
            .any(|l| l.contains("configuration reloaded"))
    });
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
        assert!(
            logs.lines()
                .iter()
                .any(|l| !l.starts_with("[harness]") && l.contains(&said)),
            "the {who} logs that it stopped: {:?}",
            logs.lines()
        );
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
