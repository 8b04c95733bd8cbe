//! Crash consistency by construction: the real hub, and then a receiving agent, run under
//! `strace`, and the order of their system calls is checked against the durability protocol.
//!
//! - Hub, for every message it answers as accepted: the staging file's data is written, then
//!   flushed (`fsync`/`fdatasync` of it, or a `syncfs`), and only then linked into
//!   `queues/<host>/`; after the link and the `accepted.log` append comes a flush of each
//!   (`fsync` of the queue directory and of the log, or a `syncfs`), and only then is the
//!   answer naming the id written to the socket.
//! - Receiver, for every message it acknowledges: the temporary inbox file's data is
//!   flushed before the rename into `inbox/`; the rename and the ledger record are flushed
//!   before `POST /v1/ack` naming the id is written to the socket.
//!
//! A crash (of the process or the machine) between any two system calls then loses nothing
//! that was acknowledged. The checker is tested on hand-written traces too, so it is known
//! to fail when the order is wrong.
//!
//! Without a usable `strace` the live tests say why and pass, unless
//! `MESYNC_REQUIRE_TOOLS=1`, which makes them fail.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

// ---------------------------------------------------------------------------------------
// Reading a trace
// ---------------------------------------------------------------------------------------

/// The system calls traced. `?` lets strace skip one the architecture does not have; the
/// process calls are there to tell threads (one fd table) from processes.
const SYSCALLS: &str = "openat,write,pwrite64,writev,fsync,fdatasync,syncfs,?rename,renameat,\
                        renameat2,?link,linkat,?unlink,unlinkat,sendto,sendmsg,?mkdir,mkdirat,\
                        clone,clone3,?fork,?vfork";

/// One system call, put back together when strace split it around another thread's calls.
#[derive(Debug, Clone)]
struct Event {
    /// Line (1-based) where the call began, and where it returned: a call that ended
    /// before another began has `end < other.start`.
    start: usize,
    end: usize,
    tid: u32,
    name: String,
    ret: Option<i64>,
    /// The trace lines, for messages.
    lines: Vec<(usize, String)>,
    /// What the first argument (a file descriptor) refers to: a path or a socket.
    target: Option<String>,
    /// A key naming the first argument's open file: the same for calls on one connection.
    fd_key: Option<String>,
    /// Path arguments, made absolute where possible (open, link, rename, mkdir, unlink).
    paths: Vec<String>,
    /// The bytes written, for write-like calls.
    data: String,
}

impl Event {
    fn ok(&self) -> bool {
        self.ret.is_some_and(|r| r >= 0)
    }

    fn is_write(&self) -> bool {
        matches!(
            self.name.as_str(),
            "write" | "pwrite64" | "writev" | "sendto" | "sendmsg"
        ) && self.ret.is_some_and(|r| r > 0)
    }

    fn is_flush(&self) -> bool {
        matches!(self.name.as_str(), "fsync" | "fdatasync" | "syncfs") && self.ret == Some(0)
    }

    /// Whether this flush makes `path` (a file's data, or a directory's entries) durable:
    /// an fsync or fdatasync of it, or a syncfs of the file system under `root`.
    fn flushes(&self, path: &str, root: &str) -> bool {
        if !self.is_flush() {
            return false;
        }
        let Some(target) = &self.target else {
            return false;
        };
        match self.name.as_str() {
            "syncfs" => target == root || target.starts_with(&format!("{root}/")),
            _ => target == path,
        }
    }

    fn before(&self, other: &Event) -> bool {
        self.end < other.start
    }

