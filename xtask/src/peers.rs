//! The real peers, moving the same messages as mesync, in the same run.
//!
//! A mesync figure only means something next to what established tools achieve on the
//! same disk at the same minute (the shared disk drifts 3x within minutes), so the bench
//! starts each peer here, on loopback, in the benchmark's temporary directory:
//!
//! - Redis streams with `appendonly yes` and `appendfsync always`: every XADD and XACK is
//!   in the AOF and fsynced before Redis replies (Redis groups the commands of one event
//!   loop turn into one fsync, which is its group commit). A producer pipelines XADDs in
//!   chunks of 256; a consumer reads with XREADGROUP and acknowledges with XACK. This is
//!   the durable peer.
//! - Mosquitto with QoS 1 and a persistent (clean session off) subscriber. Caveat:
//!   mosquitto has no per-message fsync at all; `persistence true` only writes a snapshot
//!   every `autosave_interval` and at shutdown. So this figure is what a broker achieves
//!   when it does *not* pay for durability, an upper bound rather than a like-for-like.
//!
//! The clients are written here over `std::net::TcpStream` (a minimal RESP client, and a
//! minimal MQTT 3.1.1 client for CONNECT, SUBSCRIBE and QoS 1 PUBLISH/PUBACK) rather than
//! taken from crates or from `mosquitto_pub`/`mosquitto_sub`: that way both peers are
//! measured the same way, with the send time embedded in each payload and the latency
//! taken at the receiver, readiness is exact (SUBACK, not a probe message), no pipe or
//! stdout buffering sits inside the measurement, and only the server binaries are needed.
//!
//! Each payload starts with the send time in nanoseconds since a common `Instant`, as 20
//! decimal digits, padded with `x` up to `size` bytes. Rates run from the producer's
//! first write to the consumer's last acknowledgement.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One peer's figures for `count` messages.
#[derive(Debug, Clone)]
pub struct PeerResult {
    pub name: &'static str,
    pub msgs_per_sec: f64,
    /// Median send-to-receive latency under this load.
    pub p50_ms: Option<f64>,
}

/// Bound on every wait: server start, a whole run.
const WAIT: Duration = Duration::from_secs(60);
/// Bound on one blocking read or write; longer than Redis's `BLOCK 1000`.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands (or publishes) written before reading replies, and messages per read.
const CHUNK: usize = 256;
/// QoS 1 publishes awaiting PUBACK; the same as the broker's `max_inflight_messages`.
const MQTT_WINDOW: usize = 1000;

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

