//! Configuration: command-line flag > environment variable > config file > built-in default.
//!
//! The file is `--config FILE`, else `$MESYNC_CONFIG`, else `$MESYNC_BASE_DIR/config.toml`
//! (missing is fine only for the last). Unknown keys are an error naming the key. Defaults
//! live in one place ([`Defaults`]), and derived paths come from getters
//! (`outbox_dir()`, ...). Nothing here writes a config file.

use std::fmt;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::message::validate_name;

/// The built-in defaults, in one place.
struct Defaults;

impl Defaults {
    const SERVER_URL: &'static str = "http://localhost:8080";
    const BASE_DIR: &'static str = ".daemon";
    const POLL_INTERVAL: Duration = Duration::from_secs(5);
    const SENT_TTL: Duration = Duration::from_secs(86_400);
    const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
    const HOOK_TIMEOUT: Duration = Duration::from_secs(300);
    const LISTEN: &'static str = "0.0.0.0:8080";
    const MAX_MESSAGE_BYTES: u64 = 1024 * 1024;
    const MAX_PENDING_PER_HOST: u64 = 100_000;
    /// The longest duration setting accepted: ten years.
    const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);
    /// Room for a few thousand agents, each with a long-poll and a connection for sending,
    /// in about 300 MiB.
    const MAX_CONNECTIONS: u64 = 16_384;
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub base_dir: Option<PathBuf>,
    pub server_url: Option<String>,
    pub host_id: Option<String>,
    pub listen: Vec<String>,
    pub data_dir: Option<PathBuf>,
}

/// The resolved configuration of the agent and the commands that work on its queues, with
/// the hub's settings in [`HubConfig`].
#[derive(Debug, Clone)]
pub struct Config {
    pub base_dir: PathBuf,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
    pub server_url: String,
    pub host_id: String,
    pub poll_interval: Duration,
    pub sent_ttl: Duration,
    pub http_timeout: Duration,
    pub hook_timeout: Duration,
    pub hook_user: Option<String>,
    pub token: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub hub: HubConfig,
}

/// The hub's settings (`[hub]` in the config file).
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub listen: Vec<SocketAddr>,
    pub data_dir: PathBuf,
    pub max_message_bytes: u64,
    pub max_pending_per_host: u64,
    pub max_connections: u64,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

