//! Connections: accepting them (up to `[hub] max_connections`), the TLS handshake, serving
//! HTTP/1.1 on each (with hyper, except for long-polls parked outside it while they wait:
//! see `park`), and closing them: gracefully when the hub shuts down, at once when a
//! reload no longer trusts the client certificate they were opened with, or when that
//! certificate expires.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::api::{self, Api, LongPoll};
use super::auth::ClientCert;
use super::park::{self, OverTcp, Parking, Tracked};
use super::store::Store;
use crate::tls::{self, Generation, ServerTls};

/// A client that has not sent its request headers within this time is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that has not finished the TLS handshake within this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// File descriptors kept back from connections for the store, the logs and the TLS files,
/// so that a flood of connections cannot make a commit fail.
const RESERVED_FDS: u64 = 256;
/// While connections are refused, at most one warning per this interval.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// What every connection task shares.
pub struct Conns<S> {
    pub api: Arc<Api<S>>,
    pub tls: Option<Arc<ServerTls>>,
    /// Every connection task, so that shutdown can wait for them.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

/// The TLS side of one connection: the configuration it was accepted under and the
/// client certificate chain it presented.
struct TlsPeer {
    tls: Arc<ServerTls>,
    generation: Arc<Generation>,
    chain: Vec<CertificateDer<'static>>,
    expires: Option<SystemTime>,
}

/// The cap on open connections. Past it a new connection is closed as soon as it is
/// accepted, before its TLS handshake: a flood of connections then costs neither the file
/// descriptors the store needs nor memory, and the agents it turns away retry with backoff
/// as they do for any transport error. Accepting and closing, rather than leaving
/// connections in the kernel's backlog, gives the turned-away client an answer at once.
#[derive(Debug, Default)]
pub struct ConnectionCap {
    open: AtomicUsize,
    max: AtomicUsize,
    refused: AtomicU64,
    warned: Mutex<Option<Instant>>,
}

/// One admitted connection: its slot is given back when it is dropped.
pub struct Slot(Arc<ConnectionCap>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionCap {
    /// A cap of `configured` connections, lowered to what the open-file limit allows.
    pub fn new(configured: u64) -> Arc<ConnectionCap> {
        let cap = Arc::new(ConnectionCap::default());
        cap.set_max(configured);
        cap
    }

    /// Puts a new `[hub] max_connections` in force; connections open beyond it stay open,
    /// and new ones wait for the count to fall below it.
    pub fn set_max(&self, configured: u64) {
        let fds = fd_budget();
        if configured > fds {
            tracing::warn!(
                max_connections = configured,
                allowed = fds,
                "[hub] max_connections is above what the open-file limit allows; using the lower figure"
            );
        }
        let max = usize::try_from(configured.min(fds)).unwrap_or(usize::MAX);
        self.max.store(max, Ordering::Relaxed);
    }

    /// A slot for one more connection, or `None` at the cap (counted, and logged at most
    /// once per [`REFUSAL_WARNING_EVERY`]).
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max.load(Ordering::Relaxed);
        let admitted = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < max).then_some(open + 1)
            })
            .is_ok();
        if admitted {
            return Some(Slot(Arc::clone(self)));
        }
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.is_none_or(|at| at.elapsed() >= REFUSAL_WARNING_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(
                max_connections = max,
                refused_so_far = refused,
                "connection limit reached: new connections are closed until some end \
                 (raise [hub] max_connections if the fleet needs more)"
            );
        }
        None
    }

    /// The gauge and the counter for /metrics.
    pub fn metrics(&self) -> String {
        format!(
            "# HELP mesync_connections_open Connections open at the hub.\n\
             # TYPE mesync_connections_open gauge\nmesync_connections_open {}\n\
             # HELP mesync_connections_refused_total Connections closed at once because \
             max_connections were open.\n\
             # TYPE mesync_connections_refused_total counter\n\
             mesync_connections_refused_total {}\n",
            self.open.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// How many connections the open-file limit leaves room for.
fn fd_budget() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => soft.saturating_sub(RESERVED_FDS).max(1),
        Err(_) => u64::MAX,
    }
}