    fn show(&self) -> String {
        self.lines
            .iter()
            .map(|(n, l)| format!("    line {n}: {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A parsed trace: the calls in the order they returned.
struct Trace {
    events: Vec<Event>,
}

/// One call as read, before its file descriptors are resolved.
struct RawCall {
    start: usize,
    end: usize,
    tid: u32,
    text: String,
    lines: Vec<(usize, String)>,
}

impl Trace {
    /// Parses `strace -f [-tt] [-y|-yy] -o FILE` output.
    fn parse(text: &str) -> Trace {
        let calls = merge_lines(text);
        let parsed: Vec<(RawCall, Call)> = calls
            .into_iter()
            .filter_map(|raw| {
                let call = split_call(&raw.text)?;
                Some((raw, call))
            })
            .collect();

        // Which thread or process each new task is, to know whose fd table it uses.
        let mut spawned: HashMap<u32, (u32, bool)> = HashMap::new();
        for (
            raw,
            Call {
                name, args, ret, ..
            },
        ) in &parsed
        {
            if matches!(name.as_str(), "clone" | "clone3" | "fork" | "vfork")
                && let Some(child) = ret.filter(|r| *r > 0)
            {
                let shares = args.iter().any(|a| a.contains("CLONE_FILES"));
                spawned.insert(child as u32, (raw.tid, shares));
            }
        }

        let mut fds = FdTables::default();
        let mut events = Vec::with_capacity(parsed.len());
        for (
            call,
            Call {
                name,
                args,
                ret,
                note,
            },
        ) in parsed
        {
            let table = fds.table_of(call.tid, &spawned);
            let fd_arg = args.first().map(|a| parse_fd(a));
            let (target, fd_key) = match &fd_arg {
                Some(Some((fd, note))) => {
                    let target = note.clone().or_else(|| fds.path(table, *fd));
                    let key = match note {
                        Some(note) if !note.starts_with('/') => note.clone(),
                        _ => format!("{table}:{fd}"),
                    };
                    (target, Some(key))
                }
                _ => (None, None),
            };
            let dir_of = |fds: &FdTables, arg: &str| -> Option<String> {
                let (fd, note) = parse_fd(arg)?;
                note.or_else(|| fds.path(table, fd))
            };
            let path_at = |fds: &FdTables, dir: Option<&String>, path: Option<&String>| {
                let path = c_string(path?)?;
                let dir = dir.and_then(|d| dir_of(fds, d));
                Some(absolute(&path, dir.as_deref()))
            };
            let paths: Vec<String> = match name.as_str() {
                "openat" | "mkdirat" | "unlinkat" => path_at(&fds, args.first(), args.get(1))
                    .into_iter()
                    .collect(),
                "link" | "rename" => [args.first(), args.get(1)]
                    .into_iter()
                    .filter_map(|p| path_at(&fds, None, p))
                    .collect(),
                "linkat" | "renameat" | "renameat2" => [
                    path_at(&fds, args.first(), args.get(1)),
                    path_at(&fds, args.get(2), args.get(3)),
                ]
                .into_iter()
                .flatten()
                .collect(),
                "mkdir" | "unlink" => path_at(&fds, None, args.first()).into_iter().collect(),
                _ => Vec::new(),
            };
            let data = if matches!(
                name.as_str(),
                "write" | "pwrite64" | "writev" | "sendto" | "sendmsg"
            ) {
                args.iter()
                    .skip(1)
                    .flat_map(|a| string_literals(a))
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                    .collect()
            } else {
                String::new()
            };
            // An fd the call returned (openat) now names its path, in this table.
            if name == "openat"
                && let Some(fd) = ret.filter(|r| *r >= 0)
            {
                let path = note.clone().or_else(|| paths.first().cloned());
                fds.set(table, fd, path);
            }
            events.push(Event {
                start: call.start,
                end: call.end,
                tid: call.tid,
                name,
                ret,
                lines: call.lines,
                target,
                fd_key,
                paths,
                data,
            });
        }
        Trace { events }
    }

    fn writes_to<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a Event> + 'a {
        self.events
            .iter()
            .filter(move |e| e.is_write() && e.target.as_deref() == Some(path))
    }

    /// The first flush of `path` that began after `after` ended and ended before `before`
    /// began.
    fn flush_between(
        &self,
        after: &Event,
        before: &Event,
        path: &str,
        root: &str,
    ) -> Option<&Event> {
        self.events
            .iter()
            .find(|f| after.before(f) && f.before(before) && f.flushes(path, root))
    }

    /// The flushes (of anything) that began after `after` and before `before` began, to
    /// show what was there instead of the missing one.
    fn flushes_near(&self, after: usize, before: usize) -> String {
        let near: Vec<String> = self
            .events
            .iter()
            .filter(|f| f.is_flush() && f.start > after && f.start < before)
            .map(Event::show)
            .collect();
        if near.is_empty() {
            "  (no flush at all in between)".to_string()
        } else {
            format!("  flushes in between:\n{}", near.join("\n"))
        }
    }

    /// The write that starts the HTTP message `event` belongs to: `event` itself when it
    /// holds `start_line`, else the latest earlier write on the same connection holding it.
    fn message_head<'a>(&'a self, event: &'a Event, start_line: &str) -> Option<&'a Event> {
        if event.data.contains(start_line) {
            return Some(event);
        }
        self.events.iter().rev().find(|e| {
            e.is_write()
                && e.end <= event.start
                && e.fd_key.is_some()
                && e.fd_key == event.fd_key
                && e.data.contains(start_line)
        })
    }
}

/// fd → path, per fd table (one per process; threads share theirs).
#[derive(Default)]
struct FdTables {
    tables: Vec<HashMap<i64, String>>,
    of_task: HashMap<u32, usize>,
}

impl FdTables {
    /// The table of `tid`: its parent's when it was created sharing it (a thread), a copy
    /// otherwise (a process). A task seen without a creation record (the first one, or a
    /// trace without process calls) is taken to be a thread of the first process.
    fn table_of(&mut self, tid: u32, spawned: &HashMap<u32, (u32, bool)>) -> usize {
        if let Some(&table) = self.of_task.get(&tid) {
            return table;
        }
        let table = match spawned.get(&tid) {
            Some(&(parent, shares)) if parent != tid => {
                let parent_table = self.table_of(parent, spawned);
                if shares {
                    parent_table
                } else {
                    let copy = self.tables[parent_table].clone();
                    self.tables.push(copy);
                    self.tables.len() - 1
                }
            }
            _ if !self.tables.is_empty() => 0,
            _ => {
                self.tables.push(HashMap::new());
                0
            }
        };
        self.of_task.insert(tid, table);
        table
    }

    fn set(&mut self, table: usize, fd: i64, path: Option<String>) {
        match path {
            Some(path) => self.tables[table].insert(fd, path),
            None => self.tables[table].remove(&fd),
        };
    }

    fn path(&self, table: usize, fd: i64) -> Option<String> {
        self.tables.get(table)?.get(&fd).cloned()
    }
}

/// Puts calls split as `<unfinished ...>` / `<... NAME resumed>` back together, and drops
/// signal and exit lines. Calls come out in the order they returned.
fn merge_lines(text: &str) -> Vec<RawCall> {
    let mut pending: HashMap<u32, RawCall> = HashMap::new();
    let mut calls = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let Some((tid, rest)) = split_prefix(line) else {
            continue;
        };
        if rest.starts_with("---") || rest.starts_with("+++") {
            continue;
        }
        if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            pending.insert(
                tid,
                RawCall {
                    start: number,
                    end: number,
                    tid,
                    text: head.trim_end().to_string(),
                    lines: vec![(number, line.to_string())],
                },
            );
            continue;
        }
        if let Some(after) = rest.strip_prefix("<... ") {
            let tail = after.split_once("resumed>").map_or("", |(_, t)| t);
            if let Some(mut call) = pending.remove(&tid) {
                call.text.push_str(tail);
                call.end = number;
                call.lines.push((number, line.to_string()));
                calls.push(call);
            }
            continue;
        }
        calls.push(RawCall {
            start: number,
            end: number,
            tid,
            text: rest.to_string(),
            lines: vec![(number, line.to_string())],
        });
    }
    calls
}

/// `PID [TIME] REST`: the task id and the rest. Lines without a pid belong to task 0.
fn split_prefix(line: &str) -> Option<(u32, &str)> {
    let line = line.trim_start();
    if line.is_empty() {
        return None;
    }
    let (tid, rest) = match line.split_once(' ') {
        Some((first, rest)) if first.bytes().all(|b| b.is_ascii_digit()) => {
            (first.parse().ok()?, rest.trim_start())
        }
        _ => (0, line),
    };
    // A -t/-tt/-ttt time stamp.
    let rest = match rest.split_once(' ') {
        Some((time, after))
            if time
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b':' || b == b'.')
                && time.contains(['.', ':']) =>
        {
            after
        }
        _ => rest,
    };
    Some((tid, rest))
}

/// One call's parts: `NAME(ARGS) = RET<NOTE> ...`.
struct Call {
    name: String,
    /// The top-level arguments, as written.
    args: Vec<String>,
    ret: Option<i64>,
    /// The `-y` note of the return value (the path of an fd that openat returned).
    note: Option<String>,
}

/// `NAME(ARGS) = RET<NOTE> ...` → its parts.
fn split_call(text: &str) -> Option<Call> {
    let open = text.find('(')?;
    let name = text[..open].trim().to_string();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    let bytes = text.as_bytes();
    let (mut depth, mut in_string, mut escaped) = (0i32, false, false);
    let mut args = Vec::new();
    let mut arg_start = open + 1;
    let mut close = None;
    for (i, &b) in bytes.iter().enumerate().skip(open) {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(i);
                    break;
                }
            }
            b',' if depth == 1 => {
                args.push(text[arg_start..i].trim().to_string());
                arg_start = i + 1;
            }
            _ => {}
        }
    }
    let close = close?;
    let last = text[arg_start..close].trim();
    if !last.is_empty() {
        args.push(last.to_string());
    }
    let after = text[close + 1..].trim_start();
    let result = after.strip_prefix('=').map(str::trim_start).unwrap_or("");
    let number: String = result
        .chars()
        .enumerate()
        .take_while(|(i, c)| c.is_ascii_digit() || (*i == 0 && *c == '-'))
        .map(|(_, c)| c)
        .collect();
    let ret = number.parse().ok();
    let note = result[number.len()..]
        .strip_prefix('<')
        .and_then(|n| n.rfind('>').map(|end| n[..end].to_string()));
    Some(Call {
        name,
        args,
        ret,
        note,
    })
}