/// A secret (a bearer token): its `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Config {
    /// Derived paths of the agent's base dir.
    pub fn outbox_dir(&self) -> PathBuf {
        self.base_dir.join("outbox")
    }
    pub fn inbox_dir(&self) -> PathBuf {
        self.base_dir.join("inbox")
    }
    pub fn sent_dir(&self) -> PathBuf {
        self.base_dir.join("sent")
    }
    pub fn failed_dir(&self) -> PathBuf {
        self.base_dir.join("failed")
    }
    pub fn hooks_dir(&self) -> PathBuf {
        self.base_dir.join("hooks")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.base_dir.join("state")
    }
    /// The directories the agent writes: the four queues and `state/` (not `hooks/`).
    pub fn written_dirs(&self) -> [PathBuf; 5] {
        [
            self.outbox_dir(),
            self.inbox_dir(),
            self.sent_dir(),
            self.failed_dir(),
            self.state_dir(),
        ]
    }

    /// Resolves the configuration from the flags, the process environment and the file.
    pub fn load(overrides: &Overrides) -> Result<Config> {
        Config::load_with(overrides, |key| std::env::var(key).ok())
    }

    /// Resolves the configuration with `env` standing for the environment (tests pass a map).
    pub fn load_with(
        overrides: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config> {
        let env = |key: &str| env(key).filter(|v| !v.is_empty());
        let base_dir = match overrides
            .base_dir
            .clone()
            .or_else(|| env("MESYNC_BASE_DIR").map(PathBuf::from))
        {
            Some(dir) => dir,
            None => home_dir(&env)?.join(Defaults::BASE_DIR),
        };
        let (file, config_file) = read_file(overrides, &env, &base_dir)?;
        let file_dir = config_file
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let relative = |p: PathBuf| if p.is_absolute() { p } else { file_dir.join(p) };
        let hub_file = file.hub.unwrap_or_default();

        let server_url = overrides
            .server_url
            .clone()
            .or_else(|| env("MESYNC_SERVER_URL"))
            .or(file.server_url)
            .unwrap_or_else(|| Defaults::SERVER_URL.to_string());
        let server_url = normalize_server_url(&server_url)?;

        let host_id = match overrides
            .host_id
            .clone()
            .or_else(|| env("MESYNC_HOST_ID"))
            .or(file.host_id)
        {
            Some(id) => id,
            None => system_hostname()?,
        };
        validate_name("host id", &host_id).map_err(Error::Config)?;

        let duration = |key: &str, env_key: &str, from_file: Option<DurationValue>, default| {
            let (name, value) = match env(env_key) {
                Some(text) => (env_key, parse_duration(&text)),
                None => match from_file {
                    Some(value) => (key, value.resolve()),
                    None => (key, Ok(default)),
                },
            };
            // Deadlines are computed from these by addition: a bound keeps that from
            // overflowing, far beyond any sensible setting.
            let value = value.and_then(|d| {
                if d > Defaults::MAX_DURATION {
                    Err("at most 3650 days".to_string())
                } else {
                    Ok(d)
                }
            });
            value.map_err(|e| Error::Config(format!("{name}: {e}")))
        };
        let poll_interval = duration(
            "poll_interval",
            "MESYNC_POLL_INTERVAL",
            file.poll_interval,
            Defaults::POLL_INTERVAL,
        )?;
        if poll_interval.is_zero() {
            return Err(Error::Config("poll_interval: must be more than 0".into()));
        }
        let sent_ttl = duration(
            "sent_ttl",
            "MESYNC_SENT_TTL",
            file.sent_ttl,
            Defaults::SENT_TTL,
        )?;
        let http_timeout = duration(
            "http_timeout",
            "MESYNC_HTTP_TIMEOUT",
            file.http_timeout,
            Defaults::HTTP_TIMEOUT,
        )?;
        if http_timeout.is_zero() {
            return Err(Error::Config("http_timeout: must be more than 0".into()));
        }
        let hook_timeout = duration(
            "hook_timeout",
            "MESYNC_HOOK_TIMEOUT",
            file.hook_timeout,
            Defaults::HOOK_TIMEOUT,
        )?;
        if hook_timeout.is_zero() {
            return Err(Error::Config("hook_timeout: must be more than 0".into()));
        }

        let token = match env("MESYNC_TOKEN").or(file.token) {
            Some(token) => Some(Secret::new(token.trim().to_string())),
            None => match file.token_file.map(relative) {
                Some(path) => Some(read_token_file(&path)?),
                None => None,
            },
        };

        let listen_texts: Vec<String> = if !overrides.listen.is_empty() {
            overrides.listen.clone()
        } else if let Some(text) = env("MESYNC_LISTEN") {
            text.split(',').map(|s| s.trim().to_string()).collect()
        } else if let Some(listen) = hub_file.listen {
            listen.into_vec()
        } else {
            vec![Defaults::LISTEN.to_string()]
        };
        let listen = listen_texts
            .iter()
            .map(|text| parse_listen(text))
            .collect::<Result<Vec<_>>>()?;

        let data_dir = overrides
            .data_dir
            .clone()
            .or_else(|| env("MESYNC_HUB_DIR").map(PathBuf::from))
            .or(hub_file.data_dir.map(relative))
            .or_else(|| env("STATE_DIRECTORY").map(|d| PathBuf::from(first_path(&d))))
            .unwrap_or_else(|| base_dir.join("hub"));

        let hub = HubConfig {
            listen,
            data_dir,
            max_message_bytes: hub_file
                .max_message_bytes
                .unwrap_or(Defaults::MAX_MESSAGE_BYTES),
            max_pending_per_host: hub_file
                .max_pending_per_host
                .unwrap_or(Defaults::MAX_PENDING_PER_HOST),
            max_connections: hub_file
                .max_connections
                .unwrap_or(Defaults::MAX_CONNECTIONS),
            tls_cert: hub_file.tls_cert.map(relative),
            tls_key: hub_file.tls_key.map(relative),
            client_ca: hub_file.client_ca.map(relative),
        };
        for (key, value) in [
            ("max_message_bytes", hub.max_message_bytes),
            ("max_pending_per_host", hub.max_pending_per_host),
            ("max_connections", hub.max_connections),
        ] {
            if value == 0 {
                return Err(Error::Config(format!("[hub] {key}: must be more than 0")));
            }
        }

        Ok(Config {
            base_dir,
            config_file,
            server_url,
            host_id,
            poll_interval,
            sent_ttl,
            http_timeout,
            hook_timeout,
            hook_user: env("MESYNC_HOOK_USER").or(file.hook_user),
            token,
            ca_file: file.ca_file.map(relative),
            client_cert: file.client_cert.map(relative),
            client_key: file.client_key.map(relative),
            hub,
        })
    }
}