/// Accepts connections on `listener` until shutdown.
pub async fn accept_loop<S: Store>(listener: TcpListener, conns: Arc<Conns<S>>) {
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = conns.shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning, and
                // say so once, not ten times a second.
                if !failing {
                    tracing::error!(%err, "cannot accept connections; retrying every 100 ms");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if std::mem::take(&mut failing) {
            tracing::info!("accepting connections again");
        }
        let Some(slot) = conns.api.connections.admit() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let task = Arc::clone(&conns);
        match &conns.tls {
            None => conns.tasks.spawn(async move {
                serve(
                    Stream::Plain(stream),
                    peer,
                    ClientCert::NotAsked,
                    None,
                    task,
                )
                .await;
                drop(slot);
            }),
            Some(tls) => {
                let tls = Arc::clone(tls);
                conns.tasks.spawn(async move {
                    handshake(stream, peer, tls, task).await;
                    drop(slot);
                })
            }
        };
    }
}

/// The TLS handshake, then HTTP over it.
async fn handshake<S: Store>(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Arc<ServerTls>,
    conns: Arc<Conns<S>>,
) {
    let generation = tls.current();
    // Boxed, and the stream with it: the handshake's state is large, and would otherwise
    // stay part of the connection's task (parked polls included) for as long as it lives.
    let accept = Box::pin(async {
        let stream = generation.acceptor().accept(stream).await?;
        Ok::<_, std::io::Error>(Box::new(stream))
    });
    let accepted = tokio::select! {
        accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept) => accepted,
        _ = conns.shutdown.cancelled() => return,
    };
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            // Debug, not info: anyone can make handshakes fail, and the journal must not
            // fill with them. The counter on /metrics shows them.
            conns.api.tls_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, %err, "TLS handshake failed");
            return;
        }
        Err(_) => {
            conns.api.tls_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "TLS handshake not finished in time; connection closed");
            return;
        }
    };
    let chain: Vec<CertificateDer<'static>> = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|chain| chain.to_vec())
        .unwrap_or_default();
    let cert = if !tls.asks_client_certs() {
        ClientCert::NotAsked
    } else {
        match chain.first() {
            None => ClientCert::Missing,
            Some(end_entity) => match tls::host_of_certificate(end_entity) {
                Ok(host) => ClientCert::Host(host),
                Err(why) => ClientCert::Unusable(why),
            },
        }
    };
    let expires = chain.first().and_then(tls::expiry);
    let peer_tls = TlsPeer {
        tls,
        generation,
        chain,
        expires,
    };
    serve(Stream::Tls(stream), peer, cert, Some(peer_tls), conns).await;
}

/// A connection's stream: TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl OverTcp for Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What ends or changes a connection from outside.
enum Event {
    /// The hub shuts down: requests in flight finish, then the connection closes.
    Shutdown,
    /// The connection must close at once (logged).
    Close,
}

/// The outside events of one connection: shutdown, and for TLS a reload that may no
/// longer trust its client certificate, and that certificate's expiry.
struct Watch {
    tls: Option<TlsPeer>,
    peer: SocketAddr,
    draining: bool,
}

impl Watch {
    /// The next event. Dropping the future loses nothing.
    async fn next(&mut self, shutdown: &CancellationToken) -> Event {
        loop {
            let replaced = self.tls.as_ref().map(|t| t.generation.replaced());
            let expires = self.tls.as_ref().and_then(|t| t.expires);
            tokio::select! {
                _ = shutdown.cancelled(), if !self.draining => {
                    self.draining = true;
                    return Event::Shutdown;
                }
                _ = cancelled(replaced) => {
                    let Some(peer_tls) = self.tls.as_mut() else { return Event::Close };
                    let next = peer_tls.tls.current();
                    if !next.trusts(&peer_tls.chain) {
                        tracing::info!(peer = %self.peer, "client certificate no longer trusted after a reload; connection closed");
                        return Event::Close;
                    }
                    peer_tls.generation = next;
                }
                _ = until(expires) => {
                    tracing::info!(peer = %self.peer, "client certificate expired; connection closed");
                    return Event::Close;
                }
            }
        }
    }
}

/// Serves HTTP/1.1 on one connection (plain or TLS) until it closes, the hub shuts down
/// (gracefully: requests in flight finish, parked long-polls are answered), or its client
/// certificate stops being trusted (at once: its requests must not be answered any more).
///
/// hyper serves the requests in rounds: a round ends when a long-poll is taken out of it
/// to wait parked, and the next round begins with the request after that poll's answer.
async fn serve<S: Store>(
    stream: Stream,
    peer: SocketAddr,
    cert: ClientCert,
    tls: Option<TlsPeer>,
    conns: Arc<Conns<S>>,
) {
    let cert = Arc::new(cert);
    let parking = Arc::new(Parking::default());
    let mut watch = Watch {
        tls,
        peer,
        draining: false,
    };
    let mut io = Tracked::new(stream, Arc::clone(&parking));
    loop {
        let Some((poll, back)) = hyper_round(io, peer, &cert, &parking, &mut watch, &conns).await
        else {
            return;
        };
        io = back;
        if !parked(poll, &mut io, &mut watch, &conns).await {
            return;
        }
    }
}

