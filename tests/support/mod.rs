//! Harness for the mesync integration tests.
//!
//! Every hub and agent is the real `mesync` binary run as a child process, each in its own
//! temporary directory, on loopback. Every child is killed when its owner is dropped, and
//! when a test panics the owner prints the child's log first, so a failure shows what the
//! processes said.
//!
//! Nothing here sleeps to make an assertion: tests wait for a condition with [`wait_until`]
//! under a deadline that is only ever reached when the behaviour is missing.

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

pub mod mounts;
mod notify;
#[allow(unused_imports)]
pub use notify::{Notifications, find, find_in};

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mesync");

/// Deadline for anything that should happen "at once"; only reached on failure.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Deadline for things that go through the agent's retry backoff (capped at 30 s).
pub const LONG_TIMEOUT: Duration = Duration::from_secs(60);

/// How often [`wait_until`] looks.
const POLL: Duration = Duration::from_millis(20);

/// The directories an agent keeps under its base dir.
pub const AGENT_DIRS: [&str; 6] = ["outbox", "inbox", "sent", "failed", "hooks", "state"];

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// Polls `cond` every 20 ms until it holds; panics naming `what` once `timeout` has passed.
/// The logs of the processes involved are printed by their owners' `Drop` on the way out.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    // Bounded in count as well as in time, in case the clock misbehaves.
    let max_rounds = timeout.as_millis() / POLL.as_millis() + 1000;
    let mut rounds = 0u128;
    loop {
        if cond() {
            return;
        }
        rounds += 1;
        if start.elapsed() >= timeout || rounds > max_rounds {
            panic!(
                "timed out after {:.1?} waiting for: {what} (process logs follow)",
                start.elapsed()
            );
        }
        thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------
// Logs of a child process
// ---------------------------------------------------------------------------------------

/// The lines a child wrote on stdout and stderr, kept in memory (ANSI colours removed).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<String>>>);

impl Logs {
    fn push(&self, line: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }

    /// Prints the last lines to stderr (captured by the test runner and shown on failure).
    pub fn dump(&self, name: &str) {
        const MAX: usize = 400;
        let lines = self.lines();
        let skip = lines.len().saturating_sub(MAX);
        eprintln!("----- log of {name} ({} lines) -----", lines.len());
        if skip > 0 {
            eprintln!("[... {skip} earlier lines left out ...]");
        }
        for l in &lines[skip..] {
            eprintln!("{name}| {l}");
        }
        eprintln!("----- end of log of {name} -----");
    }

    /// Reads `stream` line by line in a background thread until it closes.
    fn capture<R: Read + Send + 'static>(&self, stream: R, tag: &'static str) {
        let logs = self.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = strip_ansi(String::from_utf8_lossy(&buf).trim_end());
                        logs.push(format!("{tag}{line}"));
                    }
                }
            }
        });
    }

    /// The address in the first `listening on http://ADDR` line at or after line `from`.
    fn listen_addr(&self, from: usize) -> Option<String> {
        const MARK: &str = "listening on http";
        let lines = self.lines();
        lines.iter().skip(from).find_map(|l| {
            let rest = &l[l.find(MARK)? + MARK.len()..];
            let rest = rest.strip_prefix("s").unwrap_or(rest).strip_prefix("://")?;
            let addr: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || ".:[]-_".contains(*c))
                .collect();
            (!addr.is_empty()).then_some(addr)
        })
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Outside tools and privileges
// ---------------------------------------------------------------------------------------

/// Says why a test cannot run here (a missing tool, no root): a skip, printed, or a failure
/// under `MESYNC_REQUIRE_TOOLS=1`, which CI sets.
pub fn unavailable(test: &str, why: &str) {
    if std::env::var("MESYNC_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{test}: {why}, and MESYNC_REQUIRE_TOOLS=1 requires it");
    }
    eprintln!("SKIPPED {test}: {why}; set MESYNC_REQUIRE_TOOLS=1 to make this a failure");
}

/// True when `name` is an executable on PATH.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(name).is_file()))
}

