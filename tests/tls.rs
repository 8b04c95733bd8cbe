//! TLS and mutual TLS, for real: certificates made by `mesync tls`, a hub serving HTTPS
//! with rustls, agents speaking to it over hyper-rustls, and a rustls client of the test's
//! own for the attacks (no certificate, another CA's certificate, one host's certificate
//! used for another host's queue).

mod support;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use mesync::tls::ClientFiles;
use serde_json::json;
use support::*;

/// A CA made with the CLI, with client certificates for `hosts`.
struct MiniCa {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl MiniCa {
    fn new(hosts: &[&str]) -> MiniCa {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("tls");
        let ca = MiniCa { _tmp: tmp, dir };
        let out = ca.cli(&["init", "--name", "hub.test"]);
        assert!(out.success(), "tls init: {}", out.stderr);
        assert!(
            out.stdout.contains("tls_cert") && out.stdout.contains("client_ca"),
            "init says what to configure: {}",
            out.stdout
        );
        for host in hosts {
            let out = ca.cli(&["issue", host]);
            assert!(out.success(), "tls issue {host}: {}", out.stderr);
        }
        ca
    }

    fn cli(&self, args: &[&str]) -> Out {
        let mut cmd = clean_command(self.dir.parent().expect("parent"));
        cmd.arg("tls").args(args).arg("--dir").arg(&self.dir);
        run(cmd, None, TIMEOUT)
    }

    fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// What an agent of `host` is given: the CA, and its certificate and key.
    fn client(&self, host: &str) -> ClientFiles {
        ClientFiles {
            ca_file: Some(self.ca_cert()),
            client_cert: Some(self.dir.join(format!("hosts/{host}.crt"))),
            client_key: Some(self.dir.join(format!("hosts/{host}.key"))),
            host_id: None,
        }
    }