/// Waits out a long-poll taken from hyper, and answers it; whether the connection stays
/// open for the next request.
async fn parked<S: Store>(
    poll: LongPoll,
    io: &mut Tracked<Stream>,
    watch: &mut Watch,
    conns: &Conns<S>,
) -> bool {
    let answer = if watch.draining {
        // Shutdown came while hyper still held the poll: it is answered at once.
        api::messages_answer(&[])
    } else {
        tokio::select! {
            answer = park::wait(&conns.api, &poll, io) => match answer {
                Some(answer) => answer,
                None => return false,
            },
            event = watch.next(&conns.shutdown) => match event {
                Event::Shutdown => api::messages_answer(&[]),
                Event::Close => return false,
            },
        }
    };
    let keep_alive = poll.keep_alive && !watch.draining;
    // Boxed: its state is needed only while it runs, not while the poll waits.
    let written = Box::pin(park::write_answer(io, answer, keep_alive)).await;
    // The slot is given back once the answer is out.
    drop(poll);
    if let Err(err) = written {
        tracing::debug!(peer = %watch.peer, %err, "connection ended with an error");
        return false;
    }
    if !keep_alive {
        let _ = io.shutdown().await;
    }
    keep_alive
}

/// hyper serves requests on `io` until the connection ends (`None`) or a long-poll is
/// taken out to be parked: then that poll, and the stream back from hyper.
async fn hyper_round<S: Store>(
    io: Tracked<Stream>,
    peer: SocketAddr,
    cert: &Arc<ClientCert>,
    parking: &Arc<Parking>,
    watch: &mut Watch,
    conns: &Conns<S>,
) -> Option<(LongPoll, Tracked<Stream>)> {
    let api = Arc::clone(&conns.api);
    let cert = Arc::clone(cert);
    let offers = Arc::clone(parking);
    let service = service_fn(move |req| {
        let api = Arc::clone(&api);
        let cert = Arc::clone(&cert);
        let offers = Arc::clone(&offers);
        async move { Ok::<_, Infallible>(api.handle(req, peer, &cert, &offers.offer).await) }
    });
    // Boxed, so that the connection task is small while a poll is parked.
    let mut conn = Box::new(
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(api::MAX_HEAD_BYTES * 4)
            .serve_connection(TokioIo::new(io), service),
    );
    if watch.draining {
        Pin::new(conn.as_mut()).graceful_shutdown();
    }
    let poll = loop {
        // hyper is polled, then the offer looked at, in one go: an offer made while hyper
        // runs a handler is seen as soon as hyper returns.
        let round = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = Pin::new(conn.as_mut()).poll(cx) {
                return Poll::Ready(Err(result));
            }
            match parking.take() {
                Some(poll) => Poll::Ready(Ok(poll)),
                None => Poll::Pending,
            }
        });
        tokio::select! {
            round = round => match round {
                Ok(poll) => break poll,
                Err(result) => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, %err, "connection ended with an error");
                    }
                    return None;
                }
            },
            event = watch.next(&conns.shutdown) => match event {
                Event::Shutdown => Pin::new(conn.as_mut()).graceful_shutdown(),
                Event::Close => return None,
            },
        }
    };
    let parts = conn.into_parts();
    let mut io = parts.io.into_inner();
    io.unread(parts.read_buf);
    Some((poll, io))
}

/// Waits until `token` is cancelled; forever when there is none.
async fn cancelled(token: Option<CancellationToken>) {
    match token {
        Some(token) => token.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Waits until the wall clock reaches `when`; forever when there is no such time.
async fn until(when: Option<SystemTime>) {
    let Some(when) = when else {
        return std::future::pending().await;
    };
    // A certificate's validity is wall-clock time; sleeping in steps notices a clock that
    // was set forward.
    loop {
        match when.duration_since(SystemTime::now()) {
            Ok(left) if !left.is_zero() => {
                tokio::time::sleep(left.min(Duration::from_secs(60))).await
            }
            _ => return,
        }
    }
}
