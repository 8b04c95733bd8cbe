//! The hub's limits against clients that misbehave: oversized headers, too many long-polls
//! for one host, slow clients; and error answers that say nothing of the hub's insides.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn oversized_headers_are_refused_and_the_hub_keeps_serving() {
    let hub = Hub::start();
    let huge = "x".repeat(100 * 1024);
    let answer = http_request_with(
        hub.addr(),
        "GET",
        "/healthz",
        &[("X-Filler", &huge)],
        None,
        Duration::from_secs(10),
    );
    match answer {
        Ok(r) => assert_eq!(r.status, 431, "a 100 KiB header: {}", r.text()),
        // Closing the connection is a refusal too; what matters is that nothing was served.
        Err(e) => eprintln!("connection closed on a huge header: {e}"),
    }
    assert_eq!(hub.get("/healthz").status, 200, "the hub keeps serving");
}

#[test]
fn one_host_cannot_hold_more_than_four_long_polls() {
    let hub = Hub::start();
    let addr = hub.addr().to_string();
    let waiting: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            thread::spawn(move || {
                http_request(
                    &addr,
                    "GET",
                    "/v1/messages?host=greedy&wait=8",
                    None,
                    Duration::from_secs(30),
                )
            })
        })
        .collect();
    wait_until(TIMEOUT, "the four long-polls wait at the hub", || {
        hub.get("/metrics")
            .text()
            .contains("mesync_long_polls_open 4")
    });
    // The fifth is refused at once, while the four wait; other hosts are not affected.
    hub.get("/v1/messages?host=greedy&wait=1")
        .assert_error(429, "a fifth long-poll");
    let started = Instant::now();
    let other = hub.get("/v1/messages?host=modest&wait=1");
    assert_eq!(other.status, 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    for poll in waiting {
        let r = poll.join().expect("poll thread").expect("long-poll answer");
        assert_eq!(r.status, 200);
    }
    // The slots are given back.
    assert_eq!(hub.get("/v1/messages?host=greedy&wait=0.1").status, 200);
}

#[test]
fn a_slow_client_does_not_hold_up_the_others() {
    let hub = Hub::start();
    // Half a request line, then nothing: a slowloris.
    let mut slow = TcpStream::connect(hub.addr()).expect("connect");
    slow.write_all(b"GET /v1/mess").expect("write");
    let mut idle: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(hub.addr()).expect("connect"))
        .collect();
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(hub.get("/healthz").status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "other clients are served while slow ones hang: {:?}",
        started.elapsed()
    );
    // The slow connection is still open (it is cut only after the header timeout).
    slow.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    assert!(slow.read(&mut buf).is_err(), "no answer to half a request");
    idle.clear();

    // After the header read timeout (30 s) the hub closes it.
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let waited = Instant::now();
    let mut buf = [0u8; 512];
    let closed = loop {
        match slow.read(&mut buf) {
            Ok(0) => break true,
            // A 408 answer before the close is fine too.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    assert!(
        closed,
        "the hub closed the slow connection ({:?} after the check)",
        waited.elapsed()
    );
}

#[test]
fn error_answers_do_not_leak_paths_or_internals() {
    let hub = Hub::start();
    let data_dir = hub.data_dir().display().to_string();
    for (method, path, body) in [
        ("GET", "/nope", None),
        ("POST", "/v1/messages", Some(b"{not json".as_slice())),
        ("POST", "/v1/ack", Some(b"[]".as_slice())),
        ("GET", "/v1/messages?host=../../etc", None),
        ("PUT", "/v1/messages", None),
    ] {
        let r = hub.request(method, path, body);
        assert!(r.status >= 400, "{method} {path}: {}", r.status);
        let text = r.text();
        assert!(
            !text.contains(&data_dir),
            "{method} {path} leaks the data dir: {text}"
        );
        assert!(
            !text.contains("/tmp") && !text.contains("panicked"),
            "{method} {path}: {text}"
        );
        r.assert_error(r.status, path);
    }
}

/// The metrics text, or `None` when the hub turned the connection away.
fn metrics(hub: &Hub) -> Option<String> {
    http_request(hub.addr(), "GET", "/metrics", None, Duration::from_secs(10))
        .ok()
        .map(|r| r.text())
}

/// The value of a metric line `name N` in a metrics text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn connections_past_max_connections_are_closed_at_once_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, "[hub]\nmax_connections = 2\n").expect("config");
    let hub = Hub::start_with(&["--config", &config.to_string_lossy()], &[]);

    // One idle connection, and the metrics request itself, fill both slots.
    let first = TcpStream::connect(hub.addr()).expect("connect");
    wait_until(TIMEOUT, "the idle connection is counted", || {
        metrics(&hub).and_then(|m| metric(&m, "mesync_connections_open")) == Some(2)
    });
    // The second slot frees once the hub has seen the metrics request's connection close;
    // until then a new connection may be turned away, so try until one is held open.
    let mut second = None;
    wait_until(TIMEOUT, "a second idle connection is held open", || {
        let stream = TcpStream::connect(hub.addr()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let held = matches!(
            (&stream).read(&mut [0u8; 1]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        );
        if held {
            second = Some(stream);
        }
        held
    });

    // With both slots held, a new connection is closed without an answer, and at once:
    // not left waiting for the header timeout.
    wait_until(TIMEOUT, "a third connection is closed at once", || {
        let mut probe = TcpStream::connect(hub.addr()).expect("connect");
        probe
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = probe.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = [0u8; 64];
        match probe.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            // Served: a slot was still free (the previous request's not yet given back).
            Ok(_) => false,
        }
    });
    wait_until(TIMEOUT, "the refusal is logged", || {
        hub.logs.contains("connection limit reached")
    });

    // Closing the idle connections gives their slots back.
    drop(first);
    drop(second);
    wait_until(
        TIMEOUT,
        "the hub serves again, and counted the refusal",
        || {
            metrics(&hub)
                .and_then(|m| metric(&m, "mesync_connections_refused_total"))
                .is_some_and(|refused| refused >= 1)
        },
    );
    assert_eq!(hub.get("/healthz").status, 200);
}

#[test]
fn max_connections_of_zero_is_refused_at_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, "[hub]\nmax_connections = 0\n").expect("config");
    let mut cmd = clean_command(dir.path());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config);
    let out = run(cmd, None, TIMEOUT);
    assert_eq!(out.code(), Some(1), "a config error: {}", out.stderr);
    assert!(
        out.stderr
            .contains("[hub] max_connections: must be more than 0"),
        "the error names the key: {}",
        out.stderr
    );
}
