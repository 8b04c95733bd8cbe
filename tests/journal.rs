//! Logging to the journal: the hub and the agent write structured records (MESSAGE,
//! PRIORITY, SYSLOG_IDENTIFIER and MESYNC_* fields) to the journal's socket. The test binds
//! that socket itself, at the path every journal client uses, so it needs root and a machine
//! where no journald is running (a CI container); elsewhere it says why it skips.

mod support;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

const JOURNAL_DIR: &str = "/run/systemd/journal";
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// The journal socket this test bound; removed again when dropped.
struct FakeJournal {
    socket: UnixDatagram,
    created_dir: Option<PathBuf>,
}

impl FakeJournal {
    /// Binds the journal's socket, or says why it cannot.
    fn bind() -> Result<FakeJournal, String> {
        if Path::new(JOURNAL_SOCKET).exists() {
            // Left by a run of this test that was killed: nobody listens on it.
            let stale = UnixDatagram::unbound()
                .and_then(|probe| probe.connect(JOURNAL_SOCKET))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
            if !stale {
                return Err(format!(
                    "{JOURNAL_SOCKET} exists: a journald is running here, and this test binds its own"
                ));
            }
            let _ = fs::remove_file(JOURNAL_SOCKET);
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(format!("binding {JOURNAL_SOCKET} needs root"));
        }
        let created_dir = (!Path::new(JOURNAL_DIR).exists()).then(|| PathBuf::from(JOURNAL_DIR));
        fs::create_dir_all(JOURNAL_DIR).map_err(|e| format!("create {JOURNAL_DIR}: {e}"))?;
        let socket = UnixDatagram::bind(JOURNAL_SOCKET)
            .map_err(|e| format!("bind {JOURNAL_SOCKET}: {e}"))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        Ok(FakeJournal {
            socket,
            created_dir,
        })
    }

    /// Reads records until one satisfies `want`, for at most TIMEOUT; returns every record
    /// read.
    fn wait_for(
        &self,
        records: &mut Vec<Record>,
        what: &str,
        want: impl Fn(&Record) -> bool,
    ) -> Record {
        let start = Instant::now();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            if let Some(found) = records.iter().find(|r| want(r)) {
                return found.clone();
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "no journal record {what} within {TIMEOUT:?}; records: {records:#?}"
            );
            if let Ok(n) = self.socket.recv(&mut buf) {
                // The journal client probes the socket with an empty datagram at start-up.
                if n > 0 {
                    records.push(parse_record(&buf[..n]));
                }
            }
        }
    }
}

impl Drop for FakeJournal {
    fn drop(&mut self) {
        let _ = fs::remove_file(JOURNAL_SOCKET);
        if let Some(dir) = &self.created_dir {
            let _ = fs::remove_dir(dir);
        }
    }
}

type Record = HashMap<String, String>;

