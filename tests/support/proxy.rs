//! A fault-injecting TCP proxy for the partition tests.
//!
//! [`Proxy::start`] listens on `127.0.0.1:0` and forwards every connection it accepts to one
//! target address (a hub). The test points an agent's `MESYNC_SERVER_URL` at
//! [`Proxy::url`] and then breaks the link with [`Proxy::set_mode`]:
//!
//! - [`Mode::Pass`]: bytes are forwarded as they come, FIN and RST are passed on.
//! - [`Mode::Blackhole`]: a partition that neither side is told about. Connections are still
//!   accepted and kept open, every byte is silently dropped in both directions, and the
//!   proxy never sends a FIN or an RST to the client (not even when the target closes its
//!   side). Only the client's own timeouts can notice. Switching to it stalls the
//!   connections already open too, which is how a long-poll in flight gets cut.
//! - [`Mode::Reset`]: every open connection, and every new one, is reset (`SO_LINGER` 0,
//!   then close, which sends an RST instead of a FIN).
//! - [`Mode::Delay`]: bytes are forwarded after the given extra latency, in each direction.
//!
//! A connection that has lived through a black hole stays black-holed for the rest of its
//! life, even after the mode goes back to [`Mode::Pass`]: like a NAT entry that expired or a
//! peer that rebooted, a half-open connection never recovers, the client has to give it up
//! and connect again. Bytes dropped in the hole are not replayed (replaying part of an HTTP
//! stream would only garble it). New connections made after the switch back work normally.
//!
//! Threads and `std::net` only, plus one `setsockopt(SO_LINGER)` through `libc` (std's
//! `set_linger` is not stable). One accept thread and at most two threads per connection;
//! every socket has a short read and write timeout so each thread notices the shutdown,
//! and dropping the [`Proxy`] stops and joins all of them.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often every thread looks at the shutdown flag and at its connection's state.
const TICK: Duration = Duration::from_millis(50);
/// Longest wait for the target to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest read forwarded at once.
const CHUNK: usize = 64 * 1024;

/// What the proxy does to the traffic; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything at once.
    Pass,
    /// Accept, keep open, drop every byte both ways, never close towards the client.
    Blackhole,
    /// Reset every connection, open or new.
    Reset,
    /// Forward everything after this extra latency, each way.
    Delay(Duration),
}

/// A running proxy; stopped, with all its threads joined, when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// What the test and every thread of the proxy share.
struct Shared {
    target: SocketAddr,
    stop: AtomicBool,
    /// The mode and the open connections, under one lock: a connection registers and reads
    /// the mode in one step, so it never misses a switch.
    state: Mutex<State>,
    /// Threads still to join (all but the acceptor).
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Threads of this proxy still running, the acceptor included.
    running: Arc<AtomicUsize>,
    accepted: AtomicU64,
    resets: AtomicU64,
    dropped_bytes: AtomicU64,
}

struct State {
    mode: Mode,
    conns: Vec<Weak<Conn>>,
}

/// One proxied connection. Its sockets close when the last thread using it lets go.
struct Conn {
    client: TcpStream,
    /// `None` when the connection was accepted inside a black hole (never forwarded).
    upstream: Option<TcpStream>,
    /// Lived through a black hole: drops everything until it closes.
    poisoned: AtomicBool,
    /// Reset: both sockets have `SO_LINGER` 0 and the threads are letting go.
    reset: AtomicBool,
    /// Over: the threads are letting go (a plain close).
    closed: AtomicBool,
}

impl Conn {
    fn over(&self) -> bool {
        self.reset.load(Ordering::SeqCst) || self.closed.load(Ordering::SeqCst)
    }

