//! `mesync hosts`: the hub's registry, through its HTTP API.

use http::Method;
use serde_json::Value;

use super::HostsAction;
use crate::client::HubClient;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::message::validate_name;

pub async fn run(config: &Config, action: Option<HostsAction>, as_json: bool) -> Result<()> {
    let client = HubClient::new(config)?;
    let url = &config.server_url;
    match action {
        Some(HostsAction::Remove { host }) => {
            validate_name("host", &host).map_err(Error::Invalid)?;
            let (status, body) = client
                .request(Method::DELETE, &format!("/v1/hosts/{host}"))
                .await
                .map_err(|e| Error::Http(e.to_string()))?;
            if status != 200 {
                return Err(Error::Http(format!("{url}: {}", error_text(status, &body))));
            }
            let dropped = body.get("dropped").and_then(Value::as_u64).unwrap_or(0);
            println!("removed host {host} and {dropped} pending message(s)");
        }
        None => {
            let (status, body) = client
                .request(Method::GET, "/v1/hosts")
                .await
                .map_err(|e| Error::Http(e.to_string()))?;
            if status != 200 {
                return Err(Error::Http(format!("{url}: {}", error_text(status, &body))));
            }
            let hosts = body
                .get("hosts")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for host in hosts {
                if as_json {
                    println!("{host}");
                    continue;
                }
                let field = |k: &str| match host.get(k) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => "-".into(),
                    Some(v) => v.to_string(),
                };
                println!(
                    "{}  last seen {}  pending {}  oldest {}s",
                    field("host"),
                    field("last_seen"),
                    field("pending"),
                    field("oldest_pending_secs")
                );
            }
        }
    }
    Ok(())
}

fn error_text(status: u16, body: &Value) -> String {
    let message = body.get("error").and_then(Value::as_str).unwrap_or("error");
    format!("hub answered {status}: {message}")
}
