//! The agent (`mesync start`): sends `outbox/` to the hub, writes what the hub has for this
//! host into `inbox/`, runs hooks, and keeps the queues tidy.
//!
//! Four loops share an [`Agent`] and one shutdown token:
//! - [`outbox`]: woken by a file watcher on `outbox/` (and at least every `poll_interval`),
//!   sends files in priority order, in batches, backing off while the hub is unreachable;
//! - [`inbox`]: long-polls the hub, writes each pulled batch with one group commit, then acks;
//! - [`runner`]: runs the hooks of delivered messages one at a time, in delivery order;
//! - housekeeping (here): purges `sent/` after `sent_ttl`, removes crash debris, writes the
//!   status file that `mesync status` reads.
//!
//! The first three show on a [`service::Heartbeat`] that they are alive; under a systemd
//! watchdog, WATCHDOG=1 is sent only while they are (see [`service::liveness`]).

pub mod backoff;
pub mod clock;
pub mod inbox;
pub mod ledger;
pub mod outbox;
pub mod runner;
pub mod status;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::HubClient;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::shortage::{Resource, Shortages};
use crate::{service, spool};
use clock::{ClockWatch, wall_seconds};
use ledger::Ledger;
use status::Status;

/// How long a hook in progress may take to finish once shutdown was asked for.
const HOOK_GRACE: Duration = Duration::from_secs(10);
/// Most messages, and bytes of them, handed from the inbox loop to the hook runner in
/// memory.
const MAX_HANDED: usize = 4096;
const MAX_HANDED_BYTES: usize = 16 * 1024 * 1024;

/// Messages in memory between the inbox loop and the hook runner, with their sizes.
#[derive(Default)]
struct Handed {
    messages: HashMap<Uuid, (Arc<Message>, usize)>,
    bytes: usize,
}
/// How often crash debris is looked for.
const DEBRIS_SWEEP: Duration = Duration::from_secs(600);

/// What the agent's loops share.
pub struct Agent {
    /// The configuration; SIGHUP may replace it (see [`apply_reload`]).
    config: RwLock<Arc<Config>>,
    /// Woken when the configuration was replaced, so sleeping loops pick it up at once.
    pub reloaded: Notify,
    /// The connection to the hub; SIGHUP may replace it too.
    client: RwLock<HubClient>,
    pub ledger: Mutex<Ledger>,
    /// Woken when the inbox loop delivered messages whose hooks must run.
    pub hooks_wake: Notify,
    /// Messages the inbox loop just wrote, handed to the hook runner so that it need not
    /// read and parse each file again. Bounded: past [`MAX_HANDED`] messages or
    /// [`MAX_HANDED_BYTES`], the runner reads the files.
    handed: Mutex<Handed>,
    /// What the file watcher saw in `outbox/`.
    pub outbox_events: Arc<outbox::OutboxEvents>,
    pub status: Mutex<Status>,
    /// Directories short of a resource now; shown by `mesync status`.
    pub shortages: Shortages,
    pub shutdown: CancellationToken,
}

impl Agent {
    /// The configuration now in force.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The client for the hub, as configured now.
    pub fn client(&self) -> HubClient {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands messages just written into the inbox (`bytes` of JSON in all) to the hook
    /// runner, when they fit in the bounds.
    pub fn hand_over(&self, messages: &[Message], bytes: usize) {
        let mut handed = self.handed.lock().unwrap_or_else(|p| p.into_inner());
        let each = bytes / messages.len().max(1);
        for message in messages {
            if handed.messages.len() >= MAX_HANDED || handed.bytes + each > MAX_HANDED_BYTES {
                return;
            }
            handed.bytes += each;
            handed
                .messages
                .insert(message.id, (Arc::new(message.clone()), each));
        }
    }

    /// The message `id`, as the inbox loop handed it over, while its inbox file is there
    /// (a file removed by hand means no hook, as when the runner reads it).
    pub fn handed_over(&self, id: &Uuid, inbox_file: &Path) -> Option<Arc<Message>> {
        let message = {
            let mut handed = self.handed.lock().unwrap_or_else(|p| p.into_inner());
            let (message, size) = handed.messages.remove(id)?;
            handed.bytes -= size;
            message
        };
        fs::symlink_metadata(inbox_file)
            .is_ok_and(|m| m.is_file())
            .then_some(message)
    }

    /// Notes that `dir` is short of `resource` (logged once), for `mesync status`.
    pub fn note_shortage(&self, dir: &Path, resource: Resource, what: &str) {
        if self.shortages.report(dir, resource, what) {
            self.save_shortages();
        }
    }

    /// Notes that writing in `dir` works again.
    pub fn clear_shortage(&self, dir: &Path) {
        if self.shortages.clear(dir) {
            self.save_shortages();
        }
    }

    fn save_shortages(&self) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.shortages = self.shortages.current();
        status.save(&self.config().state_dir());
    }

