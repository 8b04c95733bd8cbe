//! Connections: accepting them, the TLS handshake, serving HTTP/1.1 on each, and closing
//! them: gracefully when the hub shuts down, at once when a reload no longer trusts the
//! client certificate they were opened with, or when that certificate expires.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

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

/// Accepts connections on `listener` until shutdown.
pub async fn accept_loop<S: Store>(listener: TcpListener, conns: Arc<Conns<S>>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = conns.shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let task = Arc::clone(&conns);
        match &conns.tls {
            None => conns
                .tasks
                .spawn(serve(stream, peer, ClientCert::NotAsked, None, task)),
            Some(tls) => conns
                .tasks
                .spawn(handshake(stream, peer, Arc::clone(tls), task)),
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
