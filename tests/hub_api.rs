//! The hub's HTTP API, spoken to directly.

mod support;

use serde_json::{Value, json};
use std::thread;
use std::time::{Duration, Instant};
use support::*;

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn hub_refuses_garbage_and_keeps_serving() {
    let hub = Hub::start();

    hub.request("POST", "/v1/messages", Some(b"this is not json"))
        .assert_error(400, "non-JSON body");
    hub.request("POST", "/v1/messages", Some(b"{\"type\": \"a\", \"payl"))
        .assert_error(400, "truncated JSON");
    hub.request("POST", "/v1/messages", Some(b"[1, 2, 3]"))
        .assert_error(400, "a JSON array");
    hub.post("/v1/messages", &json!({}))
        .assert_error(400, "an empty object");
    let mut bad_type = message("ok.type", "tester", None, "normal", json!({}));
    bad_type["type"] = json!("../etc");
    hub.post("/v1/messages", &bad_type)
        .assert_error(400, "invalid type");
    let mut bad_target = message("ok.type", "tester", None, "normal", json!({}));
    bad_target["target"] = json!("../../root");
    hub.post("/v1/messages", &bad_target)
        .assert_error(400, "invalid target");
    let mut bad_priority = message("ok.type", "tester", None, "normal", json!({}));
    bad_priority["priority"] = json!("urgent");
    hub.post("/v1/messages", &bad_priority)
        .assert_error(400, "invalid priority");
    hub.request("POST", "/v1/ack", Some(b"nope"))
        .assert_error(400, "ack with a non-JSON body");
    hub.get("/v1/messages?host=../etc&wait=0")
        .assert_error(400, "pull for an invalid host id");

    let r = hub.get("/v1/no-such-thing");
    r.assert_error(404, "unknown path");
    let r = hub.request("PUT", "/v1/messages", Some(b"{}"));
    assert!(
        r.status == 405 || r.status == 404,
        "wrong method: {} {}",
        r.status,
        r.text()
    );
    r.assert_error(r.status, "wrong method");

    // 2 MiB, over the default 1 MiB limit.
    let big = message(
        "big.one",
        "tester",
        None,
        "normal",
        json!("x".repeat(2 * 1024 * 1024)),
    );
    let r = hub.post("/v1/messages", &big);
    r.assert_error(413, "a 2 MiB message");
    let queues = hub.data_dir().join("queues");
    for host in list_dir(&queues) {
        assert!(
            hub.queue_files(&host).is_empty(),
            "refused requests queued something for {host}: {:?}",
            hub.queue_files(&host)
        );
    }

    // Still serving.
    let ok = message(
        "ok.type",
        "tester",
        Some("someone"),
        "normal",
        json!({"fine": true}),
    );
    hub.post_message(&ok);
    let r = hub.get("/healthz");
    assert_eq!(r.status, 200, "healthz: {}", r.text());
    assert_eq!(r.json()["status"], "ok");
}