/// The config file's schema. Every field is optional; unknown keys are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server_url: Option<String>,
    host_id: Option<String>,
    poll_interval: Option<DurationValue>,
    sent_ttl: Option<DurationValue>,
    http_timeout: Option<DurationValue>,
    hook_timeout: Option<DurationValue>,
    hook_user: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    hub: Option<HubFileConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HubFileConfig {
    listen: Option<OneOrMany>,
    data_dir: Option<PathBuf>,
    max_message_bytes: Option<u64>,
    max_pending_per_host: Option<u64>,
    max_connections: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

/// A duration in the file: plain seconds (the seed's form) or a string such as "5m".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DurationValue {
    Seconds(u64),
    Text(String),
}

impl DurationValue {
    fn resolve(self) -> Result<Duration, String> {
        match self {
            DurationValue::Seconds(s) => Ok(Duration::from_secs(s)),
            DurationValue::Text(text) => parse_duration(&text),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

/// Parses a duration: plain seconds ("10") or a number with a unit ("500ms", "10s", "5m").
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("invalid duration {text:?}: {e} (use seconds, or e.g. \"10s\", \"5m\")")
    })
}

fn read_file(
    overrides: &Overrides,
    env: &impl Fn(&str) -> Option<String>,
    base_dir: &Path,
) -> Result<(FileConfig, Option<PathBuf>)> {
    let (path, must_exist) = match overrides
        .config
        .clone()
        .or_else(|| env("MESYNC_CONFIG").map(PathBuf::from))
    {
        Some(path) => (path, true),
        None => (base_dir.join("config.toml"), false),
    };
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
            return Ok((FileConfig::default(), None));
        }
        Err(source) => {
            return Err(Error::Io {
                action: "read config",
                path,
                source,
            });
        }
    };
    let file: FileConfig = toml::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {}", path.display(), one_line(&e.to_string()))))?;
    Ok((file, Some(path)))
}

/// toml's errors span several lines with a source excerpt; the CLI prints one line.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.ends_with('|'))
        .collect();
    lines.join(": ")
}

fn read_token_file(path: &Path) -> Result<Secret> {
    let text = fs::read_to_string(path).map_err(|source| Error::Io {
        action: "read token file",
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(Error::Config(format!(
            "{}: token file is empty",
            path.display()
        )));
    }
    Ok(Secret::new(token.to_string()))
}

/// Checks a hub URL and writes its scheme in lower case (`HTTPS://hub` is `https://hub`),
/// so that everything after can tell TLS from plain HTTP by the prefix.
fn normalize_server_url(url: &str) -> Result<String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| Error::Config(format!("server_url {url:?}: {e}")))?;
    let scheme = uri.scheme_str().map(str::to_ascii_lowercase);
    match (scheme.as_deref(), url.split_once("://")) {
        (Some(scheme @ ("http" | "https")), Some((_, rest))) if uri.authority().is_some() => {
            Ok(format!("{scheme}://{rest}"))
        }
        _ => Err(Error::Config(format!(
            "server_url {url:?}: expected http://HOST:PORT or https://HOST:PORT"
        ))),
    }
}

fn parse_listen(text: &str) -> Result<SocketAddr> {
    text.parse().map_err(|_| {
        Error::Config(format!(
            "listen address {text:?}: expected IP:PORT, e.g. 0.0.0.0:8080"
        ))
    })
}

/// `$STATE_DIRECTORY` may list several directories separated by colons; the first is ours.
fn first_path(list: &str) -> &str {
    list.split(':').next().unwrap_or(list)
}

fn home_dir(env: &impl Fn(&str) -> Option<String>) -> Result<PathBuf> {
    env("HOME")
        .map(PathBuf::from)
        .ok_or_else(|| Error::Config("HOME is not set: set MESYNC_BASE_DIR or --base-dir".into()))
}