/// Redis streams, AOF fsynced on every write. `Ok(None)` if redis-server is not installed.
pub fn redis(dir: &Path, count: usize, size: usize) -> Result<Option<PeerResult>, String> {
    let Some(binary) = find_tool("redis-server") else {
        return Ok(None);
    };
    let data = make_dir(&dir.join("redis"))?;
    let port = free_port()?;
    let mut command = Command::new(&binary);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
        .arg(&data)
        .args(["--appendonly", "yes", "--appendfsync", "always"])
        .args(["--save", "", "--daemonize", "no"]);
    let mut server = Server::start("redis-server", command, data.join("server.log"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    server.wait_ready(|| redis_ping(addr))?;

    let mut setup = Conn::connect(addr, "redis")?;
    redis_expect_config(&mut setup, "appendfsync", "always")?;
    redis_expect_config(&mut setup, "appendonly", "yes")?;
    setup.redis_call(&[b"XGROUP", b"CREATE", b"s", b"g", b"$", b"MKSTREAM"])?;
    let consumer = Conn::connect(addr, "redis")?;
    let producer = Conn::connect(addr, "redis")?;
    let clock = Instant::now();
    let run = run_pair(
        consumer,
        move |conn| redis_consume(conn, clock, count),
        || redis_produce(producer, clock, count, size),
    )?;
    drop(server);
    Ok(Some(run.result("redis")))
}

fn redis_ping(addr: SocketAddr) -> bool {
    Conn::connect(addr, "redis")
        .and_then(|mut conn| conn.redis_call(&[b"PING"]))
        .is_ok_and(|reply| matches!(reply, Resp::Simple(s) if s == "PONG"))
}

/// Fails unless the running server has `key` set to `value`: a figure that silently came
/// from a server without fsync would be worthless as a reference.
fn redis_expect_config(conn: &mut Conn, key: &str, value: &str) -> Result<(), String> {
    let reply = conn.redis_call(&[b"CONFIG", b"GET", key.as_bytes()])?;
    match array::<2>(reply) {
        Some([_, Resp::Bulk(Some(actual))]) if actual == value.as_bytes() => Ok(()),
        other => Err(format!("redis: {key} is not {value:?} ({other:?})")),
    }
}

/// XADDs `count` messages, `CHUNK` commands per write; the time of the first write.
fn redis_produce(mut conn: Conn, clock: Instant, count: usize, size: usize) -> Result<u64, String> {
    let mut first = None;
    let mut buffer = Vec::new();
    for chunk in chunks(count) {
        buffer.clear();
        for _ in chunk.clone() {
            encode_command(
                &mut buffer,
                &[b"XADD", b"s", b"*", b"d", &payload(clock, size)],
            );
        }
        first.get_or_insert(nanos(clock));
        conn.send(&buffer)?;
        for _ in chunk {
            if let Resp::Error(e) = conn.read_resp()? {
                return Err(format!("redis XADD: {e}"));
            }
        }
    }
    first.ok_or_else(|| "redis: no messages to send".to_string())
}

/// Reads with XREADGROUP and acknowledges each batch with XACK until `count` are acked.
fn redis_consume(conn: &mut Conn, clock: Instant, count: usize) -> Result<Received, String> {
    let deadline = Instant::now() + WAIT;
    let mut received = Received::with_capacity(count);
    let mut acked = 0;
    while acked < count {
        if Instant::now() > deadline {
            return Err(format!(
                "redis: only {acked} of {count} acked within {WAIT:?}"
            ));
        }
        let reply = conn.redis_call(&[
            b"XREADGROUP",
            b"GROUP",
            b"g",
            b"c",
            b"COUNT",
            b"256",
            b"BLOCK",
            b"1000",
            b"STREAMS",
            b"s",
            b">",
        ])?;
        let now = nanos(clock);
        let entries = stream_entries(reply)?;
        if entries.is_empty() {
            continue;
        }
        let mut xack: Vec<&[u8]> = vec![&b"XACK"[..], b"s", b"g"];
        for (id, data) in &entries {
            received.latency(now, data)?;
            xack.push(id.as_slice());
        }
        match conn.redis_call(&xack)? {
            Resp::Int(n) => acked += usize::try_from(n).unwrap_or(0),
            other => return Err(format!("redis XACK: unexpected reply {other:?}")),
        }
        received.last = nanos(clock);
    }
    Ok(received)
}

/// A stream entry: its id and its field `d`.
type Entry = (Vec<u8>, Vec<u8>);

/// The entries of an XREADGROUP reply; empty on a timeout.
fn stream_entries(reply: Resp) -> Result<Vec<Entry>, String> {
    let bad = |what: &str| format!("redis XREADGROUP: unexpected reply ({what})");
    let streams = match reply {
        Resp::Array(None) => return Ok(Vec::new()),
        Resp::Array(Some(streams)) => streams,
        other => return Err(bad(&format!("{other:?}"))),
    };
    let mut out = Vec::new();
    for stream in streams {
        let [_name, Resp::Array(Some(entries))] =
            array::<2>(stream).ok_or_else(|| bad("stream"))?
        else {
            return Err(bad("stream entries"));
        };
        for entry in entries {
            let [Resp::Bulk(Some(id)), Resp::Array(Some(fields))] =
                array::<2>(entry).ok_or_else(|| bad("entry"))?
            else {
                return Err(bad("entry fields"));
            };
            let Some(Resp::Bulk(Some(data))) = fields.into_iter().nth(1) else {
                return Err(bad("field d"));
            };
            out.push((id, data));
        }
    }
    Ok(out)
}

/// The elements of a RESP array of exactly `N` elements.
fn array<const N: usize>(value: Resp) -> Option<[Resp; N]> {
    match value {
        Resp::Array(Some(items)) => items.try_into().ok(),
        _ => None,
    }
}

/// A RESP2 reply.
#[derive(Debug)]
enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

fn read_resp(reader: &mut impl BufRead) -> Result<Resp, String> {
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("redis: read: {e}"))?;
    if !line.ends_with(b"\r\n") {
        return Err("redis: connection closed mid-reply".into());
    }
    let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    let number = || {
        text.parse::<i64>()
            .map_err(|_| format!("redis: bad number {text:?}"))
    };
    Ok(match line[0] {
        b'+' => Resp::Simple(text),
        b'-' => Resp::Error(text),
        b':' => Resp::Int(number()?),
        b'$' => match usize::try_from(number()?) {
            Err(_) => Resp::Bulk(None),
            Ok(len) => {
                let mut data = vec![0; len + 2];
                reader
                    .read_exact(&mut data)
                    .map_err(|e| format!("redis: read: {e}"))?;
                data.truncate(len);
                Resp::Bulk(Some(data))
            }
        },
        b'*' => match usize::try_from(number()?) {
            Err(_) => Resp::Array(None),
            Ok(len) => Resp::Array(Some(
                (0..len)
                    .map(|_| read_resp(reader))
                    .collect::<Result<_, _>>()?,
            )),
        },
        other => return Err(format!("redis: unknown reply type {:?}", other as char)),
    })
}

// ---------------------------------------------------------------------------------------
// Mosquitto
// ---------------------------------------------------------------------------------------

/// Mosquitto, QoS 1, persistent subscriber. `Ok(None)` if mosquitto is not installed.
pub fn mosquitto(dir: &Path, count: usize, size: usize) -> Result<Option<PeerResult>, String> {
    let Some(binary) = find_tool("mosquitto") else {
        return Ok(None);
    };
    let data = make_dir(&dir.join("mosq"))?;
    let port = free_port()?;
    let config = data.join("mosquitto.conf");
    std::fs::write(&config, mosquitto_config(port, &data))
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let mut command = Command::new(&binary);
    command.arg("-c").arg(&config);
    let mut server = Server::start("mosquitto", command, data.join("server.log"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    server.wait_ready(|| TcpStream::connect(addr).is_ok())?;

    let subscriber = mqtt_subscriber(addr)?;
    let publisher = mqtt_connect(addr, "benchpub", true)?;
    let clock = Instant::now();
    let run = run_pair(
        subscriber,
        move |conn| mqtt_receive(conn, clock, count),
        || mqtt_publish(publisher, clock, count, size),
    )?;
    drop(server);
    Ok(Some(run.result("mosquitto")))
}

fn mosquitto_config(port: u16, data: &Path) -> String {
    // As root, mosquitto 2.0 drops to the `mosquitto` user, which cannot write our
    // temporary directory; `user root` keeps it as is. Ignored when not root.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root\n"
    } else {
        ""
    };
    format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
         persistence_location {}/\nlog_dest none\nmax_inflight_messages {MQTT_WINDOW}\n\
         max_queued_messages 100000\n{user}",
        data.display()
    )
}

/// Connects with clean session off, subscribes to `bench` at QoS 1, waits for SUBACK.
fn mqtt_subscriber(addr: SocketAddr) -> Result<Conn, String> {
    let mut conn = mqtt_connect(addr, "benchsub", false)?;
    let mut body = 1u16.to_be_bytes().to_vec();
    mqtt_string(&mut body, b"bench");
    body.push(1);
    let mut packet = Vec::new();
    mqtt_packet(&mut packet, 0x82, &body);
    conn.send(&packet)?;
    let (header, body) = conn.read_mqtt()?;
    if header >> 4 != 9 || body.get(2).is_none_or(|&code| code > 2) {
        return Err(format!(
            "mqtt: subscription refused (header {header:#x}, {body:?})"
        ));
    }
    Ok(conn)
}

fn mqtt_connect(addr: SocketAddr, client_id: &str, clean: bool) -> Result<Conn, String> {
    let mut conn = Conn::connect(addr, "mqtt")?;
    let mut body = Vec::new();
    mqtt_string(&mut body, b"MQTT");
    body.push(4); // protocol level: 3.1.1
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&60u16.to_be_bytes()); // keep-alive, s
    mqtt_string(&mut body, client_id.as_bytes());
    let mut packet = Vec::new();
    mqtt_packet(&mut packet, 0x10, &body);
    conn.send(&packet)?;
    match conn.read_mqtt()? {
        (0x20, body) if body.get(1) == Some(&0) => Ok(conn),
        (header, body) => Err(format!(
            "mqtt: connect refused (header {header:#x}, {body:?})"
        )),
    }
}

