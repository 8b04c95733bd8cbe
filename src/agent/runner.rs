//! The hook runner: runs the hook of each delivered message once, one at a time, in
//! delivery order. The ledger records each start and each end, so after a crash the hook
//! that was running runs again with a higher `MESYNC_ATTEMPT`. Exit 75 retries the hook with
//! backoff, up to [`MAX_ATTEMPTS`]; later hooks wait, to keep the order.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::Agent;
use super::backoff::Backoff;
use super::ledger::{Delivery, Record};
use crate::hooks::{HookRun, Outcome};
use crate::message::Message;
use crate::service::Heartbeat;
use crate::service::liveness::DISK_BOUND;

/// Attempts of a hook that keeps exiting 75 before its message is given up on.
pub const MAX_ATTEMPTS: u32 = 5;
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Retries of a hook that could not be started for want of a resource: until it returns.
const SHORT_RETRY_MIN: Duration = Duration::from_millis(200);
const SHORT_RETRY_MAX: Duration = Duration::from_secs(5);

/// The runner loop.
pub async fn run(agent: Arc<Agent>, heartbeat: Heartbeat) {
    loop {
        if agent.shutdown.is_cancelled() {
            return;
        }
        let next = agent.ledger().next_hook();
        let Some((id, delivery)) = next else {
            // No hook to run until the inbox loop delivers: alive however long that takes.
            heartbeat.idle();
            tokio::select! {
                _ = agent.hooks_wake.notified() => continue,
                _ = agent.shutdown.cancelled() => return,
            }
        };
        if !run_hook(&agent, &heartbeat, id, &delivery).await {
            return;
        }
    }
}

/// Runs one message's hook to a final outcome (retrying exit 75). Returns false when
/// shutdown interrupted a retry wait (the hook runs again after the restart).
async fn run_hook(agent: &Agent, heartbeat: &Heartbeat, id: Uuid, delivery: &Delivery) -> bool {
    heartbeat.busy_for(DISK_BOUND);
    let config = agent.config();
    let inbox_file = config.inbox_dir().join(&delivery.file);
    let message = match agent.handed_over(&id, &inbox_file).map_or_else(
        || {
            crate::spool::read_regular(&inbox_file)
                .map_err(|e| e.to_string())
                .and_then(|bytes| Message::parse(&bytes).map(Arc::new))
        },
        Ok,
    ) {
        Ok(message) => message,
        Err(reason) => {
            // Flushed from the inbox (or damaged by hand) before its hook ran.
            tracing::warn!(%id, file = %inbox_file.display(), %reason, "inbox file gone; hook not run");
            finish(
                agent,
                id,
                delivery.attempts,
                "skipped: inbox file gone".into(),
                false,
            );
            return true;
        }
    };
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    let mut short_backoff = Backoff::new(SHORT_RETRY_MIN, SHORT_RETRY_MAX);
    let mut attempt = delivery.attempts + 1;
    let mut started = 0;
    loop {
        let run = HookRun {
            hooks_dir: &config.hooks_dir(),
            message: &message,
            inbox_file: &inbox_file,
            attempt,
            timeout: config.hook_timeout,
            hook_user: config.hook_user.as_deref(),
        };
        heartbeat.busy_for(DISK_BOUND);
        let path = run.path();
        // Once per attempt, however often a shortage kept it from starting.
        if path.exists() && started != attempt {
            started = attempt;
            record(agent, Record::HookStarted { id, attempt });
            tracing::info!(%id, r#type = %message.kind, attempt, "hook started");
        }
        heartbeat.busy_for(run.bound());
        let outcome = run.run().await;
        heartbeat.busy_for(DISK_BOUND);
        if let Outcome::Short(resource) = outcome {
            // The hook did not start: no outcome to record, and no attempt used up. Later
            // hooks wait, to keep the order.
            agent.note_shortage(&config.hooks_dir(), resource, "cannot start a hook");
            let delay = short_backoff.next_delay();
            heartbeat.busy_for(delay);
            tokio::select! {
                _ = tokio::time::sleep(delay) => continue,
                _ = agent.shutdown.cancelled() => return false,
            }
        }
        agent.clear_shortage(&config.hooks_dir());
        let retry = outcome == Outcome::TempFail && attempt < MAX_ATTEMPTS;
        let described = match (&outcome, retry) {
            (Outcome::TempFail, false) => format!("tempfail: gave up after {attempt} attempts"),
            _ => outcome.describe(),
        };
        log_outcome(id, &message.kind, attempt, &outcome, &described);
        finish(agent, id, attempt, described, retry);
        if !retry {
            return true;
        }
        let delay = backoff.next_delay();
        tracing::info!(%id, retry_in = ?delay, "hook asked to be retried (exit 75)");
        heartbeat.busy_for(delay);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = agent.shutdown.cancelled() => return false,
        }
        attempt += 1;
    }
}

fn finish(agent: &Agent, id: Uuid, attempt: u32, outcome: String, retry: bool) {
    record(
        agent,
        Record::HookFinished {
            id,
            attempt,
            outcome,
            retry,
        },
    );
}

/// Appends one record. The hook's message stays delivered whatever happens here; a record
/// that cannot be written (disk full) means at worst one more run after a restart.
fn record(agent: &Agent, record: Record) {
    if let Err(err) = agent.ledger().append_or_remember(record) {
        tracing::error!(%err, "cannot record a hook event");
    }
}

fn log_outcome(id: Uuid, kind: &str, attempt: u32, outcome: &Outcome, described: &str) {
    match outcome {
        Outcome::NoHook => tracing::debug!(%id, r#type = %kind, "no hook"),
        Outcome::Ok => {
            tracing::info!(%id, r#type = %kind, attempt, exit_status = 0, "hook succeeded")
        }
        // Exit status and signal as fields of their own, so that the journal can be
        // queried for them (`journalctl MESYNC_EXIT_STATUS=3`).
        Outcome::Failed(code) => tracing::warn!(
            %id, r#type = %kind, attempt, exit_status = code, outcome = %described,
            "hook did not succeed"
        ),
        Outcome::TempFail => tracing::warn!(
            %id, r#type = %kind, attempt, exit_status = crate::hooks::EX_TEMPFAIL, outcome = %described,
            "hook did not succeed"
        ),
        Outcome::Killed(signal) => tracing::warn!(
            %id, r#type = %kind, attempt, signal, outcome = %described,
            "hook did not succeed"
        ),
        _ => {
            tracing::warn!(%id, r#type = %kind, attempt, outcome = %described, "hook did not succeed")
        }
    }
}