/// SIGHUP to a process, as `systemctl reload` sends it.
pub fn hangup(pid: u32) {
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success(), "kill -HUP {pid}");
}

// ---------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------

/// A `mesync` command with nothing inherited that could change its behaviour.
pub fn clean_command(home: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    mesync::service::clear_inherited_settings(&mut cmd);
    cmd.env("HOME", home).env("NO_COLOR", "1");
    // Lets a developer turn on debug logs for a failing test: MESYNC_TEST_RUST_LOG=debug.
    if let Ok(filter) = std::env::var("MESYNC_TEST_RUST_LOG") {
        cmd.env("RUST_LOG", filter);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// What a finished command did.
#[derive(Debug)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics, with everything the command printed, unless it exited 0.
    pub fn ok(self, what: &str) -> Out {
        assert!(
            self.success(),
            "{what}: expected exit 0, got {:?}\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// The non-empty stdout lines parsed as JSON (JSON Lines).
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l:?}"))
            })
            .collect()
    }
}

/// Runs `cmd` to completion with `stdin` as its input; kills it and panics after `timeout`.
pub fn run(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Out {
    let desc = format!("{cmd:?}");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let input = input.to_vec();
        // A child that does not read its stdin must not block us.
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let mut so = child.stdout.take().expect("stdout pipe");
    let mut se = child.stderr.take().expect("stderr pipe");
    let out_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "command still running after {timeout:?}, killed: {desc}\nstderr: {}",
                String::from_utf8_lossy(&stderr)
            );
        }
        thread::sleep(POLL);
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Out {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: strip_ansi(&String::from_utf8_lossy(&stderr)),
    }
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `signal` (a name for kill(1): TERM, INT, ...) and waits up to `grace` for the
/// exit; then SIGKILL, and `None`.
fn signal_and_wait(child: &mut Child, signal: &str, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        thread::sleep(POLL);
    }
    kill_and_reap(child);
    None
}

/// A child process that is killed when this is dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        kill_and_reap(&mut self.0);
    }
}