/// Publishes `count` messages at QoS 1 with up to `MQTT_WINDOW` awaiting PUBACK, `CHUNK`
/// per write; the time of the first write.
fn mqtt_publish(mut conn: Conn, clock: Instant, count: usize, size: usize) -> Result<u64, String> {
    let deadline = Instant::now() + WAIT;
    let (mut sent, mut acked) = (0, 0);
    let mut first = None;
    let mut buffer = Vec::new();
    while acked < count {
        if Instant::now() > deadline {
            return Err(format!(
                "mqtt: only {acked} of {count} published within {WAIT:?}"
            ));
        }
        let next = CHUNK.min(count - sent);
        if next > 0 && sent - acked + next <= MQTT_WINDOW {
            buffer.clear();
            for i in sent..sent + next {
                let mut body = Vec::with_capacity(size + 16);
                mqtt_string(&mut body, b"bench");
                body.extend_from_slice(&packet_id(i).to_be_bytes());
                body.extend_from_slice(&payload(clock, size));
                mqtt_packet(&mut buffer, 0x32, &body);
            }
            first.get_or_insert(nanos(clock));
            conn.send(&buffer)?;
            sent += next;
        } else {
            match conn.read_mqtt()? {
                (0x40, _) => acked += 1,
                (header, _) => return Err(format!("mqtt: unexpected packet {header:#x}")),
            }
        }
    }
    first.ok_or_else(|| "mqtt: no messages to send".to_string())
}