    /// Records the outcome of an exchange with the hub for `mesync status`.
    pub fn hub_result(&self, result: std::result::Result<(), String>) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let changed = status.record(result);
        if changed {
            status.save(&self.config().state_dir());
        }
    }
}

/// Puts a reloaded configuration in force. What the loops read each time round
/// (`poll_interval`, `sent_ttl`, `hook_timeout`, `hook_user`) takes effect at once; so do
/// the connection settings (`server_url`, `http_timeout`, `token`, the TLS files, read
/// again even when their paths are the same, so renewed certificates are picked up): a
/// new client is built, and the long-poll in progress is given up for one on it. If the new
/// connection settings cannot be used (an unreadable certificate), they are refused with
/// an error and the ones in use stay. The identity (`host_id`, base dir) changes only with
/// a restart.
pub async fn apply_reload(agent: &Agent, new: Config) {
    service::reloading();
    let old = agent.config();
    if old.host_id != new.host_id || old.base_dir != new.base_dir {
        tracing::warn!("host_id and base dir changes take effect at the next restart");
    }
    // Reading certificate files: off the threads that run the loops.
    let candidate = new.clone();
    let client = tokio::task::spawn_blocking(move || HubClient::new(&candidate))
        .await
        .unwrap_or_else(|e| {
            Err(Error::Config(format!(
                "building the hub client failed: {e}"
            )))
        });
    let merged = match client {
        Ok(client) => {
            *agent.client.write().unwrap_or_else(|p| p.into_inner()) = client;
            Config {
                host_id: old.host_id.clone(),
                base_dir: old.base_dir.clone(),
                ..new
            }
        }
        Err(err) => {
            tracing::error!(%err, "the new connection settings cannot be used; keeping the ones in use");
            // The connection settings in use stay; everything else is taken.
            Config {
                server_url: old.server_url.clone(),
                http_timeout: old.http_timeout,
                token: old.token.clone(),
                ca_file: old.ca_file.clone(),
                client_cert: old.client_cert.clone(),
                client_key: old.client_key.clone(),
                host_id: old.host_id.clone(),
                base_dir: old.base_dir.clone(),
                ..new
            }
        }
    };
    tracing::info!(
        poll_interval = ?merged.poll_interval,
        sent_ttl = ?merged.sent_ttl,
        hub = %merged.server_url,
        "configuration reloaded"
    );
    *agent.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(merged);
    agent.reloaded.notify_waiters();
    service::ready(&status_line(agent));
}

/// Creates the base dir's queues if they are missing.
pub fn ensure_dirs(config: &Config) -> Result<()> {
    for dir in config
        .written_dirs()
        .into_iter()
        .chain([config.hooks_dir()])
    {
        spool::ensure_dir(&dir)?;
    }
    Ok(())
}

/// Runs the agent until `shutdown` is cancelled; then lets the work in hand finish (a hook
/// in progress gets [`HOOK_GRACE`]) and returns. Configurations received on `reloads` (the
/// CLI sends one on SIGHUP) are put in force as they come.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    mut reloads: Option<tokio::sync::mpsc::Receiver<Config>>,
) -> Result<()> {
    ensure_dirs(&config)?;
    // Only this agent writes these directories: any temporary file in them is left over
    // from a crash of a previous run.
    for dir in [
        config.inbox_dir(),
        config.sent_dir(),
        config.failed_dir(),
        config.state_dir(),
    ] {
        let removed = spool::remove_temps(&dir)?;
        if removed > 0 {
            tracing::info!(removed, dir = %dir.display(), "removed temporary files left by a crash");
        }
    }
    let ledger = Ledger::open(&config.state_dir())?;
    let client = HubClient::new(&config)?;
    let status = Status::new(&config);
    status.save(&config.state_dir());
    let agent = Arc::new(Agent {
        client: RwLock::new(client),
        reloaded: Notify::new(),
        ledger: Mutex::new(ledger),
        hooks_wake: Notify::new(),
        handed: Mutex::default(),
        outbox_events: Arc::default(),
        status: Mutex::new(status),
        shortages: Shortages::default(),
        shutdown: shutdown.clone(),
        config: RwLock::new(Arc::new(config)),
    });
    let config = agent.config();
    tracing::info!(
        host = %config.host_id,
        hub = %config.server_url,
        base = %config.base_dir.display(),
        "agent started"
    );
    let _watcher = outbox::watch(&config.outbox_dir(), Arc::clone(&agent.outbox_events));

    // WATCHDOG=1 goes out only while the loops that move messages and run hooks are alive.
    let liveness = service::Liveness::default();
    let sender = tokio::spawn(outbox::run(
        Arc::clone(&agent),
        liveness.heartbeat("outbox sender"),
    ));
    let puller = tokio::spawn(inbox::run(
        Arc::clone(&agent),
        liveness.heartbeat("inbox puller"),
    ));
    let hooks = tokio::spawn(runner::run(
        Arc::clone(&agent),
        liveness.heartbeat("hook runner"),
    ));
    let keeper = tokio::spawn(housekeeping(Arc::clone(&agent)));
    let reported = Arc::clone(&agent);
    let reporter = tokio::spawn(service::report(liveness, shutdown.clone(), move || {
        status_line(&reported)
    }));

    loop {
        tokio::select! {
            new = async { reloads.as_mut()?.recv().await }, if reloads.is_some() => match new {
                Some(new) => apply_reload(&agent, new).await,
                None => reloads = None,
            },
            _ = shutdown.cancelled() => break,
        }
    }
    service::stopping();
    tracing::info!("shutting down: finishing the work in hand");
    let _ = sender.await;
    let _ = puller.await;
    let _ = keeper.await;
    let _ = reporter.await;
    if tokio::time::timeout(HOOK_GRACE, hooks).await.is_err() {
        tracing::warn!("a hook did not finish in time; it will run again after the restart");
    }
    agent
        .status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .stopped(&config.state_dir());
    tracing::info!("agent stopped");
    Ok(())
}

