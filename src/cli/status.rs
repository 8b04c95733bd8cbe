//! `mesync status`: the agent's view of itself, from its status file, its queues and its
//! ledger, plus a fresh look at the hub's `/healthz`.

use http::Method;
use serde_json::json;

use crate::agent::ledger::Ledger;
use crate::agent::status::Status;
use crate::client::HubClient;
use crate::config::Config;
use crate::error::Result;
use crate::shortage::Shortage;
use crate::spool;

/// The shortages the running agent reported (a quota, descriptors: only a failed write
/// tells those), and what the agent's directories lack now (`statvfs`), which also covers
/// a `state/` too full for the agent to report anything in. A stopped agent's last
/// shortages are history, not news.
fn shortages(config: &Config, running: Option<&Status>) -> Vec<Shortage> {
    let mut all: Vec<Shortage> = running.map(|s| s.shortages.clone()).unwrap_or_default();
    for dir in config.written_dirs() {
        if all.iter().any(|s| s.dir == dir) {
            continue;
        }
        if let Some(resource) = crate::shortage::probe(&dir) {
            all.push(Shortage {
                dir,
                resource,
                since: "now".into(),
            });
        }
    }
    all
}

pub async fn show(config: &Config, as_json: bool) -> Result<()> {
    let status = Status::load(&config.state_dir());
    let running = status.as_ref().is_some_and(Status::is_alive);
    let hub = match HubClient::new(config)?
        .request(Method::GET, "/healthz")
        .await
    {
        Ok((200, _)) => Ok(()),
        Ok((code, body)) => Err(format!("answered {code}: {body}")),
        Err(err) => Err(err.to_string()),
    };
    let mut depths = Vec::new();
    for (name, dir) in [
        ("outbox", config.outbox_dir()),
        ("inbox", config.inbox_dir()),
        ("sent", config.sent_dir()),
        ("failed", config.failed_dir()),
    ] {
        let count = spool::list(&dir)?
            .iter()
            .filter(|n| !n.ends_with(crate::agent::outbox::REASON_SUFFIX))
            .count();
        depths.push((name, count));
    }
    let ledger = Ledger::read(&config.state_dir())?;
    let failures: Vec<String> = ledger
        .recent_failures()
        .map(|(id, outcome)| format!("{id} {outcome}"))
        .collect();
    let last_sync = status.as_ref().and_then(|s| s.last_sync.clone());
    let shortages = shortages(config, status.as_ref().filter(|_| running));

    if as_json {
        let value = json!({
            "host_id": config.host_id,
            "base_dir": config.base_dir,
            "agent_running": running,
            "pid": status.as_ref().filter(|_| running).map(|s| s.pid),
            "server_url": config.server_url,
            "hub_reachable": hub.is_ok(),
            "hub_error": hub.as_ref().err(),
            "last_sync": last_sync,
            "queues": depths.iter().map(|(n, c)| (n.to_string(), json!(c))).collect::<serde_json::Map<_, _>>(),
            "hooks_pending": ledger.pending_hooks(),
            "recent_hook_failures": failures,
            "shortages": shortages,
        });
        println!("{value}");
        return Ok(());
    }
    let agent = match (&status, running) {
        (Some(s), true) => format!("running (pid {}), since {}", s.pid, s.started_at),
        _ => "not running".to_string(),
    };
    println!("host:       {}", config.host_id);
    println!("base dir:   {}", config.base_dir.display());
    println!("agent:      {agent}");
    match &hub {
        Ok(()) => println!("hub:        {} reachable", config.server_url),
        Err(err) => println!("hub:        {} NOT reachable: {err}", config.server_url),
    }
    println!("last sync:  {}", last_sync.as_deref().unwrap_or("never"));
    let depths: Vec<String> = depths.iter().map(|(n, c)| format!("{n} {c}")).collect();
    println!("queues:     {}", depths.join(", "));
    println!("hooks:      {} pending", ledger.pending_hooks());
    for failure in failures {
        println!("hook failed: {failure}");
    }
    for short in &shortages {
        println!(
            "SHORT:      {}: {} since {}",
            short.dir.display(),
            short.resource.describe(),
            short.since
        );
    }
    Ok(())
}