/// Receives `count` publishes, acknowledging each; acks are flushed whenever the next
/// read would block, so the broker's in-flight window keeps moving.
fn mqtt_receive(conn: &mut Conn, clock: Instant, count: usize) -> Result<Received, String> {
    let mut received = Received::with_capacity(count);
    let mut acks = Vec::new();
    while received.latencies.len() < count {
        if conn.reader.buffer().is_empty() && !acks.is_empty() {
            conn.send(&acks)?;
            acks.clear();
        }
        let (header, body) = conn.read_mqtt()?;
        if header >> 4 != 3 {
            continue;
        }
        let now = nanos(clock);
        let (packet_id, data) = parse_publish(header, &body)?;
        received.latency(now, data)?;
        if let Some(id) = packet_id {
            mqtt_packet(&mut acks, 0x40, &id.to_be_bytes());
        }
    }
    conn.send(&acks)?;
    received.last = nanos(clock);
    Ok(received)
}

/// The packet id (QoS > 0) and payload of a PUBLISH body.
fn parse_publish(header: u8, body: &[u8]) -> Result<(Option<u16>, &[u8]), String> {
    let bad = || "mqtt: malformed PUBLISH".to_string();
    let topic_len = usize::from(u16::from_be_bytes([
        *body.first().ok_or_else(bad)?,
        *body.get(1).ok_or_else(bad)?,
    ]));
    let rest = body.get(2 + topic_len..).ok_or_else(bad)?;
    if (header >> 1) & 0x03 == 0 {
        return Ok((None, rest));
    }
    let id = u16::from_be_bytes([
        *rest.first().ok_or_else(bad)?,
        *rest.get(1).ok_or_else(bad)?,
    ]);
    Ok((Some(id), &rest[2..]))
}

/// Packet ids 1..=65535, cycling; never 0, which MQTT forbids.
fn packet_id(i: usize) -> u16 {
    (i % 65535 + 1) as u16
}

fn mqtt_string(out: &mut Vec<u8>, text: &[u8]) {
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text);
}

fn mqtt_packet(out: &mut Vec<u8>, header: u8, body: &[u8]) {
    out.push(header);
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        out.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
}

fn read_mqtt_packet(reader: &mut impl Read) -> Result<(u8, Vec<u8>), String> {
    let mut byte = [0u8; 1];
    let mut read_byte = |reader: &mut dyn Read| {
        reader
            .read_exact(&mut byte)
            .map(|()| byte[0])
            .map_err(|e| format!("mqtt: read: {e}"))
    };
    let header = read_byte(reader)?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = read_byte(reader)?;
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
        if shift > 21 {
            return Err("mqtt: malformed remaining length".into());
        }
    }
    let mut body = vec![0; len];
    reader
        .read_exact(&mut body)
        .map_err(|e| format!("mqtt: read: {e}"))?;
    Ok((header, body))
}

