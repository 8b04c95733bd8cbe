//! The command line: clap definitions, and one function per command. `main.rs` parses,
//! sets up logging and calls [`run`].

mod certs;
mod hosts;
mod queues;
mod status;
mod tokens;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};
use crate::error::{Error, Result};
use crate::message::Priority;
use crate::{agent, demo, hub, service, shutdown, tls};

/// Lightweight, filesystem-native cross-machine message sync.
///
/// Scripts drop JSON messages into outbox/ (or run `mesync send`); the agent (`mesync
/// start`) hands them to the hub (`mesync serve`), which keeps them until every recipient's
/// agent has written them into its inbox/ and run the hook named after the message type.
#[derive(Debug, Parser)]
#[command(name = "mesync", version, propagate_version = true)]
#[command(
    after_help = "Try `mesync demo` to see a hub and three agents at work.\n\
Environment: MESYNC_SERVER_URL, MESYNC_HOST_ID, MESYNC_BASE_DIR, MESYNC_CONFIG, \
MESYNC_POLL_INTERVAL, MESYNC_SENT_TTL, MESYNC_HTTP_TIMEOUT, MESYNC_HOOK_TIMEOUT, \
MESYNC_HOOK_USER, MESYNC_TOKEN, MESYNC_LISTEN, MESYNC_HUB_DIR, RUST_LOG."
)]
pub struct Cli {
    /// Config file [default: $MESYNC_CONFIG, else $MESYNC_BASE_DIR/config.toml]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Directory of the queues, hooks and config [default: $MESYNC_BASE_DIR, else ~/.daemon]
    #[arg(long, global = true, value_name = "DIR")]
    pub base_dir: Option<PathBuf>,

    /// Where logs go: `auto` (the journal when stderr is the journal, else text on stderr),
    /// `journal` or `text`
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Journal,
    Text,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the hub: accept messages over HTTP and keep them until delivered.
    #[command(after_help = "The config file's [hub] table: listen, data_dir, \
max_message_bytes (1 MiB), max_pending_per_host (100000), max_connections (16384), \
tls_cert and tls_key (HTTPS), client_ca (mutual TLS).\n\
Signals: SIGHUP reads the config file, tokens and TLS files again without dropping \
connections; SIGTERM or SIGINT drain the requests in flight and exit 0.\n\
Open mode until `mesync token issue HOST` or client_ca: anyone who reaches the port may \
act as any host.")]
    Serve {
        /// Address to listen on; repeat for several [default: $MESYNC_LISTEN, else 0.0.0.0:8080]
        #[arg(long, value_name = "ADDR")]
        listen: Vec<String>,
        /// Where the hub keeps its queues [default: $MESYNC_HUB_DIR, else $STATE_DIRECTORY, else BASE_DIR/hub]
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Run the agent in the foreground: send outbox/, receive into inbox/, run hooks.
    #[command(
        after_help = "Hooks: BASE_DIR/hooks/<message type> runs once per delivered \
message, with the message on stdin; exit 75 means \"try again later\".\n\
Signals: SIGHUP reads the config file again; SIGTERM or SIGINT let a running hook finish \
(up to 10 s) and exit 0."
    )]
    Start {
        /// Hub URL [default: $MESYNC_SERVER_URL, else http://localhost:8080]
        #[arg(long, value_name = "URL")]
        server_url: Option<String>,
        /// This host's identity [default: $MESYNC_HOST_ID, else the hostname]
        #[arg(long, value_name = "ID")]
        host_id: Option<String>,
    },
    /// Write one message into outbox/ and print its id. Needs no running hub.
    #[command(
        after_help = "Examples:\n  mesync send task.event --payload '{\"job\": \"build\"}'\n  \
mesync send notify.alert --priority high --target machine-2 --payload '{\"msg\": \"disk full\"}'\n  \
echo '{\"n\": 1}' | mesync send task.event --payload -"
    )]
    Send(SendArgs),
    /// List a queue, one line per message (or JSON Lines with --json).
    List {
        #[arg(value_enum)]
        queue: Queue,
        /// Print JSON Lines: each message with its file, hook outcome or failure reason
        #[arg(long)]
        json: bool,
    },
    /// Move failed messages (all, or the ids given) back to outbox/.
    Retry {
        /// Ids of the failed messages to retry [default: all]
        #[arg(value_name = "ID")]
        ids: Vec<String>,
    },
    /// Empty a queue.
    Flush {
        #[arg(value_enum)]
        queue: FlushQueue,
    },
    /// The agent's view: running?, hub reachable?, queue depths, last sync, hook failures.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Manage the hub's bearer tokens (run on the hub's machine). Once any token exists,
    /// every call to the hub needs one, and it tells the hub which host is calling.
    Token {
        #[command(subcommand)]
        action: TokenAction,
        /// The hub's data dir [default: $MESYNC_HUB_DIR, else $STATE_DIRECTORY, else BASE_DIR/hub]
        #[arg(long, value_name = "DIR", global = true)]
        data_dir: Option<PathBuf>,
    },
    /// A private certificate authority for mutual TLS: the hub's server certificate and
    /// one client certificate per host, so that no openssl is needed.
    #[command(after_help = "A fleet with mutual TLS, on the hub:\n  \
