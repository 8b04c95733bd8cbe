//! The hub (`mesync serve`): accepts messages over HTTP, keeps them in its [`store`] until
//! every recipient has acknowledged them, and hands each host its queue by long-poll.
//!
//! [`run`] takes listeners that are already bound (by [`bind`], or handed over by an init
//! system), so tests and `mesync demo` can run a hub on an ephemeral port.

pub mod api;
pub mod auth;
pub mod conn;
pub mod park;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HubConfig;
use crate::error::{Error, IoContext, Result};
use crate::service;
use crate::tls::{ServerFiles, ServerTls};
use api::Api;
use conn::Conns;
use store::{FileStore, Store};

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
/// A configuration on `reloads` (the CLI reads the config file again on SIGHUP) is put in
/// force by [`apply_reload`].
pub async fn run(
    config: &HubConfig,
    listeners: Vec<std::net::TcpListener>,
    shutdown: CancellationToken,
    mut reloads: Option<tokio::sync::mpsc::Receiver<HubConfig>>,
) -> Result<()> {
    let tls = server_files(config)?
        .map(ServerTls::load)
        .transpose()?
        .map(Arc::new);
    raise_fd_limit();
    let data_dir = config.data_dir.clone();
    let max_pending = usize::try_from(config.max_pending_per_host).unwrap_or(usize::MAX);
    // The commit thread is the one loop of the hub that can hang by itself (on a stuck
    // disk); the report loop, on the runtime, answers for the rest.
    let liveness = service::Liveness::default();
    let heartbeat = liveness.heartbeat("commit thread");
    let store =
        tokio::task::spawn_blocking(move || FileStore::open(&data_dir, max_pending, heartbeat))
            .await
            .map_err(|e| Error::Invalid(format!("store start-up failed: {e}")))??;
    let tokens = auth::Tokens::load(&config.data_dir)?;
    let asks_certs = tls.as_ref().is_some_and(|tls| tls.asks_client_certs());
    if asks_certs {
        tracing::info!(
            "client certificates required: each caller is the host its certificate names"
        );
    } else if tokens.is_open() {
        tracing::warn!(
            "open mode: no tokens are configured, so anyone who can reach this hub can \
             send, read and acknowledge any host's messages; `mesync token issue HOST` ends it"
        );
    }
    let api = Arc::new(Api {
        store,
        tokens,
        polls: Default::default(),
        tls_failures: Default::default(),
        connections: conn::ConnectionCap::new(config.max_connections),
        max_message_bytes: usize::try_from(config.max_message_bytes)
            .unwrap_or(usize::MAX)
            .into(),
        shutdown: shutdown.clone(),
    });

    let conns = Arc::new(Conns {
        api: Arc::clone(&api),
        tls: tls.clone(),
        tasks: TaskTracker::new(),
        shutdown: shutdown.clone(),
    });
    let mut accept_loops = tokio::task::JoinSet::new();
    for listener in listeners {
        let listener = TcpListener::from_std(listener)
            .ctx("register listener", std::path::Path::new("(listener)"))?;
        let addr = listener
            .local_addr()
            .ctx("read listener address", std::path::Path::new("(listener)"))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!("listening on {scheme}://{addr}");
        accept_loops.spawn(conn::accept_loop(listener, Arc::clone(&conns)));
    }
    let sweeper = tokio::spawn(expiry_loop(Arc::clone(&api), shutdown.clone()));
    service::ready(&status_line(&api.store));
    let reported = Arc::clone(&api);
    let reporter = tokio::spawn(service::report(liveness, shutdown.clone(), move || {
        status_line(&reported.store)
    }));

    loop {
        tokio::select! {
            reload = async { reloads.as_mut()?.recv().await }, if reloads.is_some() => match reload {
                Some(new) => {
                    service::reloading();
                    apply_reload(&api, tls.as_ref(), config, new).await;
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
    conns.tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, conns.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = conns.tasks.len(),
            "some connections did not finish in time"
        );
    }
    tracing::info!("hub stopped");
    Ok(())
}

/// The TLS files `[hub] tls_cert`, `tls_key` and `client_ca` name, if any.
fn server_files(config: &HubConfig) -> Result<Option<ServerFiles>> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(ServerFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: config.client_ca.clone(),
        })),
        (None, None) if config.client_ca.is_some() => Err(Error::Config(
            "[hub] client_ca needs tls_cert and tls_key: client certificates exist only over TLS"
                .into(),
        )),
        (None, None) => Ok(None),
        _ => Err(Error::Config(
            "[hub] tls_cert and tls_key must be set together".into(),
        )),
    }
}

/// Puts a reloaded configuration in force, without dropping connections: the tokens and
/// the TLS files are read again (even under the same paths, so renewed certificates are
/// picked up), `max_message_bytes` and `max_pending_per_host` apply to the next request,
/// `max_connections` to the next connection.
/// What cannot change while running (`listen`, `data_dir`, turning TLS or client
/// certificates on or off) is logged and waits for a restart.
async fn apply_reload<S: Store>(
    api: &Api<S>,
    tls: Option<&Arc<ServerTls>>,
    config: &HubConfig,
    new: HubConfig,
) {
    api.tokens.reload();
    if new.listen != config.listen || new.data_dir != config.data_dir {
        tracing::warn!("[hub] listen and data_dir changes take effect at the next restart");
    }
    let limit = usize::try_from(new.max_message_bytes).unwrap_or(usize::MAX);
    api.max_message_bytes.store(limit, Ordering::Relaxed);
    api.store
        .set_max_pending_per_host(usize::try_from(new.max_pending_per_host).unwrap_or(usize::MAX));
    api.connections.set_max(new.max_connections);
    let files = match (tls, server_files(&new)) {
        (Some(tls), Ok(Some(files))) => Some((Arc::clone(tls), files)),
        (None, Ok(None)) => None,
        (_, Err(err)) => {
            tracing::error!(%err, "TLS settings not reloaded; keeping the ones in use");
            None
        }
        _ => {
            tracing::warn!("turning TLS on or off takes effect at the next restart");
            None
        }
    };
    if let Some((tls, files)) = files {
        // Reading and parsing files: off the threads that serve requests.
        let reloaded = tokio::task::spawn_blocking(move || tls.reload(files))
            .await
            .unwrap_or_else(|e| Err(Error::Config(format!("TLS reload failed: {e}"))));
        match reloaded {
            Ok(()) => tracing::info!("TLS certificate and key reloaded"),
            Err(err) => {
                tracing::error!(%err, "TLS files not reloaded; keeping the ones in use")
            }
        }
    }
    tracing::info!(
        max_message_bytes = new.max_message_bytes,
        max_pending_per_host = new.max_pending_per_host,
        max_connections = new.max_connections,
        "configuration reloaded"
    );
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