/// `13</path>`, `13<TCP:[...]>`, `13`, `AT_FDCWD</cwd>` → fd (-100 for AT_FDCWD) and note.
fn parse_fd(arg: &str) -> Option<(i64, Option<String>)> {
    let (head, note) = match arg.find('<') {
        Some(at) if arg.ends_with('>') => (&arg[..at], Some(arg[at + 1..arg.len() - 1].into())),
        _ => (arg, None),
    };
    let fd = if head == "AT_FDCWD" {
        -100
    } else {
        head.parse().ok()?
    };
    Some((fd, note))
}

/// The first C string literal of `arg`, decoded.
fn c_string(arg: &str) -> Option<String> {
    string_literals(arg)
        .into_iter()
        .next()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Every C string literal in `text`, decoded (strace's escapes: `\n`, `\"`, octal, hex).
fn string_literals(text: &str) -> Vec<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'"' {
            i += 1;
            continue;
        }
        i += 1;
        let mut s = Vec::new();
        while i < bytes.len() && bytes[i] != b'"' {
            if bytes[i] != b'\\' || i + 1 >= bytes.len() {
                s.push(bytes[i]);
                i += 1;
                continue;
            }
            i += 1;
            let c = bytes[i];
            match c {
                b'n' => s.push(b'\n'),
                b't' => s.push(b'\t'),
                b'r' => s.push(b'\r'),
                b'v' => s.push(0x0b),
                b'f' => s.push(0x0c),
                b'x' => {
                    let hex = text.get(i + 1..i + 3).unwrap_or("");
                    s.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                    i += 2;
                }
                b'0'..=b'7' => {
                    let digits = bytes[i..]
                        .iter()
                        .take(3)
                        .take_while(|d| (b'0'..=b'7').contains(*d))
                        .count();
                    let value = u32::from_str_radix(&text[i..i + digits], 8).unwrap_or(63);
                    s.push(value as u8);
                    i += digits - 1;
                }
                other => s.push(other),
            }
            i += 1;
        }
        i += 1;
        out.push(s);
    }
    out
}

fn absolute(path: &str, dir: Option<&str>) -> String {
    match dir {
        Some(dir) if !path.starts_with('/') => format!("{}/{path}", dir.trim_end_matches('/')),
        _ => path.to_string(),
    }
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, name)| name)
}

/// The hyphenated UUIDs in `text`, in order.
fn uuids_in(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut ids = Vec::new();
    let mut i = 0;
    while i + 36 <= bytes.len() {
        let candidate = &text.get(i..i + 36).unwrap_or("");
        let shaped = candidate.len() == 36
            && candidate.bytes().enumerate().all(|(j, b)| match j {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_hexdigit(),
            });
        if shaped {
            ids.push(candidate.to_ascii_lowercase());
            i += 36;
        } else {
            i += 1;
        }
    }
    ids
}

/// The ids in the JSON array `"key":[...]` of `data`.
fn ids_under(data: &str, key: &str) -> Vec<String> {
    let marker = format!("\"{key}\":[");
    let Some(at) = data.find(&marker) else {
        return Vec::new();
    };
    let rest = &data[at + marker.len()..];
    uuids_in(&rest[..rest.find(']').unwrap_or(rest.len())])
}

// ---------------------------------------------------------------------------------------
// The hub's order
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Report {
    /// Ids whose order was checked.
    checked: BTreeSet<String>,
    /// Flushes that did the work, by kind (for the summary).
    flushes: BTreeMap<String, usize>,
    links: usize,
    /// Links into a queue directory created during the trace (whose own durability was
    /// checked too).
    new_dirs: usize,
    /// Staging files that were recycled files from spare/.
    recycled: usize,
    violations: Vec<String>,
}

impl Report {
    fn count(&mut self, flush: &Event) {
        *self.flushes.entry(flush.name.clone()).or_default() += 1;
    }
}

/// Checks, for every id a hub's answer lists as accepted, the order staging write → flush
/// → link into queues/ → flush (queue dir, accepted.log) → answer. `root` is the directory
/// the data dir lives in (a `syncfs` of a descriptor under it flushes it all).
fn check_hub(trace: &Trace, root: &str) -> Report {
    let mut report = Report::default();
    // The first answer naming each id as accepted.
    let mut answers: BTreeMap<String, &Event> = BTreeMap::new();
    for event in trace.events.iter().filter(|e| e.is_write()) {
        for id in ids_under(&event.data, "accepted") {
            let head = trace.message_head(event, "HTTP/1.1 ");
            answers.entry(id).or_insert(head.unwrap_or(event));
        }
    }
    for (id, answer) in answers {
        report.checked.insert(id.clone());
        let fail = |report: &mut Report, what: String| {
            report.violations.push(format!(
                "message {id}: {what}\n  the answer:\n{}",
                answer.show()
            ));
        };
        let links: Vec<&Event> = trace
            .events
            .iter()
            .filter(|e| {
                matches!(e.name.as_str(), "link" | "linkat")
                    && e.ok()
                    && e.paths.len() == 2
                    && e.paths[1].contains("/queues/")
                    && file_name(&e.paths[1]).ends_with(&format!("{id}.json"))
                    && e.before(answer)
            })
            .collect();
        if links.is_empty() {
            fail(
                &mut report,
                "answered as accepted, but never linked into queues/ before the answer".into(),
            );
            continue;
        }
        for link in &links {
            report.links += 1;
            let (staging, queued) = (&link.paths[0], &link.paths[1]);
            let write = trace.writes_to(staging).filter(|w| w.before(link)).last();
            let Some(write) = write else {
                fail(
                    &mut report,
                    format!(
                        "linked into the queue with no data written to the staging file \
                         {staging} before\n  the link:\n{}",
                        link.show()
                    ),
                );
                continue;
            };
            match trace.flush_between(write, link, staging, root) {
                Some(flush) => report.count(flush),
                None => fail(
                    &mut report,
                    format!(
                        "linked into the queue before the staging file's data was flushed\n  \
                         the data write:\n{}\n  the link:\n{}\n{}",
                        write.show(),
                        link.show(),
                        trace.flushes_near(write.end, link.start)
                    ),
                ),
            }
            let dir = parent(queued);
            match trace.flush_between(link, answer, dir, root) {
                Some(flush) => report.count(flush),
                None => fail(
                    &mut report,
                    format!(
                        "answered before the link into {dir} was flushed\n  the link:\n{}\n{}",
                        link.show(),
                        trace.flushes_near(link.end, answer.start)
                    ),
                ),
            }
            // A queue directory made for this message must itself be durable.
            let made = trace.events.iter().find(|e| {
                matches!(e.name.as_str(), "mkdir" | "mkdirat")
                    && e.ok()
                    && e.paths.first().map(String::as_str) == Some(dir)
                    && e.before(link)
            });
            if made.is_some() {
                report.new_dirs += 1;
            }
            let recycled = trace.events.iter().any(|e| {
                matches!(e.name.as_str(), "rename" | "renameat" | "renameat2")
                    && e.ok()
                    && e.paths.len() == 2
                    && e.paths[0].contains("/spare/")
                    && e.paths[1] == *staging
            });
            if recycled {
                report.recycled += 1;
            }
            if let Some(made) = made
                && trace
                    .flush_between(made, answer, parent(dir), root)
                    .is_none()
            {
                fail(
                    &mut report,
                    format!(
                        "answered before the new queue directory {dir} was flushed into its \
                         parent\n  the mkdir:\n{}\n{}",
                        made.show(),
                        trace.flushes_near(made.end, answer.start)
                    ),
                );
            }
        }
        let log_write = trace.events.iter().find(|e| {
            e.is_write()
                && e.target
                    .as_deref()
                    .is_some_and(|t| t.ends_with("/accepted.log"))
                && e.data.contains(&id)
                && e.before(answer)
        });
        match log_write {
            None => fail(
                &mut report,
                "answered before its id was appended to accepted.log".into(),
            ),
            Some(log_write) => {
                let log = log_write.target.clone().unwrap_or_default();
                match trace.flush_between(log_write, answer, &log, root) {
                    Some(flush) => report.count(flush),
                    None => fail(
                        &mut report,
                        format!(
                            "answered before the accepted.log append was flushed\n  the \
                             append:\n{}\n{}",
                            log_write.show(),
                            trace.flushes_near(log_write.end, answer.start)
                        ),
                    ),
                }
            }
        }
    }
    report
}