// ---------------------------------------------------------------------------------------
// Shared: connections, the producer/consumer pair, servers, tools
// ---------------------------------------------------------------------------------------

/// A client connection: buffered reads, plain writes of whole request buffers.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    protocol: &'static str,
}

impl Conn {
    fn connect(addr: SocketAddr, protocol: &'static str) -> Result<Self, String> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .map_err(|e| format!("{protocol}: cannot connect to {addr}: {e}"))?;
        let setup = |e: std::io::Error| format!("{protocol}: socket setup: {e}");
        stream.set_nodelay(true).map_err(setup)?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(setup)?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(setup)?;
        let writer = BufWriter::new(stream.try_clone().map_err(setup)?);
        Ok(Conn {
            reader: BufReader::new(stream),
            writer,
            protocol,
        })
    }

    fn send(&mut self, data: &[u8]) -> Result<(), String> {
        self.writer
            .write_all(data)
            .and_then(|()| self.writer.flush())
            .map_err(|e| format!("{}: write: {e}", self.protocol))
    }

    /// A handle that can shut the connection down from another thread.
    fn handle(&self) -> Result<TcpStream, String> {
        self.reader
            .get_ref()
            .try_clone()
            .map_err(|e| format!("{}: socket clone: {e}", self.protocol))
    }

    fn read_resp(&mut self) -> Result<Resp, String> {
        read_resp(&mut self.reader)
    }

    /// Sends one command and reads its reply; a Redis error is an `Err`.
    fn redis_call(&mut self, args: &[&[u8]]) -> Result<Resp, String> {
        let mut buffer = Vec::new();
        encode_command(&mut buffer, args);
        self.send(&buffer)?;
        match self.read_resp()? {
            Resp::Error(e) => Err(format!(
                "redis {}: {e}",
                String::from_utf8_lossy(args.first().copied().unwrap_or_default())
            )),
            reply => Ok(reply),
        }
    }

    fn read_mqtt(&mut self) -> Result<(u8, Vec<u8>), String> {
        read_mqtt_packet(&mut self.reader)
    }
}

/// What the consumer saw: per-message latencies and when it finished, ns since the clock.
struct Received {
    latencies: Vec<u64>,
    last: u64,
}

impl Received {
    fn with_capacity(count: usize) -> Self {
        Received {
            latencies: Vec::with_capacity(count),
            last: 0,
        }
    }

    /// Records the latency of a payload received at `now`.
    fn latency(&mut self, now: u64, payload: &[u8]) -> Result<(), String> {
        let digits = payload.iter().take_while(|b| b.is_ascii_digit()).count();
        let sent: u64 = std::str::from_utf8(&payload[..digits])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "payload without a send time".to_string())?;
        self.latencies.push(now.saturating_sub(sent));
        Ok(())
    }
}

/// A finished run: first write by the producer, and what the consumer saw.
struct Run {
    count: usize,
    first: u64,
    received: Received,
}

impl Run {
    fn result(mut self, name: &'static str) -> PeerResult {
        let seconds = self.received.last.saturating_sub(self.first).max(1) as f64 / 1e9;
        self.received.latencies.sort_unstable();
        let p50 = self
            .received
            .latencies
            .get(self.received.latencies.len() / 2)
            .map(|&ns| ns as f64 / 1e6);
        PeerResult {
            name,
            msgs_per_sec: self.count as f64 / seconds,
            p50_ms: p50,
        }
    }
}

/// Runs `consume` on its own thread with `consumer`, and `produce` on this one. If the
/// producer fails, the consumer's socket is shut down so that it stops at once.
fn run_pair(
    mut consumer: Conn,
    consume: impl FnOnce(&mut Conn) -> Result<Received, String> + Send + 'static,
    produce: impl FnOnce() -> Result<u64, String>,
) -> Result<Run, String> {
    let handle = consumer.handle()?;
    let thread = std::thread::spawn(move || consume(&mut consumer));
    let produced = produce();
    if produced.is_err() {
        let _ = handle.shutdown(Shutdown::Both);
    }
    let consumed = thread
        .join()
        .map_err(|_| "the consumer thread panicked".to_string())?;
    let first = produced?;
    let received = consumed?;
    Ok(Run {
        count: received.latencies.len(),
        first,
        received,
    })
}