/// Parses the journal's native protocol: `KEY=value\n`, or `KEY\n` followed by a 64-bit
/// little-endian length, the value, and `\n` for values that may hold newlines.
fn parse_record(mut data: &[u8]) -> Record {
    let mut record = Record::new();
    while !data.is_empty() {
        let line_end = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
        let line = &data[..line_end];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            record.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            data = &data[(line_end + 1).min(data.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &data[line_end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().expect("8 length bytes")) as usize;
            let value = &rest[8..8 + len];
            record.insert(key, String::from_utf8_lossy(value).into_owned());
            data = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    record
}

fn field<'a>(record: &'a Record, key: &str) -> &'a str {
    record.get(key).map(String::as_str).unwrap_or("")
}

#[test]
fn hub_and_agent_log_structured_records_to_the_journal() {
    // A running journald owns the socket this test binds: a skip, and a failure under
    // MESYNC_REQUIRE_TOOLS=1 (CI machines run none).
    let journal = match FakeJournal::bind() {
        Ok(journal) => journal,
        Err(why) => return unavailable("journal", &why),
    };
    let mut records = Vec::new();
    let dir = tempfile::tempdir().expect("tempdir");

    // The hub picks the journal by itself: JOURNAL_STREAM names its stderr, as under
    // systemd. Its stderr is a file, which must stay empty.
    let stderr_path = dir.path().join("hub.stderr");
    let stderr = fs::File::create(&stderr_path).expect("create stderr file");
    let meta = stderr.metadata().expect("stat stderr file");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = clean_command(dir.path());
    cmd.args(["serve", "--listen", &listen, "--data-dir"])
        .arg(dir.path().join("hub"))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        // Each message's own line is at debug (the info line counts a commit's messages).
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(stderr);
    let hub = ChildGuard(cmd.spawn().expect("start the hub"));

    let listening = journal.wait_for(&mut records, "of the hub listening", |r| {
        field(r, "MESSAGE").starts_with("listening on http://")
    });
    assert_eq!(field(&listening, "SYSLOG_IDENTIFIER"), "mesync");
    assert_eq!(field(&listening, "PRIORITY"), "6", "info is priority 6");

    // A message through the agent, with a hook that fails: the journal gets the message id,
    // type and the hook's exit status as fields of their own.
    let hub_url = format!("http://{listen}");
    let mut agent = Agent::new(&hub_url, "journal-host");
    let hook = agent.dir("hooks").join("journal.test");
    fs::write(&hook, "#!/bin/sh\ncat >/dev/null\nexit 3\n").expect("write hook");
    chmod(&hook, 0o755);
    agent.start_with_args(&["--log-format", "journal"]);
    let id = agent.send("journal.test", r#"{"n":1}"#, &["--target", "journal-host"]);

    let accepted = journal.wait_for(&mut records, "of the hub accepting the message", |r| {
        field(r, "MESSAGE") == "message accepted"
    });
    assert_eq!(field(&accepted, "MESYNC_ID"), id, "{accepted:?}");
    assert_eq!(field(&accepted, "MESYNC_TYPE"), "journal.test");
    assert_eq!(field(&accepted, "MESYNC_SOURCE"), "journal-host");
    assert_eq!(
        field(&accepted, "MESYNC_HOST"),
        "journal-host",
        "the recipient"
    );

    let hook_failed = journal.wait_for(&mut records, "of the hook failing", |r| {
        field(r, "MESSAGE") == "hook did not succeed"
    });
    assert_eq!(field(&hook_failed, "MESYNC_ID"), id, "{hook_failed:?}");
    assert_eq!(field(&hook_failed, "MESYNC_TYPE"), "journal.test");
    assert_eq!(field(&hook_failed, "MESYNC_EXIT_STATUS"), "3");
    assert_eq!(field(&hook_failed, "PRIORITY"), "4", "warn is priority 4");
    assert_eq!(field(&hook_failed, "SYSLOG_IDENTIFIER"), "mesync");

    let stopped = agent.stop();
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    drop(hub);
    let text = fs::read_to_string(&stderr_path).expect("read hub stderr");
    assert!(
        text.is_empty(),
        "with the journal on stderr, nothing goes to stderr as text: {text}"
    );
    // The agent logged to the journal, not to its stderr.
    assert!(
        !agent.logs.contains("hook did not succeed"),
        "{:?}",
        agent.logs.lines()
    );
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn log_format_text_overrides_a_journal_on_stderr() {
    // Stderr is a file that JOURNAL_STREAM names, as under systemd; `--log-format text`
    // keeps human-readable lines on it anyway. No journal socket is needed.
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr_path = dir.path().join("hub.stderr");
    let stderr = fs::File::create(&stderr_path).expect("create stderr file");
    let meta = stderr.metadata().expect("stat stderr file");
    let mut cmd = clean_command(dir.path());
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "text",
        "--data-dir",
    ])
    .arg(dir.path().join("hub"))
    .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
    .stdout(Stdio::null())
    .stderr(stderr);
    let _hub = ChildGuard(cmd.spawn().expect("start the hub"));
    wait_until(TIMEOUT, "the hub logs as text to its stderr", || {
        fs::read_to_string(&stderr_path).is_ok_and(|t| t.contains("listening on http://"))
    });
    // Chosen, not fallen back to: the journal was not even tried.
    let text = fs::read_to_string(&stderr_path).expect("read stderr");
    assert!(!text.contains("journal is not reachable"), "{text}");
}
