//! The hub (`mesync serve`): accepts messages over HTTP, keeps them in its [`store`] until
//! every recipient has acknowledged them, and hands each host its queue by long-poll.
//!
//! [`run`] takes listeners that are already bound (by [`bind`], or handed over by an init
//! system), so tests and `mesync demo` can run a hub on an ephemeral port.

pub mod api;
pub mod auth;
pub mod store;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::HubConfig;
use crate::error::{Error, IoContext, Result};
use crate::service;
use api::Api;
use store::{FileStore, Store};

/// A client that has not sent its request headers within this time is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often expired messages are swept from the queues.
const EXPIRY_SWEEP: Duration = Duration::from_secs(30);
/// How long shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the configured addresses.
pub fn bind(addrs: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>> {
    addrs
        .iter()
        .map(|addr| {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
            listener
                .set_nonblocking(true)
                .ctx("set non-blocking", std::path::Path::new("(listener)"))?;
            Ok(listener)
        })
        .collect()
}

/// Raises the soft limit on open files to the hard limit: every long-polling agent holds
/// one connection, and the usual soft limit of 1024 would cap the fleet near a thousand.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // Some systems report an unlimited hard limit that setrlimit refuses as a soft one.
    const CEILING: u64 = 1 << 20;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let wanted = hard.min(CEILING);
    if soft >= wanted {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
        Ok(()) => tracing::debug!(from = soft, to = wanted, "raised the open-file limit"),
        Err(err) => tracing::warn!(%err, limit = soft, "cannot raise the open-file limit"),
    }
}

/// Runs the hub on `listeners` until `shutdown` is cancelled, then drains requests in
/// flight and returns.
///
/// A message on `reloads` (the CLI sends one on SIGHUP) reads the tokens again; the other
/// hub settings take effect at the next restart.
pub async fn run(
    config: &HubConfig,
    listeners: Vec<std::net::TcpListener>,
    shutdown: CancellationToken,
    mut reloads: Option<tokio::sync::mpsc::Receiver<()>>,
) -> Result<()> {
    if config.tls_cert.is_some() || config.tls_key.is_some() || config.client_ca.is_some() {
        // Serving plain HTTP where TLS was asked for would expose what the operator meant
        // to protect: refuse to start instead.
        return Err(Error::Config(
            "[hub] tls_cert, tls_key and client_ca are not supported by this build; remove them to serve plain HTTP".into(),
        ));
    }
    raise_fd_limit();
    let data_dir = config.data_dir.clone();
    let max_pending = usize::try_from(config.max_pending_per_host).unwrap_or(usize::MAX);
    let store = tokio::task::spawn_blocking(move || FileStore::open(&data_dir, max_pending))
        .await
        .map_err(|e| Error::Invalid(format!("store start-up failed: {e}")))??;
    let tokens = auth::Tokens::load(&config.data_dir)?;
    if tokens.is_open() {
        tracing::warn!(
            "open mode: no tokens are configured, so anyone who can reach this hub can \
             send, read and acknowledge any host's messages; `mesync token issue HOST` ends it"
        );
    }
    let api = Arc::new(Api {
        store,
        tokens,
        polls: Default::default(),
        max_message_bytes: usize::try_from(config.max_message_bytes).unwrap_or(usize::MAX),
        shutdown: shutdown.clone(),
    });

    let graceful = Arc::new(GracefulShutdown::new());
    let mut accept_loops = tokio::task::JoinSet::new();
    for listener in listeners {
        let listener = TcpListener::from_std(listener)
            .ctx("register listener", std::path::Path::new("(listener)"))?;
        let addr = listener
            .local_addr()
            .ctx("read listener address", std::path::Path::new("(listener)"))?;
        tracing::info!("listening on http://{addr}");
        accept_loops.spawn(accept_loop(
            listener,
            Arc::clone(&api),
            Arc::clone(&graceful),
            shutdown.clone(),
        ));
    }
    let sweeper = tokio::spawn(expiry_loop(Arc::clone(&api), shutdown.clone()));
    service::ready(&status_line(&api.store));
    let reporter = tokio::spawn(report_loop(Arc::clone(&api), shutdown.clone()));

    loop {
        tokio::select! {
            reload = async { reloads.as_mut()?.recv().await }, if reloads.is_some() => match reload {
                Some(()) => {
                    service::reloading();
                    api.tokens.refresh();
                    tracing::info!("tokens reloaded; other settings take effect at the next restart");
                    service::ready(&status_line(&api.store));
                }
                None => reloads = None,
            },
            _ = shutdown.cancelled() => break,
        }
    }
    service::stopping();
    tracing::info!("shutting down: no new connections, draining requests in flight");
    while accept_loops.join_next().await.is_some() {}
    let _ = sweeper.await;
    let _ = reporter.await;
    if let Ok(graceful) = Arc::try_unwrap(graceful)
        && tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
            .await
            .is_err()
    {
        tracing::warn!("some connections did not finish in time");
    }
    tracing::info!("hub stopped");
    Ok(())
}

async fn accept_loop<S: Store>(
    listener: TcpListener,
    api: Arc<Api<S>>,
    graceful: Arc<GracefulShutdown>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
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
        let api = Arc::clone(&api);
        let service = service_fn(move |req| {
            let api = Arc::clone(&api);
            async move { Ok::<_, Infallible>(api.handle(req, peer).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(api::MAX_HEAD_BYTES * 4)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%peer, %err, "connection ended with an error");
            }
        });
    }
}

/// How often the status line is refreshed when there is no watchdog to keep pace with.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Keeps the service manager informed: a status line, and WATCHDOG=1 at half the watchdog
/// interval. It runs on the same runtime as the requests, so a wedged runtime stops it.
async fn report_loop<S: Store>(api: Arc<Api<S>>, shutdown: CancellationToken) {
    let watchdog = service::watchdog_interval();
    let every = watchdog.map_or(STATUS_EVERY, |w| w.min(STATUS_EVERY));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        if watchdog.is_some() {
            service::watchdog();
        }
        service::status(&status_line(&api.store));
    }
}

/// "12 hosts, 30 pending", for `systemctl status`.
fn status_line<S: Store>(store: &S) -> String {
    let hosts = store.hosts();
    let pending: usize = hosts.iter().map(|h| h.pending).sum();
    format!("{} hosts, {pending} messages pending", hosts.len())
}

async fn expiry_loop<S: Store>(api: Arc<Api<S>>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EXPIRY_SWEEP) => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(err) = api.store.expire().await {
            tracing::warn!(%err, "expiry sweep failed");
        }
    }
}