// ---------------------------------------------------------------------------------------
// The receiver's order
// ---------------------------------------------------------------------------------------

/// Checks, for every id in `expected` and every id a `POST /v1/ack` names, the order
/// temporary inbox file written → flushed → renamed into inbox/ → rename and ledger record
/// flushed → ack written to the socket. `root` is the agent's base dir.
fn check_receiver(trace: &Trace, root: &str, expected: &BTreeSet<String>) -> Report {
    let mut report = Report::default();
    let mut acks: BTreeMap<String, &Event> = BTreeMap::new();
    for event in trace.events.iter().filter(|e| e.is_write()) {
        let ids = ids_under(&event.data, "ids");
        if ids.is_empty() {
            continue;
        }
        let Some(head) = trace.message_head(event, "POST /v1/ack ") else {
            continue;
        };
        for id in ids {
            acks.entry(id).or_insert(head);
        }
    }
    let ids: BTreeSet<String> = expected
        .iter()
        .cloned()
        .chain(acks.keys().cloned())
        .collect();
    for id in ids {
        report.checked.insert(id.clone());
        let Some(&ack) = acks.get(&id) else {
            report
                .violations
                .push(format!("message {id}: never acknowledged"));
            continue;
        };
        let fail = |report: &mut Report, what: String| {
            report
                .violations
                .push(format!("message {id}: {what}\n  the ack:\n{}", ack.show()));
        };
        let rename = trace.events.iter().find(|e| {
            matches!(e.name.as_str(), "rename" | "renameat" | "renameat2")
                && e.ok()
                && e.paths.len() == 2
                && parent(&e.paths[1]).ends_with("/inbox")
                && file_name(&e.paths[1]).ends_with(&format!("_{id}.json"))
        });
        let Some(rename) = rename.filter(|r| r.before(ack)) else {
            fail(
                &mut report,
                "acknowledged before it was renamed into inbox/".into(),
            );
            continue;
        };
        report.links += 1;
        let temp = &rename.paths[0];
        match trace.writes_to(temp).filter(|w| w.before(rename)).last() {
            None => fail(
                &mut report,
                format!(
                    "renamed into inbox/ with no data written to {temp} before\n  the rename:\n{}",
                    rename.show()
                ),
            ),
            Some(write) => match trace.flush_between(write, rename, temp, root) {
                Some(flush) => report.count(flush),
                None => fail(
                    &mut report,
                    format!(
                        "renamed into inbox/ before its data was flushed\n  the data \
                         write:\n{}\n  the rename:\n{}\n{}",
                        write.show(),
                        rename.show(),
                        trace.flushes_near(write.end, rename.start)
                    ),
                ),
            },
        }
        let inbox = parent(&rename.paths[1]);
        match trace.flush_between(rename, ack, inbox, root) {
            Some(flush) => report.count(flush),
            None => fail(
                &mut report,
                format!(
                    "acknowledged before the rename into inbox/ was flushed\n  the rename:\n{}\n{}",
                    rename.show(),
                    trace.flushes_near(rename.end, ack.start)
                ),
            ),
        }
        let record = trace.events.iter().find(|e| {
            e.is_write()
                && e.target
                    .as_deref()
                    .is_some_and(|t| t.ends_with("/ledger.jsonl"))
                && e.data.contains(&id)
                && e.data.contains("delivered")
        });
        match record.filter(|r| r.before(ack)) {
            None => fail(
                &mut report,
                "acknowledged before its ledger record was appended".into(),
            ),
            Some(record) => {
                let ledger = record.target.clone().unwrap_or_default();
                match trace.flush_between(record, ack, &ledger, root) {
                    Some(flush) => report.count(flush),
                    None => fail(
                        &mut report,
                        format!(
                            "acknowledged before its ledger record was flushed\n  the \
                             append:\n{}\n{}",
                            record.show(),
                            trace.flushes_near(record.end, ack.start)
                        ),
                    ),
                }
            }
        }
    }
    report
}

// ---------------------------------------------------------------------------------------
// Running the binary under strace
// ---------------------------------------------------------------------------------------