/// The pids of the processes whose command line is exactly `cmdline`.
pub fn pids_with_cmdline(cmdline: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = cmdline
        .iter()
        .flat_map(|a| a.bytes().chain(std::iter::once(0)))
        .collect();
    list_dir(Path::new("/proc"))
        .iter()
        .filter_map(|n| n.parse::<u32>().ok())
        .filter(|pid| fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

/// SIGKILLs the processes whose command line is exactly `cmdline` (leftovers of a test).
pub fn kill_processes_with_cmdline(cmdline: &[&str]) {
    for pid in pids_with_cmdline(cmdline) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Kills, when dropped, whatever still runs with this exact command line (such as what a
/// hook started, which lives in its own process group).
pub struct KillByCmdline(pub Vec<String>);

impl Drop for KillByCmdline {
    fn drop(&mut self) {
        let args: Vec<&str> = self.0.iter().map(String::as_str).collect();
        kill_processes_with_cmdline(&args);
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// The machine's hostname, as the kernel has it.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("read /proc/sys/kernel/hostname")
        .trim()
        .to_string()
}

// ---------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------

/// Writes `name` in `dir` the way a careful script does: a dot-file, then a rename.
pub fn write_atomic(dir: &Path, name: &str, contents: &[u8]) {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    fs::write(&tmp, contents).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, dir.join(name))
        .unwrap_or_else(|e| panic!("rename into {}: {e}", dir.display()));
}

/// The names in `dir` that do not start with a dot, sorted; empty if `dir` is missing.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// Every name in `dir`, dot-files included.
pub fn list_dir_all(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// The `*.json` message files of `dir` that parse, with their names, sorted by name.
/// A file that vanished or does not parse is left out.
pub fn read_messages(dir: &Path) -> Vec<(String, Value)> {
    list_dir(dir)
        .into_iter()
        .filter(|n| n.ends_with(".json"))
        .filter_map(|n| {
            let text = fs::read(dir.join(&n)).ok()?;
            let v: Value = serde_json::from_slice(&text).ok()?;
            Some((n, v))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------

/// RFC 3339 UTC with microseconds, as mesync writes it.
pub fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

/// A complete message with a fresh id, created now.
pub fn message(
    ty: &str,
    source: &str,
    target: Option<&str>,
    priority: &str,
    payload: Value,
) -> Value {
    message_at(ty, source, target, priority, payload, chrono::Utc::now())
}

/// A complete message with a fresh id, created at `at`.
pub fn message_at(
    ty: &str,
    source: &str,
    target: Option<&str>,
    priority: &str,
    payload: Value,
    at: chrono::DateTime<chrono::Utc>,
) -> Value {
    json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "type": ty,
        "source": source,
        "target": target,
        "priority": priority,
        "created_at": rfc3339(at),
        "payload": payload,
    })
}

/// `YYYYMMDDTHHmmss_<uuid>.json` from the message's `created_at` in UTC.
pub fn file_name_for(msg: &Value) -> String {
    let created = msg["created_at"].as_str().expect("created_at is a string");
    let t = chrono::DateTime::parse_from_rfc3339(created)
        .unwrap_or_else(|e| panic!("created_at {created:?} is not RFC 3339: {e}"))
        .with_timezone(&chrono::Utc);
    format!(
        "{}_{}.json",
        t.format("%Y%m%dT%H%M%S"),
        msg["id"].as_str().expect("id is a string")
    )
}

pub fn id_of(msg: &Value) -> String {
    msg["id"]
        .as_str()
        .expect("message has a string id")
        .to_string()
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// An HTTP answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Panics unless the status is `status` and the body is `{"error": "<non-empty>"}`.
    pub fn assert_error(&self, status: u16, what: &str) {
        assert_eq!(self.status, status, "{what}: body {:?}", self.text());
        let body = self.json();
        let err = body["error"].as_str().unwrap_or_default();
        assert!(
            !err.is_empty(),
            "{what}: error body must be {{\"error\": \"...\"}}, got {body}"
        );
    }
}

/// One HTTP/1.1 request with `Connection: close`; the body is written by a second thread
/// while this one reads, so an early answer (such as a 413) is read even when the server
/// stops reading the body.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<Response> {
    http_request_with(addr, method, path, &[], body, timeout)
}

/// [`http_request`] with extra request headers.
pub fn http_request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<Response> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let data = request_bytes(addr, method, path, headers, body);

    let mut writer_stream = stream.try_clone()?;
    let writer = thread::spawn(move || {
        let _ = writer_stream.write_all(&data);
        let _ = writer_stream.flush();
    });

    let mut reader = stream.try_clone()?;
    let (buf, read_error) = read_response(&mut reader);
    let _ = stream.shutdown(Shutdown::Both);
    let _ = writer.join();
    match parse_response(&buf) {
        Some(r) => Ok(r),
        None => Err(read_error.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "incomplete HTTP response: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            )
        })),
    }
}

/// An HTTP/1.1 request with `Connection: close`.
fn request_bytes(
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    match body {
        Some(b) => request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        )),
        None if method != "GET" && method != "HEAD" => request.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    request.push_str("\r\n");
    let mut data = request.into_bytes();
    data.extend_from_slice(body.unwrap_or_default());
    data
}

/// One HTTPS request to `addr`, checking the hub's certificate against `server_name` and
/// the CAs of `files` (and presenting its client certificate, if any), with rustls as the
/// agent uses it. `Err` carries the TLS or I/O error as text.
pub fn https_request(
    addr: &str,
    server_name: &str,
    files: &mesync::tls::ClientFiles,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, String> {
    let config = mesync::tls::client_config(files).map_err(|e| e.to_string())?;
    https_request_with_config(addr, server_name, config, method, path, headers, body)
}

/// [`https_request`] with a rustls configuration of the test's own.
pub fn https_request_with_config(
    addr: &str,
    server_name: &str,
    config: rustls::ClientConfig,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, String> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let data = request_bytes(addr, method, path, headers, body);
    stream.write_all(&data).map_err(|e| e.to_string())?;
    let (buf, read_error) = read_response(&mut stream);
    if let Some(e) = read_error
        && parse_response(&buf).is_none()
    {
        return Err(e.to_string());
    }
    parse_response(&buf).ok_or_else(|| {
        format!(
            "incomplete HTTP response: {:?}",
            String::from_utf8_lossy(&buf)
        )
    })
}

/// Reads until a whole response has arrived, the peer closes, or reading fails (a server
/// may close a TLS connection without close_notify once it has answered).
fn read_response(reader: &mut impl Read) -> (Vec<u8>, Option<std::io::Error>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => return (buf, None),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if response_complete(&buf) {
                    return (buf, None);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return (buf, Some(e)),
        }
    }
}

/// Where the body starts, the status and the headers.
type Head = (usize, u16, Vec<(String, String)>);

fn split_head(buf: &[u8]) -> Option<Head> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Some((end + 4, status, headers))
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn response_complete(buf: &[u8]) -> bool {
    let Some((start, _, headers)) = split_head(buf) else {
        return false;
    };
    if let Some(len) = header_value(&headers, "content-length")
        && let Ok(len) = len.parse::<usize>()
    {
        return buf.len() - start >= len;
    }
    if header_value(&headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        return decode_chunked(&buf[start..]).is_some();
    }
    false
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

fn parse_response(buf: &[u8]) -> Option<Response> {
    let (start, status, headers) = split_head(buf)?;
    let rest = &buf[start..];
    let body = if header_value(&headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        decode_chunked(rest)?
    } else if let Some(len) = header_value(&headers, "content-length").and_then(|l| l.parse().ok())
    {
        if rest.len() < len {
            return None;
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Some(Response {
        status,
        headers,
        body,
    })
}

// ---------------------------------------------------------------------------------------
// Hub
// ---------------------------------------------------------------------------------------

/// A running `mesync serve` on loopback, with its data dir in a temporary directory.
pub struct Hub {
    child: Option<Child>,
    tmp: TempDir,
    data_dir: PathBuf,
    addr: String,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    pub logs: Logs,
}

impl Hub {
    /// A hub on an ephemeral loopback port.
    pub fn start() -> Hub {
        Hub::start_with(&[], &[])
    }

    /// A hub on an ephemeral loopback port, with extra arguments and environment.
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Hub {
        Hub::launch("127.0.0.1:0", args, env)
    }

    /// A hub on a given loopback port (retried for a while if the port is still taken).
    pub fn start_on(port: u16) -> Hub {
        Hub::launch(&format!("127.0.0.1:{port}"), &[], &[])
    }

    fn launch(listen: &str, args: &[&str], env: &[(&str, &str)]) -> Hub {
        let tmp = tempfile::Builder::new()
            .prefix("mesync-hub-")
            .tempdir()
            .expect("tempdir");
        let data_dir = tmp.path().join("hub");
        fs::create_dir_all(&data_dir).expect("create hub data dir");
        let mut hub = Hub {
            child: None,
            tmp,
            data_dir,
            addr: listen.to_string(),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            logs: Logs::default(),
        };
        hub.spawn(listen);
        hub
    }

    fn spawn(&mut self, listen: &str) {
        let fixed_port = !listen.ends_with(":0");
        let start = Instant::now();
        for attempt in 1..=60 {
            match self.try_spawn(listen) {
                Ok(()) => return,
                Err(e) => {
                    // A fixed port can still be held for a moment: try again.
                    if !fixed_port || start.elapsed() > TIMEOUT || attempt == 60 {
                        self.logs.dump("hub");
                        panic!("hub did not start on {listen}: {e}");
                    }
                    thread::sleep(Duration::from_millis(250));
                }
            }
        }
    }

    fn try_spawn(&mut self, listen: &str) -> Result<(), String> {
        let mark = self.logs.len();
        self.logs.push(format!(
            "[harness] starting: mesync serve --listen {listen}"
        ));
        let mut cmd = clean_command(self.tmp.path());
        cmd.arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra_args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
        self.logs.capture(child.stdout.take().expect("stdout"), "");
        self.logs.capture(child.stderr.take().expect("stderr"), "");
        let start = Instant::now();
        loop {
            if let Some(addr) = self.logs.listen_addr(mark) {
                self.addr = addr;
                self.child = Some(child);
                return Ok(());
            }
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited with {status} before listening"));
            }
            if start.elapsed() > TIMEOUT {
                kill_and_reap(&mut child);
                return Err("no `listening on http://` line on stderr within 20 s".into());
            }
            thread::sleep(POLL);
        }
    }

    /// The hub's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `mesync token ARGS --data-dir <this hub's>`, as an operator runs it on the hub's
    /// machine.
    pub fn token_cmd(&self, args: &[&str]) -> Out {
        let home = self.data_dir.parent().expect("data dir has a parent");
        let mut cmd = clean_command(home);
        cmd.arg("token")
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir);
        run(cmd, None, TIMEOUT)
    }

    /// Issues a token for `host` with the CLI and returns it.
    pub fn issue_token(&self, host: &str) -> String {
        let out = self.token_cmd(&["issue", host]);
        assert!(out.success(), "token issue {host}: {}", out.stderr);
        let token = out.stdout.trim().to_string();
        assert!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "the token alone on stdout: {:?}",
            out.stdout
        );
        token
    }

    /// `host:port` it listens on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in hub address")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
            self.logs.push("[harness] hub killed with SIGKILL".into());
        }
    }

    /// Starts it again on the same data dir and the same port (the port is retried for
    /// a while if something still holds it).
    pub fn restart(&mut self) {
        self.kill9();
        let listen = self.addr.clone();
        self.spawn(&listen);
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, then SIGKILL after 10 s; returns the exit status if it exited by itself.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_with("TERM")
    }

    /// Stops the hub with `signal` (TERM, INT): its exit status, or `None` if it had to be
    /// killed after 10 s.
    pub fn stop_with(&mut self, signal: &str) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let status = signal_and_wait(&mut child, signal, Duration::from_secs(10));
        self.logs.push(format!(
            "[harness] hub stopped with SIG{signal}: {status:?}"
        ));
        status
    }

    /// One request; panics when the hub cannot be talked to at all.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        http_request(&self.addr, method, path, body, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{method} {path} to the hub at {}: {e}", self.addr))
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    /// A request with `Authorization: Bearer <token>`.
    pub fn request_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Response {
        let auth = format!("Bearer {token}");
        let body = body.map(|b| b.to_string().into_bytes());
        http_request_with(
            &self.addr,
            method,
            path,
            &[("Authorization", &auth)],
            body.as_deref(),
            Duration::from_secs(90),
        )
        .unwrap_or_else(|e| panic!("{method} {path} to the hub at {}: {e}", self.addr))
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    /// POSTs one message and panics unless the hub answers 200 with its id accepted.
    pub fn post_message(&self, msg: &Value) {
        let r = self.post("/v1/messages", msg);
        assert_eq!(r.status, 200, "POST /v1/messages: {}", r.text());
        let body = r.json();
        assert!(
            body["accepted"]
                .as_array()
                .is_some_and(|a| a.contains(&msg["id"])),
            "message {} not accepted: {body}",
            msg["id"]
        );
    }

    /// Whether the hub has `host` in its registry (file or API).
    pub fn is_registered(&self, host: &str) -> bool {
        if self
            .data_dir
            .join("hosts")
            .join(format!("{host}.json"))
            .exists()
        {
            return true;
        }
        match http_request(
            &self.addr,
            "GET",
            "/v1/hosts",
            None,
            Duration::from_secs(10),
        ) {
            Ok(r) if r.status == 200 => serde_json::from_slice::<Value>(&r.body)
                .ok()
                .and_then(|v| v["hosts"].as_array().cloned())
                .is_some_and(|hosts| hosts.iter().any(|h| h["host"] == host)),
            _ => false,
        }
    }

    pub fn wait_registered(&self, hosts: &[&str]) {
        wait_until(
            TIMEOUT,
            &format!("hosts {hosts:?} registered at the hub"),
            || hosts.iter().all(|h| self.is_registered(h)),
        );
    }

    /// File names pending for `host` at the hub (`queues/<host>/`), sorted.
    pub fn queue_files(&self, host: &str) -> Vec<String> {
        list_dir(&self.data_dir.join("queues").join(host))
            .into_iter()
            .filter(|n| n.ends_with(".json"))
            .collect()
    }

    /// Ids pending for `host` at the hub, in file name order.
    pub fn queue_ids(&self, host: &str) -> Vec<String> {
        self.queue_files(host)
            .iter()
            .map(|n| queue_file_id(n))
            .collect()
    }
}

