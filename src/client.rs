//! The HTTP client of the hub's API, used by the agent and by `mesync hosts` / `status`.
//!
//! [`HubError::is_transient`] is the one place that decides whether a failure is worth
//! retrying (the message stays in `outbox/`) or is a permanent refusal (`failed/`).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::config::{Config, Secret};
use crate::error::Result;
use crate::tls::{self, ClientFiles};

/// A failed exchange with the hub.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HubError {
    /// No answer: connection refused or reset, timeout, unreadable answer.
    #[error("hub unreachable: {0}")]
    Transport(String),
    /// The hub answered with an error status.
    #[error("hub answered {status}: {message}")]
    Status { status: u16, message: String },
}

impl HubError {
    /// True when trying again later may succeed: no answer, 401 or 403 (credentials
    /// being fixed), 408, 429, 5xx (507 included).
    pub fn is_transient(&self) -> bool {
        match self {
            HubError::Transport(_) => true,
            HubError::Status { status, .. } => is_transient_status(*status),
        }
    }
}

/// The statuses worth retrying: the hub is busy, full or failing, or refuses this host's
/// credentials (a wrong token or certificate is the configuration's fault, not the
/// message's: the messages wait in `outbox/` until it is fixed and reloaded), not refusing
/// the message itself.
pub fn is_transient_status(status: u16) -> bool {
    matches!(status, 401 | 403 | 408 | 429) || status >= 500
}

/// The hub's answer to a send.
#[derive(Debug, Default, Deserialize)]
pub struct SendReply {
    #[serde(default)]
    pub accepted: Vec<Uuid>,
    #[serde(default)]
    pub duplicates: Vec<Uuid>,
    #[serde(default)]
    pub rejected: Vec<Rejected>,
}

/// One message of a batch the hub did not take.
#[derive(Debug, Deserialize)]
pub struct Rejected {
    pub id: Option<Uuid>,
    pub status: u16,
    pub error: String,
}

/// A client of one hub, keeping connections alive between calls.
#[derive(Clone)]
pub struct HubClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    timeout: Duration,
    token: Option<Secret>,
}

impl HubClient {
    pub fn new(config: &Config) -> Result<HubClient> {
        let https = config.server_url.starts_with("https://");
        let files = ClientFiles {
            ca_file: config.ca_file.clone(),
            client_cert: config.client_cert.clone(),
            client_key: config.client_key.clone(),
            host_id: Some(config.host_id.clone()),
        };
        let tls = if https {
            tls::client_config(&files)?
        } else {
            if files.ca_file.is_some() || files.client_cert.is_some() || files.client_key.is_some()
            {
                tracing::warn!(
                    "ca_file, client_cert and client_key apply to https:// hubs only; ignored"
                );
            }
            tls::unused_client_config()
        };
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        // Notices a hub that vanished without closing the connection (a half-open socket).
        http.set_keepalive(Some(Duration::from_secs(30)));
        http.set_connect_timeout(Some(config.http_timeout));
        // An https:// hub is only ever spoken to over TLS: nothing can downgrade it.
        http.enforce_http(false);
        let builder = HttpsConnectorBuilder::new().with_tls_config(tls);
        let connector = if https {
            builder.https_only().enable_http1().wrap_connector(http)
        } else {
            builder.https_or_http().enable_http1().wrap_connector(http)
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(HubClient {
            client,
            base: config.server_url.trim_end_matches('/').to_string(),
            timeout: config.http_timeout,
            token: config.token.clone(),
        })
    }

    /// How long a call may take (`http_timeout`); a long-poll takes its wait on top.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `POST /v1/messages` with a batch. Answers with a body listing what was accepted are
    /// returned even when the status is an error (a batch partly refused for a full disk).
    pub async fn send(&self, body: Bytes) -> Result<(u16, SendReply), HubError> {
        let (status, bytes) = self
            .call(Method::POST, "/v1/messages", Some(body), self.timeout)
            .await?;
        if let Ok(reply) = serde_json::from_slice::<SendReply>(&bytes)
            && (status == 200 || !reply.accepted.is_empty() || !reply.rejected.is_empty())
        {
            return Ok((status, reply));
        }
        Err(status_error(status, &bytes))
    }

    /// `GET /v1/messages`: waits up to `wait` for messages for `host`.
    pub async fn pull(
        &self,
        host: &str,
        wait: Duration,
        max: usize,
    ) -> Result<Vec<Value>, HubError> {
        #[derive(Deserialize)]
        struct Pulled {
            messages: Vec<Value>,
        }
        let path = format!(
            "/v1/messages?host={host}&wait={}&max={max}",
            wait.as_secs_f64()
        );
        let (status, bytes) = self
            .call(Method::GET, &path, None, wait + self.timeout)
            .await?;
        if status != 200 {
            return Err(status_error(status, &bytes));
        }
        serde_json::from_slice::<Pulled>(&bytes)
            .map(|p| p.messages)
            .map_err(|e| HubError::Transport(format!("unreadable answer to a pull: {e}")))
    }

    /// `POST /v1/ack`.
    pub async fn ack(&self, host: &str, ids: &[Uuid]) -> Result<(), HubError> {
        let body = serde_json::json!({"host": host, "ids": ids});
        let body = Bytes::from(serde_json::to_vec(&body).expect("an ack serializes"));
        let (status, bytes) = self
            .call(Method::POST, "/v1/ack", Some(body), self.timeout)
            .await?;
        if status != 200 {
            return Err(status_error(status, &bytes));
        }
        Ok(())
    }

    /// A plain call for the CLI (`hosts`, `status`): the status and the JSON body.
    pub async fn request(&self, method: Method, path: &str) -> Result<(u16, Value), HubError> {
        let (status, bytes) = self.call(method, path, None, self.timeout).await?;
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), HubError> {
        let uri = format!("{}{path}", self.base);
        let mut builder = Request::builder().method(method).uri(&uri);
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = &self.token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        let request = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| HubError::Transport(format!("{uri}: {e}")))?;
        let exchange = async {
            let response =
                self.client.request(request).await.map_err(|e| {
                    HubError::Transport(format!("{}: {}", self.base, error_chain(&e)))
                })?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| HubError::Transport(format!("{}: {e}", self.base)))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| {
            HubError::Transport(format!("{}: no answer within {timeout:?}", self.base))
        })?
    }
}

fn status_error(status: u16, body: &[u8]) -> HubError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| {
            StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("error")
                .to_string()
        });
    HubError::Status { status, message }
}

/// hyper's client errors hide the cause (connection refused...) in their source chain.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_and_permanent_statuses() {
        for s in [401, 403, 408, 429, 500, 502, 503, 507] {
            assert!(is_transient_status(s), "{s}");
        }
        for s in [400, 404, 405, 413, 422] {
            assert!(!is_transient_status(s), "{s}");
        }
        assert!(HubError::Transport("x".into()).is_transient());
    }
}