async fn housekeeping(agent: Arc<Agent>) {
    let mut last_debris_sweep: Option<tokio::time::Instant> = None;
    let mut clock = Arc::new(ClockWatch::default());
    let mut first = true;
    loop {
        let config = agent.config();
        let sweep_debris = last_debris_sweep.is_none_or(|t| t.elapsed() >= DEBRIS_SWEEP);
        if sweep_debris {
            last_debris_sweep = Some(tokio::time::Instant::now());
        }
        Arc::make_mut(&mut clock).observe(wall_seconds(SystemTime::now()), Instant::now());
        let watch = Arc::clone(&clock);
        let worker = Arc::clone(&config);
        let work = tokio::task::spawn_blocking(move || tidy(&worker, &watch, sweep_debris)).await;
        match work {
            Ok(Err(err)) => tracing::warn!(%err, "housekeeping failed"),
            Err(err) => tracing::warn!(%err, "housekeeping task failed"),
            Ok(Ok(())) => {}
        }
        {
            let status = agent.status.lock().unwrap_or_else(|p| p.into_inner());
            status.save(&config.state_dir());
        }
        if first {
            // The first tick ran: the queues are in order and every loop is going.
            service::ready(&status_line(&agent));
            first = false;
        }
        tokio::select! {
            _ = tokio::time::sleep(config.poll_interval) => {}
            _ = agent.reloaded.notified() => {}
            _ = agent.shutdown.cancelled() => return,
        }
    }
}

/// "hub reachable, last sync ..., 2 hooks pending", for `systemctl status`.
fn status_line(agent: &Agent) -> String {
    let status = agent
        .status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let hub = match status.hub_reachable {
        Some(true) => "hub reachable",
        Some(false) => "hub NOT reachable",
        None => "hub not contacted yet",
    };
    let last = status.last_sync.as_deref().unwrap_or("never");
    let hooks = agent.ledger().pending_hooks();
    format!("{hub}, last sync {last}, {hooks} hooks pending")
}

/// One housekeeping pass: `sent/` purge, and crash debris when `sweep_debris`.
fn tidy(config: &Config, clock: &ClockWatch, sweep_debris: bool) -> Result<()> {
    let purged = purge_sent(&config.sent_dir(), config.sent_ttl, clock)?;
    if purged > 0 {
        tracing::info!(purged, "purged sent/ files older than sent_ttl");
    }
    if sweep_debris {
        for dir in config.written_dirs() {
            let removed = spool::remove_debris(&dir, spool::DEBRIS_AGE)?;
            if removed > 0 {
                tracing::info!(removed, dir = %dir.display(), "removed crash debris");
            }
        }
    }
    Ok(())
}

/// Removes files that entered `sent/` more than `ttl` ago. The move into `sent/` is a rename,
/// which sets the file's change time (ctime): that is the time it was sent, whereas its
/// mtime is when it was written into the outbox. Ages discount forward steps of the wall
/// clock seen by `clock`.
pub fn purge_sent(dir: &Path, ttl: Duration, clock: &ClockWatch) -> Result<usize> {
    let now = wall_seconds(SystemTime::now());
    let mut purged = 0;
    for name in spool::list(dir)? {
        let path = dir.join(&name);
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let changed = meta.ctime() as f64 + meta.ctime_nsec() as f64 / 1e9;
        if clock.age(now, changed) >= ttl {
            match fs::remove_file(&path) {
                Ok(()) => purged += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io {
                        action: "remove",
                        path,
                        source,
                    });
                }
            }
        }
    }
    Ok(purged)
}