/// The id in a hub queue file name `<P>-<seq>-<uuid>.json`.
pub fn queue_file_id(name: &str) -> String {
    let stem = name.strip_suffix(".json").unwrap_or(name);
    // A UUID is 36 characters long.
    stem.get(stem.len().saturating_sub(36)..)
        .unwrap_or(stem)
        .to_string()
}

impl Drop for Hub {
    fn drop(&mut self) {
        if thread::panicking() {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.logs
                    .push(format!("[harness] hub had exited: {status}"));
            }
            self.logs.dump("hub");
        }
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------------------

/// Agents named `names`, started against `hub` and registered there.
pub fn start_agents<const N: usize>(hub: &Hub, names: [&str; N]) -> [Agent; N] {
    let agents = names.map(|name| {
        let mut agent = Agent::new(&hub.url(), name);
        agent.start();
        agent
    });
    hub.wait_registered(&names);
    agents
}

/// One agent's base dir (a temporary directory) and, once started, its `mesync start`.
pub struct Agent {
    pub host_id: String,
    tmp: TempDir,
    env: BTreeMap<String, Option<String>>,
    /// A command the agent is started under (e.g. `setpriv --reuid=...`), if any.
    wrapper: Vec<String>,
    child: Option<Child>,
    pub logs: Logs,
}

impl Agent {
    /// An agent for `hub_url` named `host_id`; its directories exist, it is not started.
    pub fn new(hub_url: &str, host_id: &str) -> Agent {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("mesync-{host_id}-"))
            .tempdir()
            .expect("tempdir");
        for d in AGENT_DIRS {
            fs::create_dir_all(tmp.path().join(d)).expect("create agent dir");
        }
        let base = tmp.path().to_string_lossy().into_owned();
        let mut env = BTreeMap::new();
        env.insert("HOME".to_string(), Some(base.clone()));
        env.insert("MESYNC_BASE_DIR".to_string(), Some(base));
        env.insert("MESYNC_HOST_ID".to_string(), Some(host_id.to_string()));
        env.insert("MESYNC_SERVER_URL".to_string(), Some(hub_url.to_string()));
        env.insert("MESYNC_POLL_INTERVAL".to_string(), Some("1".to_string()));
        Agent {
            host_id: host_id.to_string(),
            tmp,
            env,
            wrapper: Vec::new(),
            child: None,
            logs: Logs::default(),
        }
    }