#[test]
fn same_id_posted_twice_is_a_duplicate_with_no_second_fan_out() {
    let hub = Hub::start();
    // Two registered hosts, by first contact.
    for host in ["one", "two"] {
        let r = hub.get(&format!("/v1/messages?host={host}&wait=0"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    hub.wait_registered(&["one", "two"]);

    for target in [None, Some("one")] {
        let msg = message("dup.test", "tester", target, "normal", json!({"t": target}));
        let id = id_of(&msg);
        let first = hub.post("/v1/messages", &msg);
        assert_eq!(first.status, 200, "{}", first.text());
        let first = first.json();
        assert_eq!(
            ids(&first["accepted"]),
            vec![id.clone()],
            "first POST: {first}"
        );
        assert!(ids(&first["duplicates"]).is_empty(), "first POST: {first}");

        let second = hub.post("/v1/messages", &msg);
        assert_eq!(second.status, 200, "{}", second.text());
        let second = second.json();
        assert_eq!(
            ids(&second["duplicates"]),
            vec![id.clone()],
            "second POST: {second}"
        );
        assert!(ids(&second["accepted"]).is_empty(), "second POST: {second}");

        let recipients: &[&str] = if target.is_some() {
            &["one"]
        } else {
            &["one", "two"]
        };
        for host in recipients {
            let n = hub.queue_ids(host).iter().filter(|i| **i == id).count();
            assert_eq!(n, 1, "copies of {id} queued for {host}");
        }
    }
    assert!(
        hub.queue_ids("tester").is_empty(),
        "the sender gets nothing"
    );
}

#[test]
fn batch_judges_each_message_on_its_own() {
    let hub = Hub::start();
    let good1 = message("batch.test", "tester", Some("rx"), "normal", json!(1));
    let good2 = message("batch.test", "tester", Some("rx"), "high", json!(2));
    let mut bad = message("batch.test", "tester", Some("rx"), "normal", json!(3));
    bad["type"] = json!("no/slashes");
    let r = hub.post(
        "/v1/messages",
        &json!({"messages": [good1.clone(), bad.clone(), good2.clone()]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let mut accepted = ids(&body["accepted"]);
    accepted.sort();
    let mut want = vec![id_of(&good1), id_of(&good2)];
    want.sort();
    assert_eq!(accepted, want, "accepted: {body}");
    let rejected = body["rejected"].as_array().expect("rejected list");
    assert_eq!(rejected.len(), 1, "rejected: {body}");
    assert_eq!(rejected[0]["id"], bad["id"]);
    assert_eq!(rejected[0]["status"], 400);
    assert!(rejected[0]["error"].as_str().is_some_and(|e| !e.is_empty()));
    // Delivery order: the high one first.
    assert_eq!(hub.queue_ids("rx"), vec![id_of(&good2), id_of(&good1)]);
}

#[test]
fn long_poll_returns_as_soon_as_a_message_arrives_and_ack_removes_it() {
    let hub = Hub::start();
    let addr = hub.addr().to_string();
    let poller = thread::spawn(move || {
        http_request(
            &addr,
            "GET",
            "/v1/messages?host=lp-host&wait=10",
            None,
            Duration::from_secs(60),
        )
    });
    // The long-poll is the host's first contact.
    hub.wait_registered(&["lp-host"]);

    let msg = message(
        "lp.test",
        "tester",
        Some("lp-host"),
        "normal",
        json!({"x": 1}),
    );
    let id = id_of(&msg);
    let posted = Instant::now();
    hub.post_message(&msg);
    let r = poller
        .join()
        .expect("poller thread")
        .expect("long-poll request");
    let waited = posted.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    let got = r.json();
    let messages = got["messages"].as_array().expect("messages array");
    assert_eq!(messages.len(), 1, "long-poll answer: {got}");
    for key in [
        "id",
        "type",
        "source",
        "target",
        "priority",
        "created_at",
        "payload",
    ] {
        assert_eq!(messages[0][key], msg[key], "{key} of the pulled message");
    }
    assert!(
        waited < Duration::from_secs(8),
        "the long-poll answered {waited:?} after the POST: it did not wake up"
    );

    // Pulled but not acked: still pending, named <P>-<seq>-<uuid>.json.
    let files = hub.queue_files("lp-host");
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with("1-") && files[0].ends_with(&format!("-{id}.json")),
        "queue file name {:?}",
        files[0]
    );

    let r = hub.post("/v1/ack", &json!({"host": "lp-host", "ids": [id]}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["acked"], 1);
    assert!(
        hub.queue_files("lp-host").is_empty(),
        "ack removes it from queues/"
    );

    // Nothing left: an immediate, empty answer.
    let started = Instant::now();
    let r = hub.get("/v1/messages?host=lp-host&wait=0");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["messages"], json!([]));
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[test]
fn pull_honours_max_and_delivery_order() {
    let hub = Hub::start();
    let t0 = chrono::Utc::now() - chrono::Duration::seconds(30);
    let low = message_at("m.t", "tester", Some("rx"), "low", json!(0), t0);
    let normal = message_at("m.t", "tester", Some("rx"), "normal", json!(1), t0);
    let high = message_at("m.t", "tester", Some("rx"), "high", json!(2), t0);
    for m in [&low, &normal, &high] {
        hub.post_message(m);
    }
    let r = hub.get("/v1/messages?host=rx&wait=0&max=2");
    assert_eq!(r.status, 200, "{}", r.text());
    let got: Vec<String> = r.json()["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(got, vec![id_of(&high), id_of(&normal)]);
}

#[test]
fn hosts_registry_and_removal() {
    let hub = Hub::start();
    let r = hub.get("/v1/messages?host=old-box&wait=0");
    assert_eq!(r.status, 200);
    hub.post_message(&message(
        "h.t",
        "tester",
        Some("old-box"),
        "normal",
        json!({}),
    ));
    hub.post_message(&message(
        "h.t",
        "tester",
        Some("old-box"),
        "normal",
        json!({}),
    ));

    let r = hub.get("/v1/hosts");
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let hosts = body["hosts"].as_array().expect("hosts array");
    let old = hosts
        .iter()
        .find(|h| h["host"] == "old-box")
        .unwrap_or_else(|| panic!("old-box registered: {body}"));
    assert_eq!(old["pending"], 2, "{old}");
    for key in ["registered_at", "last_seen", "oldest_pending_secs"] {
        assert!(old.get(key).is_some(), "{key} in {old}");
    }

    let r = hub.request("DELETE", "/v1/hosts/old-box", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"removed": "old-box", "dropped": 2}));
    assert!(hub.queue_files("old-box").is_empty());
    let body = hub.get("/v1/hosts").json();
    assert!(
        !body["hosts"]
            .as_array()
            .expect("hosts array")
            .iter()
            .any(|h| h["host"] == "old-box"),
        "{body}"
    );

    let r = hub.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("accepted"), "metrics:\n{}", r.text());
}

#[test]
fn hub_survives_dropped_and_half_written_requests() {
    use std::io::Write;
    use std::net::TcpStream;

    let hub = Hub::start();
    // The host registers first: a request whose client is gone before the hub reads it may
    // never be served at all, so the abandoned long-poll below cannot be relied on for that.
    assert_eq!(hub.get("/v1/messages?host=quitter&wait=0").status, 200);
    // Headers cut off, a body shorter than announced, an abandoned long-poll.
    let partial: [&[u8]; 3] = [
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Le",
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"type\":",
        b"GET /v1/messages?host=quitter&wait=30 HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for bytes in partial {
        let mut s = TcpStream::connect(hub.addr()).expect("connect");
        s.write_all(bytes).expect("write");
        s.flush().expect("flush");
        drop(s);
    }
    // A flood of connections opened and closed at once.
    for _ in 0..50 {
        drop(TcpStream::connect(hub.addr()).expect("connect"));
    }
    hub.wait_registered(&["quitter"]);

    // The abandoned long-poll took nothing away: the message waits for the next pull.
    let msg = message("drop.test", "tester", Some("quitter"), "normal", json!({}));
    hub.post_message(&msg);
    let r = hub.get("/v1/messages?host=quitter&wait=5");
    assert_eq!(r.status, 200, "{}", r.text());
    let got = r.json();
    assert_eq!(got["messages"][0]["id"], msg["id"], "{got}");
    let r = hub.get("/healthz");
    assert_eq!(r.status, 200, "healthz: {}", r.text());
}
