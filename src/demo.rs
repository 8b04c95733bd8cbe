//! `mesync demo`: a hub on an ephemeral loopback port and three agents (alpha, beta, gamma),
//! each with its own base dir in a temporary directory, all in this process. It shows a
//! broadcast, a targeted message and a hook, prints what happened and how long each hop
//! took, then stops everything and removes the directory.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::agent::{self, outbox};
use crate::client::HubClient;
use crate::config::{Config, Overrides};
use crate::error::{Error, IoContext, Result};
use crate::message::Message;
use crate::{hub, spool};

const HOSTS: [&str; 3] = ["alpha", "beta", "gamma"];
const DEADLINE: Duration = Duration::from_secs(15);

pub async fn run() -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("mesync-demo.")
        .tempdir()
        .ctx("create a temporary directory", &std::env::temp_dir())?;
    let root = tmp.path().to_path_buf();
    let listeners = hub::bind(&["127.0.0.1:0".parse().expect("a literal address")])?;
    let addr = listeners[0]
        .local_addr()
        .ctx("read the listener address", &root)?;
    let url = format!("http://{addr}");
    println!(
        "mesync demo: a hub and three agents on {addr}, in {}",
        root.display()
    );

    let shutdown = CancellationToken::new();
    let hub_config = demo_config(&root.join("hub-base"), "hub", &url)?;
    let hub_token = shutdown.clone();
    let hub_task =
        tokio::spawn(async move { hub::run(&hub_config.hub, listeners, hub_token, None).await });

    let mut configs = HashMap::new();
    let mut agents = Vec::new();
    for host in HOSTS {
        let config = demo_config(&root.join(host), host, &url)?;
        agent::ensure_dirs(&config)?;
        agents.push(tokio::spawn(agent::run(
            config.clone(),
            shutdown.clone(),
            None,
        )));
        configs.insert(host, config);
    }
    install_hook(&configs["gamma"], &root)?;
    let result = story(&configs, &url, &root).await;

    shutdown.cancel();
    for task in agents {
        let _ = task.await;
    }
    let _ = hub_task.await;
    drop(tmp);
    match &result {
        Ok(()) => println!(
            "done: stopped the hub and the agents, removed {}",
            root.display()
        ),
        Err(err) => println!("demo failed: {err}"),
    }
    result
}

/// What the demo does and prints, once everything runs.
async fn story(configs: &HashMap<&str, Config>, url: &str, root: &Path) -> Result<()> {
    let client = HubClient::new(&configs["alpha"])?;
    wait_for("the agents to register", || async {
        let Ok((200, body)) = client.request(Method::GET, "/v1/hosts").await else {
            return false;
        };
        let hosts = body["hosts"].as_array().cloned().unwrap_or_default();
        HOSTS.iter().all(|h| hosts.iter().any(|x| x["host"] == *h))
    })
    .await?;
    println!("  hub at {url}; agents alpha, beta and gamma registered");

    println!("1. broadcast: alpha sends demo.hello to everyone");
    let hello = send(
        &configs["alpha"],
        "demo.hello",
        None,
        json!({"greeting": "hi all"}),
    )?;
    let started = Instant::now();
    for host in ["beta", "gamma"] {
        wait_for_inbox(&configs[host], hello).await?;
        println!("   {host:<5} has it in inbox/ after {:.1} ms", ms(started));
    }
    println!(
        "   alpha, the sender, does not: {}",
        absent(&configs["alpha"], hello)
    );

    println!("2. targeted: beta sends demo.job to gamma only");
    let job = send(
        &configs["beta"],
        "demo.job",
        Some("gamma"),
        json!({"job": "build", "repo": "myapp"}),
    )?;
    let started = Instant::now();
    wait_for_inbox(&configs["gamma"], job).await?;
    println!("   gamma has it in inbox/ after {:.1} ms", ms(started));
    println!(
        "   alpha does not: {}; beta, the sender, does not: {}",
        absent(&configs["alpha"], job),
        absent(&configs["beta"], job)
    );

    println!("3. hook: gamma's hooks/demo.job ran with the message on stdin");
    let output = root.join("hook-output.json");
    wait_for("gamma's hook", || async { output.exists() }).await?;
    let ran: Value = serde_json::from_slice(&fs::read(&output).ctx("read", &output)?)
        .map_err(|e| Error::Invalid(format!("hook output: {e}")))?;
    println!(
        "   after {:.1} ms it saw id {} and payload {}",
        ms(started),
        ran["id"].as_str().unwrap_or("?"),
        ran["payload"]
    );
    Ok(())
}

fn demo_config(base: &Path, host: &str, url: &str) -> Result<Config> {
    let vars: HashMap<&str, String> = [
        ("MESYNC_BASE_DIR", base.display().to_string()),
        ("MESYNC_HOST_ID", host.to_string()),
        ("MESYNC_SERVER_URL", url.to_string()),
        ("MESYNC_POLL_INTERVAL", "1".to_string()),
        ("MESYNC_HUB_DIR", base.join("hub").display().to_string()),
    ]
    .into();
    let mut config = Config::load_with(&Overrides::default(), |k| vars.get(k).cloned())?;
    config.hub.listen.clear();
    Ok(config)
}

fn install_hook(config: &Config, root: &Path) -> Result<()> {
    let hook = config.hooks_dir().join("demo.job");
    let output = root.join("hook-output.json");
    let script = format!(
        "#!/bin/sh\n# Saves the message it gets on stdin.\ncat > '{0}.tmp' && mv '{0}.tmp' '{0}'\n",
        output.display()
    );
    fs::write(&hook, script).ctx("write", &hook)?;
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).ctx("chmod", &hook)
}

fn send(config: &Config, kind: &str, target: Option<&str>, payload: Value) -> Result<Uuid> {
    let mut message = Message::new(kind, &config.host_id, payload);
    message.target = target.map(str::to_string);
    outbox::put(config, &message)?;
    Ok(message.id)
}

async fn wait_for_inbox(config: &Config, id: Uuid) -> Result<()> {
    wait_for("delivery", || async { in_inbox(config, id) }).await
}

fn in_inbox(config: &Config, id: Uuid) -> bool {
    spool::list(&config.inbox_dir())
        .is_ok_and(|names| names.iter().any(|n| n.contains(&id.to_string())))
}

fn absent(config: &Config, id: Uuid) -> &'static str {
    if in_inbox(config, id) {
        "WRONG, it has it"
    } else {
        "right"
    }
}

async fn wait_for<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err(Error::Invalid(format!(
        "gave up waiting for {what} after {DEADLINE:?}"
    )))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}