mesync tls init --name hub.example.com     # CA + the hub's certificate\n  \
mesync tls issue web-1                     # one per agent: hosts/web-1.crt, .key\n\
then set [hub] tls_cert, tls_key and client_ca, and give each agent ca.crt and its own\n\
certificate and key (ca_file, client_cert, client_key); see the README.")]
    Tls {
        #[command(subcommand)]
        action: TlsAction,
        /// Where the CA and certificates live [default: tls/ in the hub's data dir]
        #[arg(long, value_name = "DIR", global = true)]
        dir: Option<PathBuf>,
        /// Validity of the hub's and hosts' certificates, in days
        #[arg(long, value_name = "DAYS", global = true, default_value_t = tls::ca::DEFAULT_DAYS,
              value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
    /// The hub's registry of hosts, through its HTTP API (at server_url).
    Hosts {
        #[command(subcommand)]
        action: Option<HostsAction>,
        #[arg(long)]
        json: bool,
    },
    /// Run a hub and three agents on loopback in a temporary directory, and show a
    /// broadcast, a targeted message and a hook at work.
    Demo,
}

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Message type: 1-128 characters of A-Z a-z 0-9 . _ -, names the receiver's hook
    #[arg(value_name = "TYPE")]
    pub kind: String,
    /// Payload as JSON, or `-` to read it from stdin [default: null]
    #[arg(long, value_name = "JSON", conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload JSON from a file
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
    /// high, normal or low
    #[arg(long, default_value = "normal", value_parser = parse_priority)]
    pub priority: Priority,
    /// Deliver to this host only [default: broadcast to every other host]
    #[arg(long, value_name = "HOST")]
    pub target: Option<String>,
    /// Drop the message if not delivered within this time (e.g. 90s, 10m, 2h)
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,
}

fn parse_priority(text: &str) -> std::result::Result<Priority, String> {
    text.parse()
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Queue {
    Outbox,
    Inbox,
    Sent,
    Failed,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FlushQueue {
    Sent,
    Failed,
    Inbox,
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create a token for HOST (replacing its old one) and print it, once.
    Issue { host: String },
    /// Remove HOST's token: its calls are refused from the next request on.
    Revoke { host: String },
    /// The hosts that have a token.
    List,
}

#[derive(Debug, Subcommand)]
pub enum TlsAction {
    /// Create the CA (ca.crt, ca.key) and the hub's certificate (hub.crt, hub.key).
    Init {
        /// A DNS name or IP address agents use to reach the hub; repeat for several (the
        /// hostname, localhost, 127.0.0.1 and ::1 are always included)
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
    },
    /// Create (or renew) HOST's client certificate: hosts/HOST.crt and hosts/HOST.key.
    Issue { host: String },
    /// Renew the hub's certificate, for the names given (as with init).
    Server {
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostsAction {
    /// Drop a decommissioned host and its queue at the hub.
    Remove { host: String },
}

impl Command {
    /// The default log filter: daemons say what they do, one-shot commands only warn.
    pub fn default_log_filter(&self) -> &'static str {
        match self {
            Command::Serve { .. } | Command::Start { .. } => "info",
            _ => "warn",
        }
    }
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    let mut overrides = Overrides {
        config: cli.config,
        base_dir: cli.base_dir,
        ..Overrides::default()
    };
    match cli.command {
        Command::Serve { listen, data_dir } => {
            overrides.listen = listen;
            overrides.data_dir = data_dir;
            let config = Config::load(&overrides)?;
            // Sockets passed by systemd win; without them the hub binds its own.
            let mut listeners = service::inherited_listeners()?;
            if listeners.is_empty() {
                listeners = hub::bind(&config.hub.listen)?;
            }
            runtime()?.block_on(async {
                let token = CancellationToken::new();
                shutdown::on_signals(token.clone())?;
                let (reloads, received) = tokio::sync::mpsc::channel(1);
                shutdown::on_hangup(move || match Config::load(&overrides) {
                    Ok(config) => {
                        let _ = reloads.try_send(config.hub);
                    }
                    Err(err) => {
                        tracing::error!(%err, "the configuration is broken; keeping the one in force")
                    }
                })?;
                hub::run(&config.hub, listeners, token, Some(received)).await
            })
        }
        Command::Start {
            server_url,
            host_id,
        } => {
            overrides.server_url = server_url;
            overrides.host_id = host_id;
            let config = Config::load(&overrides)?;
            runtime()?.block_on(async {
                let token = CancellationToken::new();
                shutdown::on_signals(token.clone())?;
                let (reloads, received) = tokio::sync::mpsc::channel(1);
                shutdown::on_hangup(move || match Config::load(&overrides) {
                    Ok(config) => {
                        let _ = reloads.try_send(config);
                    }
                    Err(err) => {
                        tracing::error!(%err, "the configuration is broken; keeping the one in force")
                    }
                })?;
                agent::run(config, token, Some(received)).await
            })
        }
        Command::Send(args) => queues::send(&Config::load(&overrides)?, args),
        Command::List { queue, json } => queues::list(&Config::load(&overrides)?, queue, json),
        Command::Retry { ids } => queues::retry(&Config::load(&overrides)?, &ids),
        Command::Flush { queue } => queues::flush(&Config::load(&overrides)?, queue),
        Command::Status { json } => {
            let config = Config::load(&overrides)?;
            runtime()?.block_on(status::show(&config, json))
        }
        Command::Token { action, data_dir } => {
            overrides.data_dir = data_dir;
            tokens::run(&Config::load(&overrides)?, action)
        }
        Command::Tls { action, dir, days } => {
            let dir = match dir {
                Some(dir) => dir,
                None => Config::load(&overrides)?.hub.data_dir.join("tls"),
            };
            certs::run(&dir, action, days)
        }
        Command::Hosts { action, json } => {
            let config = Config::load(&overrides)?;
            runtime()?.block_on(hosts::run(&config, action, json))
        }
        Command::Demo => runtime()?.block_on(demo::run()),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Config(format!("cannot start the async runtime: {e}")))
}