    /// Starts the agent under `wrapper` (a command that then runs `mesync start ...`).
    pub fn with_wrapper(mut self, wrapper: &[&str]) -> Agent {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Sets an environment variable for everything this agent runs.
    pub fn with_env(mut self, key: &str, value: &str) -> Agent {
        self.env.insert(key.to_string(), Some(value.to_string()));
        self
    }

    /// Removes an environment variable from everything this agent runs.
    pub fn without_env(mut self, key: &str) -> Agent {
        self.env.insert(key.to_string(), None);
        self
    }

    /// Points the agent (and its commands) at another hub.
    pub fn set_hub_url(&mut self, url: &str) {
        self.env
            .insert("MESYNC_SERVER_URL".to_string(), Some(url.to_string()));
    }

    pub fn base(&self) -> &Path {
        self.tmp.path()
    }

    pub fn dir(&self, queue: &str) -> PathBuf {
        self.base().join(queue)
    }

    /// `mesync` with this agent's environment, plus `overrides` (`None` removes).
    pub fn command_with(&self, overrides: &[(&str, Option<&str>)]) -> Command {
        let mut cmd = clean_command(self.base());
        let mut env = self.env.clone();
        for (k, v) in overrides {
            env.insert(k.to_string(), v.map(str::to_string));
        }
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd
    }

    /// Runs `mesync ARGS` with this agent's environment.
    pub fn cmd(&self, args: &[&str]) -> Out {
        self.cmd_with(args, &[])
    }

    /// Runs `mesync ARGS` with this agent's environment plus `overrides`.
    pub fn cmd_with(&self, args: &[&str], overrides: &[(&str, Option<&str>)]) -> Out {
        let mut cmd = self.command_with(overrides);
        cmd.args(args);
        run(cmd, None, TIMEOUT)
    }

    /// Runs `mesync ARGS` with `input` on stdin.
    pub fn cmd_stdin(&self, args: &[&str], input: &[u8]) -> Out {
        let mut cmd = self.command_with(&[]);
        cmd.args(args);
        run(cmd, Some(input), TIMEOUT)
    }

    /// Starts `mesync start` in the background.
    pub fn start(&mut self) {
        self.start_with_args(&[]);
    }

    /// Starts `mesync start ARGS` in the background.
    pub fn start_with_args(&mut self, args: &[&str]) {
        assert!(
            self.child.is_none(),
            "agent {} already started",
            self.host_id
        );
        self.logs.push(format!(
            "[harness] starting agent {} {args:?}",
            self.host_id
        ));
        let mesync = self.command_with(&[]);
        let mut cmd = match self.wrapper.split_first() {
            None => mesync,
            Some((program, wrapper_args)) => {
                let mut wrapped = Command::new(program);
                wrapped.args(wrapper_args).arg(BIN).stdin(Stdio::null());
                for (key, value) in mesync.get_envs() {
                    match value {
                        Some(v) => wrapped.env(key, v),
                        None => wrapped.env_remove(key),
                    };
                }
                wrapped
            }
        };
        cmd.arg("start").args(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn agent {}: {e}", self.host_id));
        self.logs.capture(child.stdout.take().expect("stdout"), "");
        self.logs.capture(child.stderr.take().expect("stderr"), "");
        self.child = Some(child);
    }

    /// SIGTERM, then SIGKILL after 10 s; returns the exit status if it exited by itself.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_with("TERM")
    }

    /// Stops the agent with `signal` (TERM, INT): its exit status, or `None` if it had to
    /// be killed after 10 s.
    pub fn stop_with(&mut self, signal: &str) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let status = signal_and_wait(&mut child, signal, Duration::from_secs(10));
        self.logs.push(format!(
            "[harness] agent stopped with SIG{signal}: {status:?}"
        ));
        status
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
            self.logs.push("[harness] agent killed with SIGKILL".into());
        }
    }

    /// The agent process's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// `mesync send TYPE --payload PAYLOAD EXTRA...`; panics unless it printed an id.
    pub fn send(&self, ty: &str, payload: &str, extra: &[&str]) -> String {
        let mut args = vec!["send", ty, "--payload", payload];
        args.extend_from_slice(extra);
        let out = self.cmd(&args).ok("mesync send");
        let id = out.stdout.trim().to_string();
        assert!(
            uuid::Uuid::parse_str(&id).is_ok(),
            "mesync send must print the id alone on stdout, printed {:?}",
            out.stdout
        );
        id
    }

    /// Non-dot file names in `queue`, sorted.
    pub fn files(&self, queue: &str) -> Vec<String> {
        list_dir(&self.dir(queue))
    }

    /// Parsed messages in `queue`, sorted by file name.
    pub fn messages(&self, queue: &str) -> Vec<Value> {
        read_messages(&self.dir(queue))
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    pub fn inbox(&self) -> Vec<Value> {
        self.messages("inbox")
    }

    /// Ids of the messages in `queue`, sorted by file name.
    pub fn ids(&self, queue: &str) -> Vec<String> {
        self.messages(queue)
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect()
    }

    /// Whether `inbox/` holds the message `id`.
    pub fn has(&self, id: &str) -> bool {
        self.inbox().iter().any(|m| m["id"] == id)
    }

    /// How many inbox files hold the message `id`.
    pub fn inbox_count(&self, id: &str) -> usize {
        self.inbox().iter().filter(|m| m["id"] == id).count()
    }

    /// The inbox file name and message for `id`.
    pub fn inbox_entry(&self, id: &str) -> Option<(String, Value)> {
        read_messages(&self.dir("inbox"))
            .into_iter()
            .find(|(_, m)| m["id"] == id)
    }

    /// Installs `hooks/<ty>` (mode 0755) with `script` as its text.
    pub fn install_hook(&self, ty: &str, script: &str) {
        let hooks = self.dir("hooks");
        let tmp = hooks.join(format!(".{ty}.tmp"));
        fs::write(&tmp, script).expect("write hook");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).expect("chmod hook");
        fs::rename(&tmp, hooks.join(ty)).expect("rename hook");
    }

    /// Where [`Agent::install_recorder`] hooks write.
    pub fn hook_dir(&self) -> PathBuf {
        self.base().join("hook-out")
    }

    /// Installs a hook for `ty` that records, for each run: the id in `hook-out/order.log`,
    /// stdin in `hook-out/<id>.<attempt>.json` and the environment in
    /// `hook-out/<id>.<attempt>.env` (the `.json` appears last, atomically).
    /// Paths are written into the script: hooks run with a clean environment.
    pub fn install_recorder(&self, ty: &str) {
        let dir = self.hook_dir();
        fs::create_dir_all(&dir).expect("create hook-out");
        let d = dir.display();
        let script = format!(
            r#"#!/bin/sh
D='{d}'
id="$MESYNC_MESSAGE_ID"
n="$MESYNC_ATTEMPT"
cat > "$D/.$id.$n.$$.json"
env > "$D/.$id.$n.$$.env"
echo "$id" >> "$D/order.log"
mv "$D/.$id.$n.$$.env" "$D/$id.$n.env"
mv "$D/.$id.$n.$$.json" "$D/$id.$n.json"
"#
        );
        self.install_hook(ty, &script);
    }

    /// The ids the recorder hook ran for, in the order it ran.
    pub fn hook_runs(&self) -> Vec<String> {
        fs::read_to_string(self.hook_dir().join("order.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// What the recorder hook read on stdin for run `attempt` of `id`, once complete.
    pub fn hook_stdin(&self, id: &str, attempt: u32) -> Option<Value> {
        let text = fs::read(self.hook_dir().join(format!("{id}.{attempt}.json"))).ok()?;
        Some(serde_json::from_slice(&text).unwrap_or_else(|e| {
            panic!(
                "hook stdin for {id} is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&text)
            )
        }))
    }

    /// The environment the recorder hook saw for run `attempt` of `id`.
    pub fn hook_env(&self, id: &str, attempt: u32) -> Option<BTreeMap<String, String>> {
        let text = fs::read_to_string(self.hook_dir().join(format!("{id}.{attempt}.env"))).ok()?;
        Some(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// `mesync list QUEUE --json`, parsed.
    pub fn list_json(&self, queue: &str) -> Vec<Value> {
        self.cmd(&["list", queue, "--json"])
            .ok(&format!("mesync list {queue} --json"))
            .json_lines()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if thread::panicking() {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.logs
                    .push(format!("[harness] agent had exited: {status}"));
            }
            let files: Vec<String> = AGENT_DIRS
                .iter()
                .map(|q| format!("{q}/: {:?}", list_dir_all(&self.dir(q))))
                .collect();
            self.logs
                .push(format!("[harness] files: {}", files.join("; ")));
            self.logs.dump(&format!("agent {}", self.host_id));
        }
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}