    /// Trusts this CA, presents no certificate.
    fn anonymous(&self) -> ClientFiles {
        ClientFiles {
            ca_file: Some(self.ca_cert()),
            ..ClientFiles::default()
        }
    }
}

/// A hub serving HTTPS with `ca`'s certificate; with `mtls`, it asks for client
/// certificates from `ca`.
fn tls_hub(ca: &MiniCa, mtls: bool) -> (Hub, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("hub.toml");
    let mut text = format!(
        "[hub]\ntls_cert = {:?}\ntls_key = {:?}\n",
        ca.dir.join("hub.crt"),
        ca.dir.join("hub.key")
    );
    if mtls {
        text.push_str(&format!("client_ca = {:?}\n", ca.ca_cert()));
    }
    fs::write(&config, text).expect("write hub config");
    let hub = Hub::start_with(&["--config", &config.to_string_lossy()], &[]);
    assert!(
        hub.logs.contains("listening on https://"),
        "{:?}",
        hub.logs.lines()
    );
    assert_eq!(
        hub.logs.contains("open mode"),
        !mtls,
        "without tokens, only a hub that asks for client certificates is not open: {:?}",
        hub.logs.lines()
    );
    (hub, tmp)
}

fn https_url(hub: &Hub) -> String {
    format!("https://localhost:{}", hub.port())
}

/// An agent of `host` configured with `files` (and `extra` config lines).
fn tls_agent(hub: &Hub, host: &str, files: &ClientFiles, extra: &str) -> Agent {
    let agent = Agent::new(&https_url(hub), host);
    let line = |key: &str, path: &Option<PathBuf>| {
        path.as_ref()
            .map(|p| format!("{key} = {:?}\n", p))
            .unwrap_or_default()
    };
    let text = line("ca_file", &files.ca_file)
        + &line("client_cert", &files.client_cert)
        + &line("client_key", &files.client_key)
        + extra;
    fs::write(agent.base().join("config.toml"), text).expect("write agent config");
    agent
}

fn get(hub: &Hub, files: &ClientFiles, path: &str) -> Result<Response, String> {
    https_request(hub.addr(), "localhost", files, "GET", path, &[], None)
}

fn post(hub: &Hub, files: &ClientFiles, path: &str, body: &serde_json::Value) -> Response {
    let body = serde_json::to_vec(body).expect("json");
    https_request(
        hub.addr(),
        "localhost",
        files,
        "POST",
        path,
        &[],
        Some(&body),
    )
    .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

#[test]
fn agents_deliver_over_mutual_tls_with_certificates_from_the_mini_ca() {
    let ca = MiniCa::new(&["web-1", "web-2"]);
    for key in ["ca.key", "hub.key", "hosts/web-1.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(ca.dir.join(key))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key} is private");
    }
    let (hub, _config) = tls_hub(&ca, true);
    let mut web1 = tls_agent(&hub, "web-1", &ca.client("web-1"), "");
    let mut web2 = tls_agent(&hub, "web-2", &ca.client("web-2"), "");
    web1.start();
    web2.start();
    hub.wait_registered(&["web-1", "web-2"]);

    let id = web1.send("tls.hello", r#"{"over":"mtls"}"#, &["--target", "web-2"]);
    wait_until(TIMEOUT, "web-2 receives the message over mTLS", || {
        web2.inbox().iter().any(|m| m["id"] == id.as_str())
    });
    let received = web2.inbox();
    let message = received
        .iter()
        .find(|m| m["id"] == id.as_str())
        .expect("message");
    assert_eq!(
        message["source"], "web-1",
        "the source is the certificate's host"
    );
    wait_until(TIMEOUT, "web-1's outbox drains into sent/", || {
        web1.files("outbox").is_empty() && !web1.files("sent").is_empty()
    });

    // `mesync hosts` speaks TLS too, with the same settings.
    let out = web1.cmd(&["hosts"]);
    assert!(
        out.success() && out.stdout.contains("web-2"),
        "hosts over mTLS: {} {}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn mtls_refuses_callers_without_a_certificate_or_with_another_cas() {
    let ca = MiniCa::new(&["web-1"]);
    let other = MiniCa::new(&["web-1"]);
    let (hub, _config) = tls_hub(&ca, true);

    // No client certificate: the handshake succeeds, so health checks work, and every
    // /v1 call gets a clear 401.
    let health = get(&hub, &ca.anonymous(), "/healthz").expect("healthz without a cert");
    assert_eq!(health.status, 200);
    let r = get(&hub, &ca.anonymous(), "/v1/messages?host=web-1&wait=0").expect("answer");
    r.assert_error(401, "a pull without a client certificate");
    assert!(r.text().contains("client certificate"), "{}", r.text());
    assert_eq!(
        r.header("www-authenticate"),
        None,
        "no Bearer challenge when a certificate is missing"
    );
    let msg = message("tls.test", "web-1", None, "normal", json!({}));
    post(&hub, &ca.anonymous(), "/v1/messages", &msg)
        .assert_error(401, "a send without a client certificate");
    let r = get(&hub, &ca.anonymous(), "/v1/hosts").expect("answer");
    r.assert_error(401, "the registry without a client certificate");

    // A certificate for the same host name from another CA: refused in the handshake.
    let forged = ClientFiles {
        ca_file: Some(ca.ca_cert()),
        ..other.client("web-1")
    };
    let err = get(&hub, &forged, "/v1/messages?host=web-1&wait=0")
        .expect_err("another CA's certificate must not get through");
    assert!(
        err.contains("alert"),
        "the hub ends the handshake with an alert: {err:?}"
    );

    // The hub's own certificate is for servers: it cannot be used as a client's.
    let hub_as_client = ClientFiles {
        ca_file: Some(ca.ca_cert()),
        client_cert: Some(ca.dir.join("hub.crt")),
        client_key: Some(ca.dir.join("hub.key")),
        host_id: None,
    };
    let err =
        get(&hub, &hub_as_client, "/v1/hosts").expect_err("a server certificate as a client's");
    assert!(err.contains("alert"), "{err:?}");

    // A certificate from the right CA whose name is not a host id identifies nobody.
    let odd = sign_client_cert(&ca, "not/a/host");
    let r = get(&hub, &odd, "/v1/messages?host=web-1&wait=0").expect("answer");
    r.assert_error(403, "a certificate that names no valid host");
    assert!(!hub.is_registered("web-1"), "nothing was registered");
}

#[test]
fn a_certificate_for_one_host_cannot_act_as_another() {
    let ca = MiniCa::new(&["web-1", "web-2"]);
    let (hub, _config) = tls_hub(&ca, true);
    let web1 = ca.client("web-1");
    let web2 = ca.client("web-2");
    // Register both.
    for (host, files) in [("web-1", &web1), ("web-2", &web2)] {
        let r = get(&hub, files, &format!("/v1/messages?host={host}&wait=0")).expect("pull");
        assert_eq!(r.status, 200, "{}", r.text());
    }

    get(&hub, &web1, "/v1/messages?host=web-2&wait=0")
        .expect("answer")
        .assert_error(403, "web-1's certificate pulling web-2's queue");
    let ack = json!({"host": "web-2", "ids": [uuid::Uuid::new_v4()]});
    post(&hub, &web1, "/v1/ack", &ack).assert_error(403, "web-1's certificate acking for web-2");

    // A spoofed source is rewritten to the certificate's host.
    let msg = message("tls.spoof", "web-2", Some("web-2"), "normal", json!({}));
    let r = post(&hub, &web1, "/v1/messages", &msg);
    assert_eq!(r.status, 200, "{}", r.text());
    let pulled = get(&hub, &web2, "/v1/messages?host=web-2&wait=0")
        .expect("pull")
        .json();
    let got = pulled["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == msg["id"]).cloned())
        .expect("web-2 gets the message");
    assert_eq!(got["source"], "web-1", "source comes from the certificate");

    // With tokens too, the token and the certificate must name the same host.
    let token = hub.issue_token("web-2");
    let bearer = format!("Bearer {token}");
    let pull_as_web1 = |authorization: Option<&str>| {
        let headers: Vec<(&str, &str)> = authorization
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        https_request(
            hub.addr(),
            "localhost",
            &web1,
            "GET",
            "/v1/messages?host=web-1&wait=0",
            &headers,
            None,
        )
        .expect("answer")
    };
    let r = pull_as_web1(Some(&bearer));
    r.assert_error(403, "web-2's token with web-1's certificate");
    assert!(
        !r.text().contains("web-2"),
        "the answer does not say whose token it is: {}",
        r.text()
    );
    pull_as_web1(Some("Bearer msy_wrong")).assert_error(401, "a wrong token with a certificate");
    assert_eq!(
        pull_as_web1(None).status,
        200,
        "with tokens issued, a certificate alone still identifies its host"
    );
    let own = hub.issue_token("web-1");
    let r = pull_as_web1(Some(&format!("Bearer {own}")));
    assert_eq!(
        r.status,
        200,
        "its own token with its certificate: {}",
        r.text()
    );
}

/// A client certificate for `name`, signed by `ca` without the CLI's checks of the name.
fn sign_client_cert(ca: &MiniCa, name: &str) -> ClientFiles {
    sign_client_cert_until(ca, name, None)
}

/// [`sign_client_cert`], valid until `expires` when given.
fn sign_client_cert_until(
    ca: &MiniCa,
    name: &str,
    expires: Option<time::OffsetDateTime>,
) -> ClientFiles {
    let ca_pem = fs::read_to_string(ca.ca_cert()).expect("ca.crt");
    let ca_key =
        rcgen::KeyPair::from_pem(&fs::read_to_string(ca.dir.join("ca.key")).expect("ca.key"))
            .expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    if let Some(expires) = expires {
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = expires;
    }
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let cert_path = ca.dir.join("odd.crt");
    let key_path = ca.dir.join("odd.key");
    fs::write(&cert_path, cert.pem()).expect("write cert");
    fs::write(&key_path, key.serialize_pem()).expect("write key");
    ClientFiles {
        ca_file: Some(ca.ca_cert()),
        client_cert: Some(cert_path),
        client_key: Some(key_path),
        host_id: None,
    }
}

#[test]
fn a_connection_closes_when_its_client_certificate_expires() {
    let ca = MiniCa::new(&[]);
    let (hub, _config) = tls_hub(&ca, true);
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(4);
    let files = sign_client_cert_until(&ca, "web-1", Some(expires));
    let mut agent = tls_agent(&hub, "web-1", &files, "");
    agent.start();
    hub.wait_registered(&["web-1"]);
    wait_until(TIMEOUT, "the hub closes the connection at expiry", || {
        hub.logs
            .contains("client certificate expired; connection closed")
    });
    // Refused in the handshake, or (within the certificate's last second, which the
    // handshake still accepts) closed or reset before any answer; never served.
    let err = get(&hub, &files, "/v1/messages?host=web-1&wait=0")
        .expect_err("an expired certificate gets no answer");
    assert!(!err.contains("refused"), "the hub is up: {err:?}");
    assert_eq!(
        get(&hub, &ca.anonymous(), "/healthz").map(|r| r.status),
        Ok(200),
        "the hub serves others"
    );
}

#[test]
fn a_new_client_ca_cuts_off_connected_hosts_it_no_longer_trusts() {
    let ca = MiniCa::new(&["web-1"]);
    let other = MiniCa::new(&["web-2"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let client_ca = tmp.path().join("client-ca.crt");
    fs::copy(ca.ca_cert(), &client_ca).expect("copy the CA");
    let config = tmp.path().join("hub.toml");
    fs::write(
        &config,
        format!(
            "[hub]\ntls_cert = {:?}\ntls_key = {:?}\nclient_ca = {:?}\n",
            ca.dir.join("hub.crt"),
            ca.dir.join("hub.key"),
            client_ca
        ),
    )
    .expect("write hub config");
    let hub = Hub::start_with(&["--config", &config.to_string_lossy()], &[]);
    let mut web1 = tls_agent(&hub, "web-1", &ca.client("web-1"), "");
    web1.start();
    hub.wait_registered(&["web-1"]);

    // web-1's long-poll is open. The operator now trusts only the other CA.
    fs::copy(other.ca_cert(), &client_ca).expect("switch the client CA");
    let mark = hub.logs.len();
    let web1_mark = web1.logs.len();
    hangup(hub.pid().expect("hub pid"));
    wait_until(TIMEOUT, "the hub cuts web-1's connection", || {
        hub.logs.lines()[mark..]
            .iter()
            .any(|l| l.contains("no longer trusted after a reload"))
    });
    let web2 = ClientFiles {
        ca_file: Some(ca.ca_cert()),
        ..other.client("web-2")
    };
    let msg = message("tls.cut", "web-2", Some("web-1"), "normal", json!({}));
    let r = post(&hub, &web2, "/v1/messages", &msg);
    assert_eq!(r.status, 200, "a host of the new CA sends: {}", r.text());
    wait_until(TIMEOUT, "web-1 is refused when it reconnects", || {
        web1.logs.lines()[web1_mark..]
            .iter()
            .any(|l| l.contains("cannot pull from the hub"))
    });
    assert!(web1.inbox().is_empty(), "nothing reaches the host shut out");
    assert_eq!(
        hub.queue_ids("web-1").len(),
        1,
        "the message waits at the hub"
    );
}

#[test]
fn an_agent_trusting_another_ca_sends_nothing_and_keeps_its_message() {
    let ca = MiniCa::new(&["web-1"]);
    let other = MiniCa::new(&["web-1"]);
    let (hub, _config) = tls_hub(&ca, false);
    // The agent's ca_file is a path of its own, which the operator will fix in place.
    let trusted = tempfile::tempdir().expect("tempdir");
    let ca_file = trusted.path().join("ca.crt");
    fs::copy(other.ca_cert(), &ca_file).expect("copy the wrong CA");
    let files = ClientFiles {
        ca_file: Some(ca_file.clone()),
        ..ClientFiles::default()
    };
    let mut agent = tls_agent(&hub, "web-1", &files, "");
    agent.start();
    agent.send("tls.kept", "{}", &[]);
    wait_until(
        TIMEOUT,
        "the agent reports the untrusted certificate",
        || {
            agent
                .logs
                .lines()
                .iter()
                .any(|l| l.contains("invalid peer certificate: UnknownIssuer"))
        },
    );
    assert_eq!(
        agent.files("outbox").len(),
        1,
        "the message waits in outbox/"
    );
    assert!(
        agent.files("failed").is_empty(),
        "a TLS failure is transient"
    );
    assert!(agent.files("sent").is_empty());
    assert!(!hub.is_registered("web-1"), "the hub saw no request");

    // The operator puts the right CA at the same path and reloads: the message goes,
    // without a restart.
    fs::copy(ca.ca_cert(), &ca_file).expect("fix the CA file");
    hangup(agent.pid().expect("agent pid"));
    wait_until(
        LONG_TIMEOUT,
        "the message is sent once the CA is trusted",
        || agent.files("outbox").is_empty() && agent.files("sent").len() == 1,
    );
    assert!(hub.is_registered("web-1"));

    // A reload with a certificate file that cannot be read keeps the working settings.
    fs::write(
        agent.base().join("config.toml"),
        "ca_file = \"/nonexistent/ca.crt\"\n",
    )
    .expect("break the agent config");
    let mark = agent.logs.len();
    hangup(agent.pid().expect("agent pid"));
    wait_until(TIMEOUT, "the agent refuses the broken settings", || {
        agent.logs.lines()[mark..]
            .iter()
            .any(|l| l.contains("keeping the ones in use") && l.contains("/nonexistent/ca.crt"))
    });
    agent.send("tls.after", "{}", &[]);
    wait_until(TIMEOUT, "still sending with the settings in use", || {
        agent.files("outbox").is_empty() && agent.files("sent").len() == 2
    });
}

#[test]
fn tls_with_tokens_and_no_client_certificates() {
    let ca = MiniCa::new(&[]);
    let (hub, _config) = tls_hub(&ca, false);
    let token = hub.issue_token("db-1");
    let token2 = hub.issue_token("db-2");

    let mut db1 = tls_agent(
        &hub,
        "db-1",
        &ca.anonymous(),
        &format!("token = {:?}\n", token),
    );
    let mut db2 = tls_agent(
        &hub,
        "db-2",
        &ca.anonymous(),
        &format!("token = {:?}\n", token2),
    );
    db1.start();
    db2.start();
    hub.wait_registered(&["db-1", "db-2"]);
    let id = db1.send("tls.token", "{}", &["--target", "db-2"]);
    wait_until(TIMEOUT, "db-2 receives over TLS with tokens", || {
        db2.inbox().iter().any(|m| m["id"] == id.as_str())
    });

    // A plain-HTTP request to the TLS port is not served.
    let plain = http_request(hub.addr(), "GET", "/healthz", None, TIMEOUT);
    assert!(
        plain.map_or(true, |r| r.status != 200),
        "plain HTTP on the TLS port must not be answered as HTTP"
    );
}

#[test]
fn the_hub_speaks_tls_1_2_and_1_3_and_nothing_older() {
    let ca = MiniCa::new(&[]);
    let (hub, _config) = tls_hub(&ca, false);
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut roots = rustls::RootCertStore::empty();
        for cert in mesync::tls::load_certs(&ca.ca_cert()).expect("ca") {
            roots.add(cert).expect("root");
        }
        let config = rustls::ClientConfig::builder_with_provider(
            rustls::crypto::ring::default_provider().into(),
        )
        .with_protocol_versions(&[version])
        .expect("version")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let r = https_request_with_config(
            hub.addr(),
            "localhost",
            config,
            "GET",
            "/healthz",
            &[],
            None,
        )
        .unwrap_or_else(|e| panic!("{version:?}: {e}"));
        assert_eq!(r.status, 200, "{version:?}");
    }
    // TLS 1.1 and older, with openssl's client where it is installed.
    if !on_path("openssl") {
        return unavailable(
            "tls 1.1 refusal",
            "openssl (Debian package openssl) is not installed",
        );
    }
    let handshake = |version: &str| {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", hub.addr(), version, "-CAfile"])
            .arg(ca.ca_cert())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run openssl");
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let tls12 = handshake("-tls1_2");
    assert!(
        tls12.contains("TLSv1.2, Cipher is ECDHE"),
        "openssl speaks TLS 1.2 with the hub: {tls12}"
    );
    for old in ["-tls1_1", "-tls1"] {
        // Refused by the hub (an alert it sent), not merely unable to finish.
        let text = handshake(old);
        assert!(
            text.contains("Cipher is (NONE)") && text.contains("SSL alert number"),
            "{old} must be refused by the hub: {text}"
        );
    }
}

#[test]
fn sighup_loads_a_renewed_certificate_and_keeps_the_old_one_if_the_new_is_broken() {
    let ca = MiniCa::new(&[]);
    let (mut hub, config_dir) = tls_hub(&ca, false);
    let files = ca.anonymous();
    let renewed = "renewed.test";
    assert!(
        https_request(hub.addr(), renewed, &files, "GET", "/healthz", &[], None).is_err(),
        "the first certificate does not name {renewed}"
    );
    let out = ca.cli(&["server", "--name", renewed]);
    assert!(out.success(), "tls server: {}", out.stderr);
    let pid = hub.pid().expect("hub pid");
    hangup(pid);
    wait_until(TIMEOUT, "the renewed certificate is served", || {
        https_request(hub.addr(), renewed, &files, "GET", "/healthz", &[], None)
            .is_ok_and(|r| r.status == 200)
    });

    // A broken key on reload: logged, and the certificate in use stays.
    fs::write(ca.dir.join("hub.key"), "not a key").expect("break the key");
    let mark = hub.logs.len();
    hangup(pid);
    wait_until(
        TIMEOUT,
        "the hub says the TLS files were not reloaded",
        || {
            hub.logs.lines()[mark..]
                .iter()
                .any(|l| l.contains("TLS files not reloaded"))
        },
    );
    let r = https_request(hub.addr(), renewed, &files, "GET", "/healthz", &[], None)
        .expect("still served with the renewed certificate");
    assert_eq!(r.status, 200);
    assert!(hub.is_running());

    // Asking for client certificates cannot start on a reload: connections identified
    // without them would keep that identity.
    let config = config_dir.path().join("hub.toml");
    let text = fs::read_to_string(&config).expect("hub config");
    fs::write(
        &config,
        text.replace(
            "[hub]\n",
            &format!("[hub]\nclient_ca = {:?}\n", ca.ca_cert()),
        ),
    )
    .expect("add client_ca");
    let mark = hub.logs.len();
    hangup(pid);
    wait_until(
        TIMEOUT,
        "the hub refuses to turn client certificates on",
        || {
            hub.logs.lines()[mark..]
                .iter()
                .any(|l| l.contains("client_ca was added or removed"))
        },
    );
    let r = https_request(hub.addr(), renewed, &files, "GET", "/v1/hosts", &[], None)
        .expect("still served without a client certificate");
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn tls_settings_that_cannot_work_stop_the_hub_with_a_clear_error() {
    let ca = MiniCa::new(&[]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            format!("[hub]\ntls_cert = {:?}\n", ca.dir.join("hub.crt")),
            "must be set together",
        ),
        (
            format!("[hub]\nclient_ca = {:?}\n", ca.ca_cert()),
            "client_ca needs tls_cert",
        ),
        (
            format!(
                "[hub]\ntls_cert = {:?}\ntls_key = {:?}\n",
                ca.dir.join("hub.crt"),
                tmp.path().join("missing.key")
            ),
            "missing.key",
        ),
        (
            format!(
                "[hub]\ntls_cert = {:?}\ntls_key = {:?}\n",
                ca.dir.join("hub.crt"),
                ca.dir.join("ca.key")
            ),
            "hub.crt",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let config = tmp.path().join(format!("hub{i}.toml"));
        fs::write(&config, text).expect("write config");
        let mut cmd = clean_command(tmp.path());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path().join("data"))
            .arg("--config")
            .arg(&config);
        let out = run(cmd, None, TIMEOUT);
        assert_eq!(out.code(), Some(1), "{text}: {}", out.stderr);
        assert!(
            out.stderr.contains(expected),
            "{text}: the error names {expected:?}: {}",
            out.stderr
        );
    }
    // An agent whose client certificate names another host refuses to start.
    let agent = Agent::new("https://localhost:1", "web-9");
    fs::write(
        agent.base().join("config.toml"),
        format!(
            "ca_file = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n",
            ca.ca_cert(),
            ca.dir.join("hub.crt"),
            ca.dir.join("hub.key")
        ),
    )
    .expect("write agent config");
    let out = agent.cmd(&["start"]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("but this host is web-9"),
        "{}",
        out.stderr
    );

    // An agent with https:// and a missing ca_file says so.
    let agent = Agent::new("https://localhost:1", "web-9");
    fs::write(
        agent.base().join("config.toml"),
        format!("ca_file = {:?}\n", tmp.path().join("nope.crt")),
    )
    .expect("write agent config");
    let out = agent.cmd(&["start"]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("nope.crt"), "{}", out.stderr);
}

#[test]
fn clients_that_stall_the_handshake_are_cut_off_and_do_not_hold_up_others() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    let ca = MiniCa::new(&["web-1"]);
    let (hub, _config) = tls_hub(&ca, true);
    // Connections that never start a handshake, and one that stops half-way through a
    // ClientHello.
    let mut stalled: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(hub.addr()).expect("connect"))
        .collect();
    let mut half = TcpStream::connect(hub.addr()).expect("connect");
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .expect("write");
    stalled.push(half);
    for _ in 0..10 {
        let r = get(&hub, &ca.client("web-1"), "/v1/messages?host=web-1&wait=0")
            .expect("served while others stall");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // The stalled ones are closed by the hub after its handshake timeout (10 s).
    let started = Instant::now();
    for conn in &mut stalled {
        let left = TIMEOUT.saturating_sub(started.elapsed());
        conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        let mut buf = [0u8; 64];
        let closed = loop {
            match conn.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue, // a TLS alert before the close
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        assert!(closed, "a stalled handshake is cut off within {TIMEOUT:?}");
    }
}