    fn poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// Sends an RST on both sides once the threads drop their handles.
    fn reset(&self, shared: &Shared) {
        if !self.reset.swap(true, Ordering::SeqCst) {
            set_linger_zero(&self.client);
            if let Some(up) = &self.upstream {
                set_linger_zero(up);
            }
            shared.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn apply(&self, mode: Mode, shared: &Shared) {
        match mode {
            Mode::Blackhole => self.poisoned.store(true, Ordering::SeqCst),
            Mode::Reset => self.reset(shared),
            Mode::Pass | Mode::Delay(_) => {}
        }
    }
}

impl Proxy {
    /// A proxy on `127.0.0.1:0` forwarding to `target` (`host:port`), in [`Mode::Pass`].
    pub fn start(target: &str) -> Proxy {
        let target = target
            .to_socket_addrs()
            .unwrap_or_else(|e| panic!("proxy target {target}: {e}"))
            .next()
            .unwrap_or_else(|| panic!("proxy target {target}: no address"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("proxy: non-blocking listener");
        let addr = listener.local_addr().expect("proxy: local_addr");
        let shared = Arc::new(Shared {
            target,
            stop: AtomicBool::new(false),
            state: Mutex::new(State {
                mode: Mode::Pass,
                conns: Vec::new(),
            }),
            threads: Mutex::new(Vec::new()),
            running: Arc::new(AtomicUsize::new(0)),
            accepted: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
        });
        let acceptor = {
            let worker = Arc::clone(&shared);
            let running = Running::enter(&shared.running);
            thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || {
                    let _running = running;
                    accept_loop(listener, worker)
                })
                .expect("proxy: spawn the accept thread")
        };
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `127.0.0.1:port` it listens on.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:port`, for `MESYNC_SERVER_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches the mode; it applies at once to the connections already open too.
    pub fn set_mode(&self, mode: Mode) {
        let mut state = self.shared.state();
        state.mode = mode;
        state.conns.retain(|c| c.strong_count() > 0);
        for conn in state.conns.iter().filter_map(Weak::upgrade) {
            conn.apply(mode, &self.shared);
        }
    }

    pub fn mode(&self) -> Mode {
        self.shared.state().mode
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections reset by the proxy so far (by [`Mode::Reset`] or because the target
    /// refused or reset them).
    pub fn resets(&self) -> u64 {
        self.shared.resets.load(Ordering::SeqCst)
    }

    /// Bytes swallowed by black holes so far, both directions.
    pub fn dropped_bytes(&self) -> u64 {
        self.shared.dropped_bytes.load(Ordering::SeqCst)
    }

    /// A count of this proxy's threads still running, which outlives the proxy: zero once
    /// it is dropped, since dropping joins them all.
    pub fn running_threads(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.shared.running)
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        let mut state = self.shared.state();
        state.conns.retain(|c| c.strong_count() > 0);
        state.conns.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "----- proxy {} -> {}: mode {:?}, {} connections accepted, {} open, \
                 {} reset, {} bytes dropped -----",
                self.addr,
                self.shared.target,
                self.mode(),
                self.accepted(),
                self.open_connections(),
                self.resets(),
                self.dropped_bytes()
            );
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        // A connection thread may add the thread of its second direction before it ends,
        // so join until nothing is left. Bounded: nothing new is accepted any more.
        for _ in 0..1000 {
            let batch: Vec<JoinHandle<()>> = std::mem::take(&mut *self.shared.threads());
            if batch.is_empty() {
                break;
            }
            for handle in batch {
                let _ = handle.join();
            }
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn spawn(self: &Arc<Self>, name: &str, f: impl FnOnce() + Send + 'static) {
        let running = Running::enter(&self.running);
        let spawned = thread::Builder::new().name(name.into()).spawn(move || {
            let _running = running;
            f()
        });
        match spawned {
            Ok(handle) => {
                let mut threads = self.threads();
                threads.retain(|h| !h.is_finished());
                threads.push(handle);
            }
            Err(e) => eprintln!("proxy: cannot spawn a thread: {e}"),
        }
    }

    /// Registers `conn` and applies the current mode to it, in one step.
    fn register(&self, conn: &Arc<Conn>) {
        let mut state = self.state();
        state.conns.retain(|c| c.strong_count() > 0);
        state.conns.push(Arc::downgrade(conn));
        conn.apply(state.mode, self);
    }

    fn extra_latency(&self) -> Duration {
        match self.state().mode {
            Mode::Delay(d) => d,
            _ => Duration::ZERO,
        }
    }
}

/// Accepts until the proxy is dropped (the listener is non-blocking, polled every tick).
fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stopping() {
        match listener.accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                if shared.state().mode == Mode::Reset {
                    set_linger_zero(&client);
                    shared.resets.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let worker = Arc::clone(&shared);
                shared.spawn("proxy-conn", move || serve(client, worker));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                // Such as EMFILE: back off instead of spinning.
                eprintln!("proxy: accept: {e}");
                thread::sleep(TICK);
            }
        }
    }
}

/// One connection: connects to the target (unless black-holed), then forwards the client's
/// bytes here while a second thread forwards the answers.
fn serve(client: TcpStream, shared: Arc<Shared>) {
    let blackholed = shared.state().mode == Mode::Blackhole;
    let upstream = if blackholed {
        None
    } else {
        match TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT) {
            Ok(up) => Some(up),
            Err(_) => {
                // The target is down: the client sees a reset, as it would without us.
                set_linger_zero(&client);
                shared.resets.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    };
    for s in std::iter::once(&client).chain(upstream.as_ref()) {
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(TICK));
        let _ = s.set_write_timeout(Some(TICK));
    }
    let conn = Arc::new(Conn {
        client,
        upstream,
        poisoned: AtomicBool::new(blackholed),
        reset: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    });
    shared.register(&conn);
    if shared.stopping() {
        return;
    }
    if conn.upstream.is_some() {
        let back = Arc::clone(&conn);
        let worker = Arc::clone(&shared);
        shared.spawn("proxy-down", move || pump(back, Direction::Down, worker));
    }
    pump(conn, Direction::Up, shared);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to target.
    Up,
    /// Target to client.
    Down,
}

/// Forwards one direction of `conn` until it ends, the connection is reset or closed, or
/// the proxy stops. Bytes wait in `pending` until their due time (the read time plus the
/// extra latency of the mode then).
fn pump(conn: Arc<Conn>, dir: Direction, shared: Arc<Shared>) {
    let (src, dst) = match (dir, conn.upstream.as_ref()) {
        (Direction::Up, up) => (&conn.client, up),
        (Direction::Down, Some(up)) => (up, Some(&conn.client)),
        (Direction::Down, None) => return,
    };
    let mut pending: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; CHUNK];
    let mut src_done = false;
    while !shared.stopping() && !conn.over() {
        if conn.poisoned() && !pending.is_empty() {
            let n: usize = pending.iter().map(|(_, b)| b.len()).sum();
            shared.dropped_bytes.fetch_add(n as u64, Ordering::SeqCst);
            pending.clear();
        }
        let now = Instant::now();
        let until_due = pending
            .front()
            .map(|(due, _)| due.saturating_duration_since(now))
            .unwrap_or(TICK);
        let wait = until_due.clamp(Duration::from_millis(1), TICK);

        if src_done {
            thread::sleep(wait);
        } else {
            let _ = src.set_read_timeout(Some(wait));
            match (&*src).read(&mut buf) {
                Ok(0) => src_done = true,
                Ok(n) => {
                    if conn.poisoned() || dst.is_none() {
                        shared.dropped_bytes.fetch_add(n as u64, Ordering::SeqCst);
                    } else {
                        let due = Instant::now() + shared.extra_latency();
                        pending.push_back((due, buf[..n].to_vec()));
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(_) => {
                    // The source reset or failed. Inside a black hole nobody is told (the
                    // client's socket stays open as long as the client keeps it); otherwise
                    // the other side gets the reset too.
                    if !conn.poisoned() {
                        conn.reset(&shared);
                    } else if dir == Direction::Up {
                        conn.closed.store(true, Ordering::SeqCst);
                    }
                    return;
                }
            }
        }

        if conn.poisoned() {
            if src_done {
                match dir {
                    // The client hung up: nothing left to keep open.
                    Direction::Up => conn.closed.store(true, Ordering::SeqCst),
                    // The target hung up: the client must not learn it; the other thread
                    // keeps the client's socket open.
                    Direction::Down => {}
                }
                return;
            }
            continue;
        }

        let Some(dst) = dst else { continue };
        while pending
            .front()
            .is_some_and(|(due, _)| *due <= Instant::now())
        {
            let (_, chunk) = pending.pop_front().expect("a pending chunk");
            if write_bounded(dst, &chunk, &conn, &shared).is_err() {
                if !shared.stopping() && !conn.over() && !conn.poisoned() {
                    conn.reset(&shared);
                }
                return;
            }
            if conn.poisoned() {
                break;
            }
        }
        if src_done && pending.is_empty() {
            // Pass the FIN on; the other direction goes on until its own end.
            let _ = dst.shutdown(Shutdown::Write);
            return;
        }
    }
}

/// Writes all of `data`, giving up when the connection or the proxy ends (the socket's
/// write timeout is one tick, so a peer that reads nothing does not hold us).
fn write_bounded(
    dst: &TcpStream,
    data: &[u8],
    conn: &Conn,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut written = 0;
    while written < data.len() {
        if shared.stopping() || conn.over() {
            return Err(ErrorKind::ConnectionAborted.into());
        }
        if conn.poisoned() {
            let left = (data.len() - written) as u64;
            shared.dropped_bytes.fetch_add(left, Ordering::SeqCst);
            return Ok(());
        }
        match (&*dst).write(&data[written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Counts a thread as running from its spawn until it ends (also by a panic).
struct Running(Arc<AtomicUsize>);

impl Running {
    fn enter(count: &Arc<AtomicUsize>) -> Running {
        count.fetch_add(1, Ordering::SeqCst);
        Running(Arc::clone(count))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// `SO_LINGER` with a zero timeout: the close that follows sends an RST, not a FIN.
fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid open socket, and a pointer to a `linger` that lives through the call,
    // with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        eprintln!(
            "proxy: setsockopt(SO_LINGER): {}",
            std::io::Error::last_os_error()
        );
    }
}