/// Why strace cannot be used here, if it cannot.
fn strace_unusable() -> Option<String> {
    let out = Command::new("strace")
        .args(["-f", "-yy", "-o", "/dev/null", "-e"])
        .arg(format!("trace={SYSCALLS}"))
        .arg("true")
        .stdin(Stdio::null())
        .output();
    match out {
        Err(e) => Some(format!("strace is not installed ({e})")),
        Ok(out) if !out.status.success() => Some(format!(
            "strace cannot trace here ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// True when the test can go on; false (with the reason printed) when it is skipped.
fn strace_or_skip(test: &str) -> bool {
    let Some(why) = strace_unusable() else {
        return true;
    };
    unavailable(test, &why);
    false
}

/// `mesync ARGS` run as `strace -f ... -o TRACE mesync ARGS`, with the environment of a
/// harness command. Killed, with what it traces, when dropped.
struct Traced {
    name: String,
    strace: Option<Child>,
    traced_pid: Option<u32>,
    logs: Arc<Mutex<Vec<String>>>,
    trace: PathBuf,
}

impl Traced {
    fn spawn(name: &str, env_from: &Command, args: &[&str], trace: &Path) -> Traced {
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-tt", "-yy", "-s", "65536", "-e"])
            .arg(format!("trace={SYSCALLS}"))
            .arg("-o")
            .arg(trace)
            .arg(BIN)
            .args(args);
        for (key, value) in env_from.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run strace for {name}: {e}"));
        let logs = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let logs = Arc::clone(&logs);
            thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    logs.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        let mut traced = Traced {
            name: name.to_string(),
            strace: Some(child),
            traced_pid: None,
            logs,
            trace: trace.to_path_buf(),
        };
        traced.traced_pid = Some(traced.find_traced_pid());
        traced
    }

    /// The pid of mesync: the child of strace that runs the binary (strace forks short-lived
    /// children of its own at start-up to probe the kernel).
    fn find_traced_pid(&mut self) -> u32 {
        let strace_pid = self.strace.as_ref().expect("running").id();
        let children = format!("/proc/{strace_pid}/task/{strace_pid}/children");
        let mut pid = None;
        wait_until(
            TIMEOUT,
            &format!("{} started under strace", self.name),
            || {
                pid = fs::read_to_string(&children).ok().and_then(|c| {
                    c.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .find(|p| runs_mesync(*p))
                });
                pid.is_some()
            },
        );
        pid.expect("a pid")
    }

    fn lines(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The address of a hub's `listening on http://ADDR` line.
    fn wait_listening(&self) -> String {
        const MARK: &str = "listening on http://";
        let mut addr = None;
        wait_until(TIMEOUT, &format!("{} listening", self.name), || {
            addr = self.lines().iter().find_map(|l| {
                let rest = &l[l.find(MARK)? + MARK.len()..];
                let a: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || ".:[]".contains(*c))
                    .collect();
                (!a.is_empty()).then_some(a)
            });
            addr.is_some()
        });
        addr.expect("an address")
    }

    /// SIGTERM to mesync, then waits for strace to finish writing the trace; returns it.
    fn stop(&mut self) -> String {
        if let Some(pid) = self.traced_pid {
            signal(pid, "TERM");
        }
        let mut strace = self.strace.take().expect("running");
        let start = Instant::now();
        let status = loop {
            if let Some(status) = strace.try_wait().expect("try_wait") {
                break status;
            }
            if start.elapsed() > Duration::from_secs(30) {
                if let Some(pid) = self.traced_pid {
                    signal(pid, "KILL");
                }
                let _ = strace.kill();
                let _ = strace.wait();
                panic!("{} did not stop within 30 s of SIGTERM", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        };
        self.traced_pid = None;
        assert!(
            status.success(),
            "{} under strace exited with {status}",
            self.name
        );
        fs::read_to_string(&self.trace)
            .unwrap_or_else(|e| panic!("read the trace {}: {e}", self.trace.display()))
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if thread::panicking() {
            let lines = self.lines();
            let skip = lines.len().saturating_sub(200);
            eprintln!("----- log of {} ({} lines) -----", self.name, lines.len());
            for l in &lines[skip..] {
                eprintln!("{}| {l}", self.name);
            }
            eprintln!("----- end of log of {} -----", self.name);
        }
        if let Some(mut strace) = self.strace.take() {
            if let (Ok(None), Some(pid)) = (strace.try_wait(), self.traced_pid) {
                signal(pid, "KILL");
            }
            let _ = strace.kill();
            let _ = strace.wait();
        }
    }
}

/// Whether process `pid` runs the binary under test (and not something that got its pid).
fn runs_mesync(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).next() == Some(BIN.as_bytes()))
}

fn signal(pid: u32, name: &str) {
    if !runs_mesync(pid) {
        return;
    }
    let _ = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn real_path(path: &Path) -> String {
    fs::canonicalize(path)
        .unwrap_or_else(|e| panic!("canonicalize {}: {e}", path.display()))
        .to_string_lossy()
        .into_owned()
}

/// POSTs `body` to `/v1/messages`; returns the ids the hub answered as accepted.
fn send(addr: &str, body: &Value) -> Vec<String> {
    let r = http_request(
        addr,
        "POST",
        "/v1/messages",
        Some(body.to_string().as_bytes()),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("POST /v1/messages: {e}"));
    assert_eq!(r.status, 200, "POST /v1/messages: {}", r.text());
    r.json()["accepted"]
        .as_array()
        .expect("accepted")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

fn get(addr: &str, path: &str) -> Value {
    let r = http_request(addr, "GET", path, None, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.json()
}

/// Pulls everything queued for `host` and acknowledges it (the files become spares the
/// hub reuses for later messages).
fn drain(addr: &str, host: &str) {
    let pulled = get(addr, &format!("/v1/messages?host={host}&wait=0&max=1000"));
    let ids: Vec<Value> = pulled["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    let body = json!({"host": host, "ids": ids}).to_string();
    let r = http_request(
        addr,
        "POST",
        "/v1/ack",
        Some(body.as_bytes()),
        Duration::from_secs(60),
    )
    .expect("POST /v1/ack");
    assert_eq!(r.status, 200, "POST /v1/ack: {}", r.text());
}

/// `text` without its flushes: every checked message must then fail, which shows the
/// checker is not vacuous on a real trace.
fn without_flushes(text: &str) -> String {
    text.lines()
        .filter(|l| {
            ![" fsync(", " fdatasync(", " syncfs("]
                .iter()
                .any(|f| l.contains(f))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn summary(what: &str, report: &Report, trace: &Trace) -> String {
    let published = if what.starts_with("hub") {
        format!(
            "{} links into queues/ ({} of them with a staging file recycled from spare/; \
             {} into a queue directory created during the run)",
            report.links, report.recycled, report.new_dirs
        )
    } else {
        format!("{} renames into inbox/", report.links)
    };
    format!(
        "{what}: {} calls traced, {} messages checked, {published}, flushes relied on: {:?}, \
         {} violations",
        trace.events.len(),
        report.checked.len(),
        report.flushes,
        report.violations.len()
    )
}

// ---------------------------------------------------------------------------------------
// The live tests
// ---------------------------------------------------------------------------------------

#[test]
fn hub_flushes_before_it_links_and_before_it_answers() {
    let test = "hub_flushes_before_it_links_and_before_it_answers";
    if !strace_or_skip(test) {
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("mesync-strace-hub-")
        .tempdir()
        .expect("tempdir");
    let root = real_path(tmp.path());
    let data_dir = tmp.path().join("hub");
    fs::create_dir_all(&data_dir).expect("create data dir");
    let data_dir_text = data_dir.to_string_lossy().into_owned();
    let mut hub = Traced::spawn(
        "hub",
        &clean_command(tmp.path()),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_dir_text,
        ],
        &tmp.path().join("hub.strace"),
    );
    let addr = hub.wait_listening();

    // Two registered recipients, so broadcasts are linked twice.
    for host in ["rx", "rx2"] {
        get(&addr, &format!("/v1/messages?host={host}&wait=0"));
    }
    let mut accepted = BTreeSet::new();
    let one = |target: Option<&str>, priority: &str, n: usize| {
        message("order.test", "tx", target, priority, json!({"n": n}))
    };
    // Single messages: one file each, flushed with fdatasync.
    for (n, priority) in ["high", "normal", "low"].iter().enumerate() {
        accepted.extend(send(&addr, &one(Some("rx"), priority, n)));
    }
    accepted.extend(send(&addr, &one(None, "normal", 3)));
    // A batch: several files, flushed with one syncfs.
    let batch: Vec<Value> = (0..6)
        .map(|n| one([Some("rx"), None, Some("rx2")][n % 3], "normal", 10 + n))
        .collect();
    accepted.extend(send(&addr, &json!({ "messages": batch })));
    // Concurrent senders, whose messages share group commits.
    thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let addr = addr.clone();
                s.spawn(move || {
                    (0..3)
                        .flat_map(|n| send(&addr, &one(Some("rx"), "normal", 100 + 10 * t + n)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            accepted.extend(h.join().expect("sender thread"));
        }
    });
    // Delivered files become spares, which later messages reuse.
    drain(&addr, "rx");
    drain(&addr, "rx2");
    let batch: Vec<Value> = (0..4)
        .map(|n| one([Some("rx"), None][n % 2], "low", 200 + n))
        .collect();
    accepted.extend(send(&addr, &json!({ "messages": batch })));
    let again = one(Some("rx2"), "high", 300);
    accepted.extend(send(&addr, &again));
    accepted.extend(send(&addr, &one(None, "normal", 301)));
    // A duplicate is not accepted again.
    assert!(send(&addr, &again).is_empty(), "a resent id is a duplicate");
    assert_eq!(
        accepted.len(),
        28,
        "every message was accepted: {accepted:?}"
    );

    let text = hub.stop();
    let trace = Trace::parse(&text);
    let report = check_hub(&trace, &root);
    eprintln!(
        "{} (in {:.1?})",
        summary("hub under strace", &report, &trace),
        started.elapsed()
    );
    assert!(
        report.violations.is_empty(),
        "{} order violations in the hub's trace ({}):\n\n{}",
        report.violations.len(),
        tmp.path().join("hub.strace").display(),
        report.violations.join("\n\n")
    );
    let unchecked: Vec<&String> = accepted.difference(&report.checked).collect();
    assert!(
        unchecked.is_empty(),
        "accepted messages whose answer is not in the trace: {unchecked:?}"
    );
    let broken = check_hub(&Trace::parse(&without_flushes(&text)), &root);
    let failing: BTreeSet<&str> = broken
        .violations
        .iter()
        .filter_map(|v| v.strip_prefix("message ")?.get(..36))
        .collect();
    assert_eq!(
        failing.len(),
        accepted.len(),
        "without its flushes, the trace must fail for every message"
    );
}

#[test]
fn receiver_flushes_inbox_and_ledger_before_it_acks() {
    let test = "receiver_flushes_inbox_and_ledger_before_it_acks";
    if !strace_or_skip(test) {
        return;
    }
    let started = Instant::now();
    let hub = Hub::start();
    let agent = Agent::new(&hub.url(), "rx");
    let root = real_path(agent.base());
    let trace_dir = tempfile::Builder::new()
        .prefix("mesync-strace-rx-")
        .tempdir()
        .expect("tempdir");
    let trace_path = trace_dir.path().join("agent.strace");
    let mut traced = Traced::spawn(
        "agent rx",
        &agent.command_with(&[]),
        &["start"],
        &trace_path,
    );
    hub.wait_registered(&["rx"]);

    let mut ids = BTreeSet::new();
    // One at a time: one file per commit, flushed with fdatasync.
    for n in 0..3 {
        let msg = message("order.test", "tx", Some("rx"), "normal", json!({"n": n}));
        hub.post_message(&msg);
        let id = id_of(&msg);
        wait_until(TIMEOUT, "the message is in rx's inbox", || agent.has(&id));
        ids.insert(id);
    }
    // A batch: pulled together, flushed with syncfs.
    let batch: Vec<Value> = (0..8)
        .map(|n| message("order.test", "tx", Some("rx"), "low", json!({"n": 10 + n})))
        .collect();
    let accepted = send(hub.addr(), &json!({ "messages": batch }));
    assert_eq!(accepted.len(), 8, "the batch was accepted");
    ids.extend(batch.iter().map(id_of));
    let broadcast = message("order.test", "tx", None, "high", json!({"n": 20}));
    hub.post_message(&broadcast);
    ids.insert(id_of(&broadcast));
    wait_until(TIMEOUT, "every message is in rx's inbox", || {
        ids.iter().all(|id| agent.has(id))
    });
    wait_until(TIMEOUT, "rx acknowledged everything", || {
        hub.queue_files("rx").is_empty()
    });

    let text = traced.stop();
    let trace = Trace::parse(&text);
    let report = check_receiver(&trace, &root, &ids);
    eprintln!(
        "{} (in {:.1?})",
        summary("receiving agent under strace", &report, &trace),
        started.elapsed()
    );
    assert!(
        report.violations.is_empty(),
        "{} order violations in the receiver's trace ({}):\n\n{}",
        report.violations.len(),
        trace_path.display(),
        report.violations.join("\n\n")
    );
    let unchecked: Vec<&String> = ids.difference(&report.checked).collect();
    assert!(unchecked.is_empty(), "messages not checked: {unchecked:?}");
    let broken = check_receiver(&Trace::parse(&without_flushes(&text)), &root, &ids);
    let failing: BTreeSet<&str> = broken
        .violations
        .iter()
        .filter_map(|v| v.strip_prefix("message ")?.get(..36))
        .collect();
    assert_eq!(
        failing.len(),
        ids.len(),
        "without its flushes, the trace must fail for every message"
    );
}

// ---------------------------------------------------------------------------------------
// The checker on hand-written traces
// ---------------------------------------------------------------------------------------

const M: &str = "11111111-2222-4333-8444-555555555555";
const STAGING: &str = "/d/hub/staging/.11111111-2222-4333-8444-555555555555.json.0a.tmp";
const QUEUED: &str =
    "/d/hub/queues/rx/1-0000000000000000-11111111-2222-4333-8444-555555555555.json";
const SOCKET: &str = "11<TCP:[127.0.0.1:8080->127.0.0.1:50000]>";

/// Gives each `PID CALL` line a time stamp, as `strace -tt` does.
fn stamped(lines: &[String]) -> String {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let (pid, rest) = l.split_once(' ').expect("PID CALL");
            format!("{pid} 10:00:00.{:06} {rest}\n", i + 1)
        })
        .collect()
}

/// A hub committing one message, in the right order, with `-yy` notes.
fn good_hub_lines() -> Vec<String> {
    vec![
        r#"100 openat(AT_FDCWD</d>, "/d/hub/accepted.log", O_WRONLY|O_CREAT|O_APPEND|O_CLOEXEC, 0666) = 12</d/hub/accepted.log>"#.to_string(),
        format!(
            r#"100 openat(AT_FDCWD</d>, "{STAGING}", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0666) = 13<{STAGING}>"#
        ),
        format!(r#"100 write(13<{STAGING}>, "{{\"id\":\"{M}\",\"type\":\"t\"}}", 50) = 50"#),
        format!("100 fdatasync(13<{STAGING}>) = 0"),
        format!(r#"100 linkat(AT_FDCWD</d>, "{STAGING}", AT_FDCWD</d>, "{QUEUED}", 0) = 0"#),
        format!(r#"100 write(12</d/hub/accepted.log>, "{M}\n", 37) = 37"#),
        r#"100 openat(AT_FDCWD</d>, "/d/hub", O_RDONLY|O_CLOEXEC) = 15</d/hub>"#.to_string(),
        "100 syncfs(15</d/hub>) = 0".to_string(),
        format!(
            r#"101 writev({SOCKET}, [{{iov_base="HTTP/1.1 200 OK\r\ncontent-length: 64\r\n\r\n", iov_len=40}}, {{iov_base="{{\"accepted\":[\"{M}\"],\"duplicates\":[],\"rejected\":[]}}", iov_len=64}}], 2) = 104"#
        ),
    ]
}

fn moved(mut lines: Vec<String>, from: usize, to: usize) -> Vec<String> {
    let line = lines.remove(from);
    lines.insert(to, line);
    lines
}

fn hub_violations(lines: &[String]) -> Vec<String> {
    let report = check_hub(&Trace::parse(&stamped(lines)), "/d");
    assert_eq!(
        report.checked,
        BTreeSet::from([M.to_string()]),
        "the answer was found"
    );
    report.violations
}

#[test]
fn checker_passes_a_hub_trace_in_the_right_order() {
    let violations = hub_violations(&good_hub_lines());
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn checker_fails_a_link_before_the_data_flush() {
    // The link comes before the fdatasync of the staging file.
    let violations = hub_violations(&moved(good_hub_lines(), 4, 3));
    assert_eq!(violations.len(), 1, "{violations:#?}");
    let v = &violations[0];
    assert!(
        v.contains("linked into the queue before the staging file's data was flushed"),
        "{v}"
    );
    assert!(
        v.contains("line 4: 100 10:00:00.000004 linkat("),
        "shows the link: {v}"
    );
    assert!(
        v.contains("line 3: 100 10:00:00.000003 write(13<"),
        "shows the write: {v}"
    );
    assert!(v.contains("writev(11<TCP:"), "shows the answer: {v}");
}

#[test]
fn checker_fails_an_answer_before_the_second_flush() {
    // The 200 is written before the syncfs that makes the link and the log durable.
    let violations = hub_violations(&moved(good_hub_lines(), 8, 7));
    assert_eq!(violations.len(), 2, "{violations:#?}");
    assert!(violations[0].contains("answered before the link into /d/hub/queues/rx"));
    assert!(violations[1].contains("answered before the accepted.log append was flushed"));
    assert!(violations[0].contains("line 8: 101 10:00:00.000008 writev("));
}

#[test]
fn checker_fails_a_flush_of_another_file() {
    let mut lines = good_hub_lines();
    lines[3] = "100 fdatasync(14</d/hub/staging/.other.tmp>) = 0".to_string();
    let violations = hub_violations(&lines);
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert!(violations[0].contains("fdatasync(14</d/hub/staging/.other.tmp>)"));
}

#[test]
fn checker_joins_split_lines_and_orders_by_return() {
    // The fdatasync is interrupted by another thread's call and returns only after the
    // link began: the data was not durable when the link was made.
    let mut lines = good_hub_lines();
    lines[3] = format!("100 fdatasync(13<{STAGING}> <unfinished ...>");
    lines.insert(
        4,
        format!(r#"102 linkat(AT_FDCWD</d>, "{STAGING}", AT_FDCWD</d>, "{QUEUED}", 0) = 0"#),
    );
    lines.insert(5, "100 <... fdatasync resumed>) = 0".to_string());
    lines.remove(6); // the original link
    let violations = hub_violations(&lines);
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert!(violations[0].contains("line 4: 100 10:00:00.000004 fdatasync(13<"));
    assert!(violations[0].contains("line 6: 100 10:00:00.000006 <... fdatasync resumed>"));

    // A write split around another thread's call, then everything in order: fine.
    let mut lines = good_hub_lines();
    lines[2] = format!(
        r#"100 write(13<{STAGING}>, "{{\"id\":\"{M}\",\"type\":\"t\"}}", 50 <unfinished ...>"#
    );
    lines.insert(3, format!("101 writev({SOCKET}, [{{iov_base=\"HTTP/1.1 200 OK\\r\\n\\r\\n\", iov_len=19}}], 1) = 19"));
    lines.insert(4, "100 <... write resumed>) = 50".to_string());
    let violations = hub_violations(&lines);
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn checker_follows_fds_without_notes() {
    // Plain `strace -f` output: descriptors are followed through openat, per fd table.
    let plain = |lines: Vec<String>| -> Vec<String> {
        lines
            .into_iter()
            .map(|l| {
                let mut out = String::new();
                let mut rest = l.as_str();
                // Drop every `<...>` note that follows a descriptor or AT_FDCWD.
                while let Some(at) = rest.find('<') {
                    let before = &rest[..at];
                    let is_note = before.ends_with(|c: char| c.is_ascii_digit())
                        || before.ends_with("AT_FDCWD");
                    // The note ends at the first `>` that is not part of a `->`.
                    let end = rest[at..]
                        .char_indices()
                        .find(|&(i, c)| c == '>' && !rest[at..at + i].ends_with('-'))
                        .map(|(i, _)| i);
                    match (is_note, end) {
                        (true, Some(end)) => {
                            out.push_str(before);
                            rest = &rest[at + end + 1..];
                        }
                        _ => {
                            out.push_str(&rest[..=at]);
                            rest = &rest[at + 1..];
                        }
                    }
                }
                out.push_str(rest);
                out
            })
            .collect()
    };
    let good = plain(good_hub_lines());
    assert!(good[3].ends_with("fdatasync(13) = 0"), "{}", good[3]);
    assert!(good[8].contains("writev(11, [{iov_base="), "{}", good[8]);
    assert!(hub_violations(&good).is_empty());

    // fd 13 reopened on another file before the fdatasync: not a flush of the staging file.
    let mut reused = good.clone();
    reused.insert(
        3,
        r#"100 openat(AT_FDCWD, "/d/hub/hosts/x.json", O_RDONLY) = 13"#.to_string(),
    );
    let violations = hub_violations(&reused);
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert!(violations[0].contains("before the staging file's data was flushed"));

    // A forked process has its own fd table: its fd 13 is not the staging file.
    let mut forked = good.clone();
    forked.insert(
        3,
        "100 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|SIGCHLD) = 200".to_string(),
    );
    forked.insert(
        4,
        r#"200 openat(AT_FDCWD, "/d/elsewhere", O_RDONLY) = 13"#.to_string(),
    );
    assert!(
        hub_violations(&forked).is_empty(),
        "the parent's fd 13 is untouched"
    );
    // ... while a thread shares it.
    let mut threaded = forked.clone();
    threaded[3] =
        "100 clone3({flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_THREAD, exit_signal=0}, 88) = 200"
            .to_string();
    assert_eq!(hub_violations(&threaded).len(), 1);
}

/// A receiver writing one message, in the right order.
fn good_receiver_lines() -> Vec<String> {
    let temp = format!("/r/inbox/.20240115T103000_{M}.json.0b.tmp");
    let inbox = format!("/r/inbox/20240115T103000_{M}.json");
    vec![
        format!(
            r#"300 openat(AT_FDCWD</r>, "{temp}", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0666) = 20<{temp}>"#
        ),
        format!(r#"300 write(20<{temp}>, "{{\"id\":\"{M}\"}}", 45) = 45"#),
        format!("300 fdatasync(20<{temp}>) = 0"),
        format!(r#"300 rename("{temp}", "{inbox}") = 0"#),
        format!(
            r#"300 write(7</r/state/ledger.jsonl>, "{{\"event\":\"delivered\",\"id\":\"{M}\"}}\n", 60) = 60"#
        ),
        "300 syncfs(21</r/inbox>) = 0".to_string(),
        format!(
            r#"301 writev(9<TCP:[127.0.0.1:50001->127.0.0.1:8080]>, [{{iov_base="POST /v1/ack HTTP/1.1\r\ncontent-length: 52\r\n\r\n", iov_len=46}}, {{iov_base="{{\"host\":\"rx\",\"ids\":[\"{M}\"]}}", iov_len=52}}], 2) = 98"#
        ),
    ]
}

fn receiver_violations(lines: &[String]) -> Vec<String> {
    let expected = BTreeSet::from([M.to_string()]);
    check_receiver(&Trace::parse(&stamped(lines)), "/r", &expected).violations
}

#[test]
fn checker_passes_and_fails_receiver_traces() {
    let good = good_receiver_lines();
    let violations = receiver_violations(&good);
    assert!(violations.is_empty(), "{violations:#?}");

    // The ack goes out before the syncfs.
    let violations = receiver_violations(&moved(good.clone(), 6, 5));
    assert_eq!(violations.len(), 2, "{violations:#?}");
    assert!(violations[0].contains("acknowledged before the rename into inbox/ was flushed"));
    assert!(violations[1].contains("acknowledged before its ledger record was flushed"));
    assert!(violations[0].contains("POST /v1/ack"), "shows the ack");

    // The rename comes before the data flush.
    let violations = receiver_violations(&moved(good.clone(), 3, 2));
    assert_eq!(violations.len(), 1, "{violations:#?}");
    assert!(violations[0].contains("renamed into inbox/ before its data was flushed"));

    // The ack body in a write of its own after the head, before the ledger append.
    let mut split = moved(good.clone(), 6, 4);
    split[4] = r#"301 write(9<TCP:[127.0.0.1:50001->127.0.0.1:8080]>, "POST /v1/ack HTTP/1.1\r\n\r\n", 25) = 25"#.to_string();
    split.insert(
        5,
        format!(
            r#"301 write(9<TCP:[127.0.0.1:50001->127.0.0.1:8080]>, "{{\"host\":\"rx\",\"ids\":[\"{M}\"]}}", 52) = 52"#
        ),
    );
    let violations = receiver_violations(&split);
    assert!(
        violations
            .iter()
            .any(|v| v.contains("acknowledged before its ledger record was appended")),
        "{violations:#?}"
    );

    // Never acknowledged.
    let violations = receiver_violations(&good[..6]);
    assert_eq!(violations, vec![format!("message {M}: never acknowledged")]);
}

#[test]
fn parser_reads_strace_syntax() {
    let Call {
        name,
        args,
        ret,
        note,
    } = split_call(r#"openat(AT_FDCWD</tmp>, "/tmp/a \"b\",c", O_RDONLY)   = 3</tmp/a "b",c>"#)
        .expect("a call");
    assert_eq!(name, "openat");
    assert_eq!(args.len(), 3, "{args:?}");
    assert_eq!(c_string(&args[1]).as_deref(), Some("/tmp/a \"b\",c"));
    assert_eq!(ret, Some(3));
    assert_eq!(note.as_deref(), Some("/tmp/a \"b\",c"));
    let unlink =
        split_call(r#"unlink("/x") = -1 ENOENT (No such file or directory)"#).expect("a call");
    assert_eq!(unlink.ret, Some(-1));
    assert_eq!(
        string_literals(r#""\1\0\303\251\x41\n\"""#),
        vec![vec![1, 0, 0xc3, 0xa9, b'A', b'\n', b'"']]
    );
    assert_eq!(
        parse_fd("11<TCP:[127.0.0.1:1->127.0.0.1:2]>"),
        Some((11, Some("TCP:[127.0.0.1:1->127.0.0.1:2]".to_string())))
    );
    assert_eq!(
        uuids_in(&format!("x{M}y{}", M.to_uppercase())),
        vec![M.to_string(), M.to_string()]
    );
    let trace = Trace::parse(
        "5 10:00:00.1 write(3, \"abc\"..., 10 <unfinished ...>\n\
         6 10:00:00.2 --- SIGCHLD {si_signo=SIGCHLD} ---\n\
         5 10:00:00.3 <... write resumed>) = 10\n\
         6 10:00:00.4 +++ exited with 0 +++\n",
    );
    assert_eq!(trace.events.len(), 1);
    let write = &trace.events[0];
    assert_eq!((write.start, write.end, write.tid), (1, 3, 5));
    assert_eq!(write.data, "abc");
    assert_eq!(write.ret, Some(10));
}