/// The payload of one message: its send time, padded to `size` bytes.
fn payload(clock: Instant, size: usize) -> Vec<u8> {
    let mut data = format!("{:020}", nanos(clock)).into_bytes();
    if data.len() < size {
        data.resize(size, b'x');
    }
    data
}

fn nanos(clock: Instant) -> u64 {
    u64::try_from(clock.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// `0..count` in chunks of `CHUNK`.
fn chunks(count: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..count)
        .step_by(CHUNK)
        .map(move |first| first..(first + CHUNK).min(count))
}

/// A server process, killed and reaped when dropped, on every path.
struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts `command` with stdout and stderr in `log`.
    fn start(name: &'static str, mut command: Command, log: PathBuf) -> Result<Self, String> {
        let file = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err_file = file
            .try_clone()
            .map_err(|e| format!("cannot reopen {}: {e}", log.display()))?;
        // If xtask itself dies (Ctrl-C, a panic elsewhere), Drop never runs; the kernel
        // then kills the server so that it does not outlive the bench holding a port.
        // SAFETY: the closure runs between fork and exec and only calls prctl, which is
        // async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err_file)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Server { name, child, log })
    }

    /// Polls `ready` until it holds; fails if the server exits or `WAIT` passes.
    fn wait_ready(&mut self, mut ready: impl FnMut() -> bool) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}) at start:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            if ready() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "{} not ready within {WAIT:?}:\n{}",
            self.name,
            self.log_tail()
        ))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago (the listener is dropped so the server can
/// bind it; another process could take it in between, which is unlikely on a CI machine).
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

fn make_dir(path: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    Ok(path.to_path_buf())
}

/// An executable named `name` on PATH or in the usual system directories (sbin is often
/// not on a user's PATH, and mosquitto lives there).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let system = ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"];
    std::env::split_paths(&path)
        .chain(system.into_iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Peer = fn(&Path, usize, usize) -> Result<Option<PeerResult>, String>;

    /// Runs `peer` on `count` messages; skips (with a note) when the tool is absent,
    /// unless MESYNC_REQUIRE_TOOLS=1.
    fn check(peer: Peer, tool: &str, name: &str, count: usize) {
        let tmp = tempfile::tempdir().expect("temp dir");
        match peer(tmp.path(), count, 300).expect("peer run") {
            Some(result) => {
                println!("{result:?}");
                assert_eq!(result.name, name);
                assert!(result.msgs_per_sec.is_finite() && result.msgs_per_sec > 0.0);
                assert!(result.p50_ms.is_some_and(|ms| ms >= 0.0));
            }
            None if std::env::var("MESYNC_REQUIRE_TOOLS").as_deref() == Ok("1") => {
                panic!("{tool} is not installed and MESYNC_REQUIRE_TOOLS=1")
            }
            None => println!("skipped: {tool} is not installed"),
        }
    }

    #[test]
    fn redis_moves_messages() {
        check(redis, "redis-server", "redis", 2000);
    }

    #[test]
    fn mosquitto_moves_messages() {
        check(mosquitto, "mosquitto", "mosquitto", 2000);
    }

    #[test]
    fn absent_tool_is_none() {
        assert!(find_tool("surely-not-an-installed-tool-xyz").is_none());
        assert!(find_tool("sh").is_some());
    }

    #[test]
    fn mqtt_length_round_trips() {
        for len in [0, 127, 128, 16_383, 16_384, 300_000] {
            let mut packet = Vec::new();
            mqtt_packet(&mut packet, 0x30, &vec![7; len]);
            let (header, body) = read_mqtt_packet(&mut packet.as_slice()).expect("parse");
            assert_eq!((header, body.len()), (0x30, len));
        }
    }

    #[test]
    #[ignore = "full size; run with --ignored --nocapture"]
    fn full_peers() {
        check(redis, "redis-server", "redis", 20_000);
        check(mosquitto, "mosquitto", "mosquitto", 20_000);
    }
}
