//! Connections: accepting them (up to `[hub] max_connections`), the TLS handshake, serving
//! HTTP/1.1 on each, and closing them: gracefully when the hub shuts down, at once when a
//! reload no longer trusts the client certificate they were opened with, or when that
//! certificate expires.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::api::{self, Api};
use super::auth::ClientCert;
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
                serve(stream, peer, ClientCert::NotAsked, None, task).await;
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
    let accepted = tokio::select! {
        accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, generation.acceptor().accept(stream)) => accepted,
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
    serve(stream, peer, cert, Some(peer_tls), conns).await;
}

/// Serves HTTP/1.1 on one connection (plain or TLS) until it closes, the hub shuts down
/// (gracefully: requests in flight finish), or its client certificate stops being trusted
/// (at once: its requests must not be answered any more).
async fn serve<S, I>(
    io: I,
    peer: SocketAddr,
    cert: ClientCert,
    mut tls: Option<TlsPeer>,
    conns: Arc<Conns<S>>,
) where
    S: Store,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cert = Arc::new(cert);
    let api = Arc::clone(&conns.api);
    let service = service_fn(move |req| {
        let api = Arc::clone(&api);
        let cert = Arc::clone(&cert);
        async move { Ok::<_, Infallible>(api.handle(req, peer, &cert).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(api::MAX_HEAD_BYTES * 4)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut draining = false;
    loop {
        let replaced = tls.as_ref().map(|t| t.generation.replaced());
        let expires = tls.as_ref().and_then(|t| t.expires);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%peer, %err, "connection ended with an error");
                }
                return;
            }
            _ = conns.shutdown.cancelled(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = cancelled(replaced) => {
                let Some(peer_tls) = tls.as_mut() else { return };
                let next = peer_tls.tls.current();
                if !next.trusts(&peer_tls.chain) {
                    tracing::info!(%peer, "client certificate no longer trusted after a reload; connection closed");
                    return;
                }
                peer_tls.generation = next;
            }
            _ = until(expires) => {
                tracing::info!(%peer, "client certificate expired; connection closed");
                return;
            }
        }
    }
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