/// The system hostname: the default host id.
pub fn system_hostname() -> Result<String> {
    let name = nix::unistd::gethostname()
        .map_err(|e| Error::Config(format!("cannot read the hostname: {e}; set MESYNC_HOST_ID")))?;
    Ok(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(env: &[(&str, &str)], file: Option<&str>) -> Result<Config> {
        let tmp = tempfile::tempdir().unwrap();
        if let Some(text) = file {
            fs::write(tmp.path().join("config.toml"), text).unwrap();
        }
        let mut vars: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        vars.insert("MESYNC_BASE_DIR".into(), tmp.path().display().to_string());
        let config = Config::load_with(&Overrides::default(), |k| vars.get(k).cloned());
        drop(tmp);
        config
    }

    #[test]
    fn defaults_are_the_seeds() {
        let c = load(&[("MESYNC_HOST_ID", "h")], None).unwrap();
        assert_eq!(c.server_url, "http://localhost:8080");
        assert_eq!(c.poll_interval, Duration::from_secs(5));
        assert_eq!(c.sent_ttl, Duration::from_secs(86_400));
        assert_eq!(c.http_timeout, Duration::from_secs(10));
        assert_eq!(c.hook_timeout, Duration::from_secs(300));
        assert_eq!(c.hub.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
        assert_eq!(c.hub.max_message_bytes, 1024 * 1024);
        assert!(c.hub.data_dir.ends_with("hub"));
    }

    #[test]
    fn env_beats_file_beats_default() {
        let file = "poll_interval = 10\nsent_ttl = \"1h\"\nhost_id = \"from-file\"\n";
        let c = load(&[("MESYNC_POLL_INTERVAL", "2")], Some(file)).unwrap();
        assert_eq!(c.poll_interval, Duration::from_secs(2));
        assert_eq!(c.sent_ttl, Duration::from_secs(3600));
        assert_eq!(c.host_id, "from-file");
        assert_eq!(c.http_timeout, Duration::from_secs(10));
    }

    #[test]
    fn flags_beat_env() {
        let vars: HashMap<&str, &str> = [
            ("MESYNC_HOST_ID", "env"),
            ("MESYNC_BASE_DIR", "/nonexistent"),
        ]
        .into();
        let overrides = Overrides {
            host_id: Some("flag".into()),
            ..Overrides::default()
        };
        let c = Config::load_with(&overrides, |k| vars.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.host_id, "flag");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load(&[], Some("pol_interval = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pol_interval"), "{err}");
        let err = load(&[], Some("[hub]\nlisten_on = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_on"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn the_server_url_scheme_is_written_in_lower_case() {
        let c = load(
            &[("MESYNC_SERVER_URL", "HTTPS://Hub.example.com:8443/m")],
            None,
        )
        .unwrap();
        assert_eq!(c.server_url, "https://Hub.example.com:8443/m");
        assert!(load(&[("MESYNC_SERVER_URL", "https://")], None).is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(load(&[("MESYNC_POLL_INTERVAL", "soon")], None).is_err());
        assert!(load(&[("MESYNC_POLL_INTERVAL", "0")], None).is_err());
        assert!(load(&[("MESYNC_HOOK_TIMEOUT", "0")], None).is_err());
        assert!(load(&[("MESYNC_SERVER_URL", "ftp://x")], None).is_err());
        assert!(load(&[("MESYNC_HOST_ID", "a/b")], None).is_err());
        assert!(load(&[("MESYNC_LISTEN", "nowhere")], None).is_err());
        assert!(load(&[], Some("sent_ttl = -1\n")).is_err());
    }

    #[test]
    fn durations_beyond_ten_years_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let overrides = Overrides {
            base_dir: Some(tmp.path().to_path_buf()),
            host_id: Some("h".into()),
            ..Overrides::default()
        };
        let env =
            |key: &str| (key == "MESYNC_POLL_INTERVAL").then(|| "18446744073709551615".to_string());
        let err = Config::load_with(&overrides, env).expect_err("a poll_interval of 2^64 s");
        assert!(
            err.to_string()
                .contains("MESYNC_POLL_INTERVAL: at most 3650 days"),
            "{err}"
        );
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("hunter2".into())), "***");
    }
}
