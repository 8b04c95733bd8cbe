//! HTTP API v1: one `match` sends each request to its handler; every answer is JSON (or
//! Prometheus text), every error `{"error": "..."}` with the status that fits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::auth::{Caller, ClientCert, Denied, Tokens};
use super::conn::ConnectionCap;
use super::store::{Enqueued, Store};
use crate::message::{Message, validate_name};

/// The longest long-poll a client may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Messages handed out per fetch when the client does not say.
const DEFAULT_FETCH: usize = 100;
/// The most messages one fetch may ask for.
const MAX_FETCH: usize = 1000;
/// Bodies other than message sends (acks) are small.
const MAX_SMALL_BODY: usize = 1024 * 1024;
/// The most a request's head (request line and headers) may take.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Long-polls one host may hold open at once: an agent needs one; a few more allow for a
/// restart racing the old connection's timeout. More would let one host tie up the hub.
const MAX_POLLS_PER_HOST: usize = 4;

/// What the handlers share.
pub struct Api<S> {
    pub store: S,
    pub tokens: Tokens,
    /// Long-polls open, by host (parked ones included).
    pub polls: Arc<Mutex<HashMap<String, usize>>>,
    /// `[hub] max_message_bytes`; a reload (SIGHUP) may change it.
    pub max_message_bytes: AtomicUsize,
    pub shutdown: CancellationToken,
    /// TLS handshakes that failed or timed out (on /metrics).
    pub tls_failures: AtomicU64,
    /// Connections open, and the cap on them.
    pub connections: Arc<ConnectionCap>,
}

pub type Answer = Response<Full<Bytes>>;

/// Why a token was refused, for the caller.
fn token_refusal(denied: Denied) -> &'static str {
    match denied {
        Denied::Missing => "a bearer token is required (Authorization: Bearer <token>)",
        Denied::Invalid => "the bearer token is not valid",
    }
}

/// An error answer: a status and a message for the client (never internals or paths).
struct Refusal(StatusCode, String);

impl Refusal {
    fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal(StatusCode::BAD_REQUEST, message.into())
    }
}

type Handled = Result<Answer, Refusal>;

impl<S: Store> Api<S> {
    fn max_message_bytes(&self) -> usize {
        self.max_message_bytes.load(Ordering::Relaxed)
    }

    /// The largest body a send may have: a batch of several maximal messages.
    fn max_send_body(&self) -> usize {
        self.max_message_bytes()
            .saturating_mul(8)
            .max(8 * 1024 * 1024)
    }

    /// Routes one request from `peer`, whose connection presented `cert` and takes the
    /// long-polls offered to `park`.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        cert: &ClientCert,
        park: &ParkOffer,
    ) -> Answer {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let authorized =
            Self::check_head(&req).and_then(|()| self.authorize(&req, &path, peer, cert));
        let result = match authorized {
            Err(refusal) => Err(refusal),
            Ok(caller) => self.route(req, &method, &path, caller, peer, park).await,
        };
        result.unwrap_or_else(|Refusal(status, message)| {
            tracing::debug!(%method, %path, %status, %message, "request refused");
            let mut answer = error(status, &message);
            // The challenge names the scheme that was missing: a bearer token, not a
            // client certificate (which no header can ask for).
            if status == StatusCode::UNAUTHORIZED && message.contains("bearer token") {
                answer.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            answer
        })
    }

    /// Refuses a request whose head is larger than [`MAX_HEAD_BYTES`].
    fn check_head(req: &Request<Incoming>) -> Result<(), Refusal> {
        let size: usize = req.uri().to_string().len()
            + req
                .headers()
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 4)
                .sum::<usize>();
        if size > MAX_HEAD_BYTES {
            return Err(Refusal(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("the request head is over the limit of {MAX_HEAD_BYTES} bytes"),
            ));
        }
        Ok(())
    }

    /// Who is calling. `/healthz` is open to all; `/metrics` to loopback; every `/v1` call
    /// needs a token once any exists, and a client certificate when the hub asks for them.
    /// With both, they must name the same host.
    fn authorize(
        &self,
        req: &Request<Incoming>,
        path: &str,
        peer: SocketAddr,
        cert: &ClientCert,
    ) -> Result<Caller, Refusal> {
        if path == "/healthz" || (path == "/metrics" && peer.ip().is_loopback()) {
            return Ok(Caller::Open);
        }
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let by_token = self.tokens.authenticate(header);
        let refuse = |status: StatusCode, why: String| {
            tracing::warn!(%peer, %path, %why, "request refused");
            Refusal(status, why)
        };
        match (cert, by_token) {
            (ClientCert::NotAsked, Ok(caller)) => Ok(caller),
            (ClientCert::NotAsked, Err(denied)) => Err(refuse(
                StatusCode::UNAUTHORIZED,
                token_refusal(denied).into(),
            )),
            (ClientCert::Missing, _) => Err(refuse(
                StatusCode::UNAUTHORIZED,
                "a client certificate is required".into(),
            )),
            (ClientCert::Unusable(why), _) => Err(refuse(StatusCode::FORBIDDEN, why.clone())),
            // The certificate says who calls; a token is optional, so that issuing tokens
            // (say, for an operator's tools) does not shut out certificate-only agents. A
            // token that is presented must be valid and name the same host.
            (ClientCert::Host(host), Ok(Caller::Open) | Err(Denied::Missing)) => {
                Ok(Caller::Host(host.clone()))
            }
            (ClientCert::Host(_), Err(denied)) => Err(refuse(
                StatusCode::UNAUTHORIZED,
                token_refusal(denied).into(),
            )),
            (ClientCert::Host(host), Ok(Caller::Host(token_host))) if token_host == *host => {
                Ok(Caller::Host(host.clone()))
            }
            (ClientCert::Host(host), Ok(_)) => {
                // Which host the token belongs to goes to the log, not to the caller.
                tracing::warn!(%peer, %path, certificate = %host, "a token of another host was presented");
                Err(Refusal(
                    StatusCode::FORBIDDEN,
                    "the bearer token and the client certificate name different hosts".into(),
                ))
            }
        }
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        method: &Method,
        path: &str,
        caller: Caller,
        peer: SocketAddr,
        park: &ParkOffer,
    ) -> Handled {
        match (method.clone(), path) {
            (Method::POST, "/v1/messages") => self.send(req, &caller).await,
            (Method::GET, "/v1/messages") => self.pull(req, &caller, park).await,
            (Method::POST, "/v1/ack") => self.ack(req, &caller).await,
            (Method::GET, "/v1/hosts") => Ok(self.hosts()),
            (Method::DELETE, p) if p.starts_with("/v1/hosts/") => {
                // Decommissioning is an operator's act: on the hub's machine itself.
                if caller != Caller::Open && !peer.ip().is_loopback() {
                    return Err(Refusal(
                        StatusCode::FORBIDDEN,
                        "hosts can be removed only from the hub's own machine".into(),
                    ));
                }
                self.remove_host(&p["/v1/hosts/".len()..]).await
            }
            (Method::GET, "/healthz") => Ok(self.healthz().await),
            (Method::GET, "/metrics") => Ok(text(
                self.store.metrics() + &self.poll_metrics() + &self.connections.metrics(),
            )),
            (_, "/v1/messages" | "/v1/ack" | "/v1/hosts" | "/healthz" | "/metrics") => {
                Err(Refusal(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{method} is not allowed on {path}"),
                ))
            }
            _ => Err(Refusal(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {path}"),
            )),
        }
    }

    /// `POST /v1/messages`: one message, or `{"messages": [...]}`.
    async fn send(&self, req: Request<Incoming>, caller: &Caller) -> Handled {
        let body = read_body(req, self.max_send_body()).await?;
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| Refusal::bad_request(format!("body is not JSON: {e}")))?;
        let (items, batch) = match value {
            Value::Object(mut map) if !map.contains_key("type") && map.contains_key("messages") => {
                match map.remove("messages") {
                    Some(Value::Array(items)) => (items, true),
                    _ => return Err(Refusal::bad_request("`messages` must be an array")),
                }
            }
            other => (vec![other], false),
        };
        let mut valid = Vec::with_capacity(items.len());
        let mut slots: Vec<Result<usize, (Option<String>, Refusal)>> = Vec::new();
        for mut item in items {
            // With tokens, a message comes from the token's host, whatever it says.
            if let (Caller::Host(host), Value::Object(fields)) = (caller, &mut item) {
                fields.insert("source".into(), Value::String(host.clone()));
            }
            let id = item.get("id").and_then(Value::as_str).map(str::to_string);
            match self.check_message(item) {
                Ok(message) => {
                    slots.push(Ok(valid.len()));
                    valid.push(message);
                }
                Err(refusal) if !batch => return Err(refusal),
                Err(refusal) => slots.push(Err((id, refusal))),
            }
        }
        let mut sources: Vec<&str> = valid.iter().map(|m| m.source.as_str()).collect();
        sources.sort_unstable();
        sources.dedup();
        for source in sources {
            self.register(source).await?;
        }
        let ids: Vec<Uuid> = valid.iter().map(|m| m.id).collect();
        let outcomes = if valid.is_empty() {
            Vec::new()
        } else {
            self.store.enqueue(valid).await
        };
        self.send_answer(batch, &ids, &outcomes, slots)
    }

    /// Builds the answer of a send. A batch answers 200 unless some message was refused for
    /// a reason that a retry may cure (429, 507, 5xx): then that status, with the same body,
    /// so the sender keeps those and learns which ones were accepted.
    fn send_answer(
        &self,
        batch: bool,
        ids: &[Uuid],
        outcomes: &[Enqueued],
        slots: Vec<Result<usize, (Option<String>, Refusal)>>,
    ) -> Handled {
        let mut accepted = Vec::new();
        let mut duplicates = Vec::new();
        let mut rejected = Vec::new();
        let mut status = StatusCode::OK;
        for slot in slots {
            match slot {
                Ok(i) => match &outcomes[i] {
                    Enqueued::Accepted(_) => accepted.push(ids[i].to_string()),
                    Enqueued::Duplicate => duplicates.push(ids[i].to_string()),
                    Enqueued::Refused(refused) => {
                        let why = refused.reason();
                        let code = StatusCode::from_u16(refused.status())
                            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                        if !batch {
                            return Err(Refusal(code, why.clone()));
                        }
                        status = worse(status, code);
                        rejected.push(json!({"id": ids[i], "status": code.as_u16(), "error": why}));
                    }
                },
                Err((id, Refusal(code, why))) => {
                    rejected.push(json!({"id": id, "status": code.as_u16(), "error": why}));
                }
            }
        }
        Ok(json_answer(
            status,
            &json!({"accepted": accepted, "duplicates": duplicates, "rejected": rejected}),
        ))
    }

    /// Validates one message of a send. The hub fills a missing id, time and priority, but
    /// needs `source` to route a broadcast.
    fn check_message(&self, item: Value) -> Result<Message, Refusal> {
        let size = serde_json::to_vec(&item)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        let limit = self.max_message_bytes();
        if size > limit {
            return Err(Refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("message is {size} bytes; the limit is {limit}"),
            ));
        }
        let source = item
            .get("source")
            .and_then(Value::as_str)
            .map(str::to_string);
        let Some(source) = source else {
            return Err(Refusal::bad_request("missing field `source`"));
        };
        Message::complete(item, &source).map_err(Refusal::bad_request)
    }

    /// `GET /v1/messages?host=H&wait=S&max=N`: the host's next messages, waiting up to S
    /// seconds for one to arrive.
    ///
    /// The request is dropped before the wait: its head points into hyper's read buffer,
    /// which hyper would otherwise have to leave alone and allocate another beside. While it
    /// waits, the poll is offered to the connection, which may take it out of hyper
    /// altogether (see `park`).
    async fn pull(&self, req: Request<Incoming>, caller: &Caller, park: &ParkOffer) -> Handled {
        let query = Query::parse(req.uri().query().unwrap_or(""))?;
        let keep_alive = !closes(&req);
        // What `park` can answer: HTTP/1.1 (its keep-alive rules), and no body left unread
        // in hyper's buffer to be taken for the next request.
        let parkable = req.version() == Version::HTTP_11 && req.body().is_end_stream();
        drop(req);
        let host = own_host(caller, query.host)?;
        self.register(&host).await?;
        let slot = if query.wait.is_zero() {
            None
        } else {
            Some(PollSlot::take(&self.polls, &host)?)
        };
        let deadline = tokio::time::Instant::now() + query.wait.min(MAX_WAIT);
        let mut poll = LongPoll {
            host,
            max: query.max,
            deadline,
            keep_alive,
            _slot: slot,
        };
        loop {
            let notify = self.waiter(&poll);
            let notified = notify.notified();
            tokio::pin!(notified);
            // Registered before the fetch: a message committed after it wakes us.
            notified.as_mut().enable();
            if let Some(answer) = self.look(&poll).await {
                return Ok(answer);
            }
            // Kept here when it cannot be parked, on offer when it can.
            let kept = if parkable {
                park.offer(poll);
                None
            } else {
                Some(poll)
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.shutdown.cancelled() => {
                    drop(park.take());
                    return Ok(messages_answer(&[]));
                }
            }
            // Taken back from the offer: had the connection taken it, this future would
            // have been dropped with hyper's connection.
            poll = match kept.or_else(|| park.take()) {
                Some(poll) => poll,
                None => return Ok(messages_answer(&[])),
            };
        }
    }

    /// The host's queue, waited on by [`LongPoll`]s: take a `notified()` from it, and
    /// enable that, before [`Api::look`], so that no wake-up is lost.
    pub fn waiter(&self, poll: &LongPoll) -> Arc<tokio::sync::Notify> {
        self.store.waiter(&poll.host)
    }

    /// One look at a long-poll's queue: the answer when there are messages, the time is up
    /// or the store failed; `None` while it must wait.
    pub async fn look(&self, poll: &LongPoll) -> Option<Answer> {
        match self.store.fetch(&poll.host, poll.max).await {
            Ok(messages)
                if !messages.is_empty() || tokio::time::Instant::now() >= poll.deadline =>
            {
                Some(messages_answer(&messages))
            }
            Ok(_) => None,
            Err(err) => {
                let Refusal(status, message) = internal(err);
                Some(error(status, &message))
            }
        }
    }

    /// `POST /v1/ack`: `{"host": H, "ids": [...]}`.
    async fn ack(&self, req: Request<Incoming>, caller: &Caller) -> Handled {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Ack {
            host: String,
            ids: Vec<Uuid>,
        }
        let body = read_body(req, MAX_SMALL_BODY).await?;
        let ack: Ack = serde_json::from_slice(&body)
            .map_err(|e| Refusal::bad_request(format!("invalid ack: {e}")))?;
        validate_name("host", &ack.host).map_err(Refusal::bad_request)?;
        let host = own_host(caller, Some(ack.host))?;
        self.register(&host).await?;
        let acked = self.store.ack(&host, ack.ids).await.map_err(internal)?;
        Ok(json_answer(StatusCode::OK, &json!({ "acked": acked })))
    }

    fn hosts(&self) -> Answer {
        json_answer(StatusCode::OK, &json!({ "hosts": self.store.hosts() }))
    }

    async fn remove_host(&self, host: &str) -> Handled {
        validate_name("host", host).map_err(Refusal::bad_request)?;
        match self.store.remove_host(host).await.map_err(internal)? {
            Some(dropped) => Ok(json_answer(
                StatusCode::OK,
                &json!({"removed": host, "dropped": dropped}),
            )),
            None => Err(Refusal(StatusCode::NOT_FOUND, format!("no host {host}"))),
        }
    }

    /// Metrics of the HTTP layer: long-polls open, failed TLS handshakes.
    fn poll_metrics(&self) -> String {
        let open: usize = self
            .polls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum();
        let tls_failures = self.tls_failures.load(Ordering::Relaxed);
        format!(
            "# HELP mesync_long_polls_open Long-polls waiting at the hub.\n\
             # TYPE mesync_long_polls_open gauge\nmesync_long_polls_open {open}\n\
             # HELP mesync_tls_handshake_failures_total TLS handshakes that failed or timed out.\n\
             # TYPE mesync_tls_handshake_failures_total counter\n\
             mesync_tls_handshake_failures_total {tls_failures}\n"
        )
    }

    async fn healthz(&self) -> Answer {
        match self.store.health().await {
            Ok(()) => json_answer(StatusCode::OK, &json!({"status": "ok"})),
            Err(why) => json_answer(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "error", "error": why}),
            ),
        }
    }

    async fn register(&self, host: &str) -> Result<(), Refusal> {
        self.store.register(host).await.map_err(internal)
    }
}

/// A long-poll waiting for a host's messages: what it waits for, and the slot it holds.
pub struct LongPoll {
    host: String,
    max: usize,
    deadline: tokio::time::Instant,
    /// Whether the connection stays open after the answer: HTTP/1.1 without
    /// `Connection: close`.
    pub keep_alive: bool,
    /// Given back however the poll ends: answered, its client gone, or shut down.
    _slot: Option<PollSlot>,
}

impl LongPoll {
    /// When the poll is answered, with no messages if none came.
    pub fn deadline(&self) -> tokio::time::Instant {
        self.deadline
    }
}

/// Where a pull handler offers its waiting long-poll to the connection it came on. The
/// connection may take it and wait outside hyper (see `park`), dropping the handler; the
/// handler takes it back when it wakes first.
#[derive(Default)]
pub struct ParkOffer(Mutex<Option<LongPoll>>);

impl ParkOffer {
    fn offer(&self, poll: LongPoll) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(poll);
    }

    /// The long-poll on offer, if any.
    pub fn take(&self) -> Option<LongPoll> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Whether a request asks for its connection to close after the answer.
fn closes<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

/// One of a host's long-poll slots, given back when dropped.
struct PollSlot {
    polls: Arc<Mutex<HashMap<String, usize>>>,
    host: String,
}

impl PollSlot {
    fn take(polls: &Arc<Mutex<HashMap<String, usize>>>, host: &str) -> Result<PollSlot, Refusal> {
        let mut open = polls.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(host.to_string()).or_default();
        if *count >= MAX_POLLS_PER_HOST {
            return Err(Refusal(
                StatusCode::TOO_MANY_REQUESTS,
                format!("host {host} already has {MAX_POLLS_PER_HOST} long-polls open"),
            ));
        }
        *count += 1;
        Ok(PollSlot {
            polls: Arc::clone(polls),
            host: host.to_string(),
        })
    }
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        let mut open = self.polls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.host) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.host);
            }
        }
    }
}

/// The host whose queue a call works on: the one named, which with tokens must be the
/// caller's own (a host pulls and acks only its own queue); the caller's when none is named.
fn own_host(caller: &Caller, named: Option<String>) -> Result<String, Refusal> {
    match (caller, named) {
        (Caller::Host(me), Some(named)) if *me != named => Err(Refusal(
            StatusCode::FORBIDDEN,
            format!("this token is for host {me}, not {named}"),
        )),
        (Caller::Host(me), _) => Ok(me.clone()),
        (Caller::Open, Some(named)) => Ok(named),
        (Caller::Open, None) => Err(Refusal::bad_request("missing query parameter `host`")),
    }
}

/// The more serious of two statuses, for a batch's overall answer.
fn worse(a: StatusCode, b: StatusCode) -> StatusCode {
    let rank = |s: StatusCode| match s.as_u16() {
        200 => 0,
        429 => 1,
        500..=506 | 508.. => 2,
        507 => 3,
        _ => 0,
    };
    if rank(b) > rank(a) { b } else { a }
}

/// A store failure: logged in full here, answered without internals. A shortage at the
/// hub (space, inodes, quota, a read-only disk, file descriptors) is 507 or 503, which
/// agents retry; anything else is 500.
fn internal(err: crate::error::Error) -> Refusal {
    if let Some(resource) = err.shortage() {
        tracing::warn!(%err, resource = resource.name(), "store short of a resource");
        let status =
            StatusCode::from_u16(resource.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return Refusal(
            status,
            format!("the hub cannot do this now: {}", resource.describe()),
        );
    }
    tracing::error!(%err, "store failure");
    Refusal(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; see the hub's log".into(),
    )
}

struct Query {
    host: Option<String>,
    wait: Duration,
    max: usize,
}

impl Query {
    fn parse(query: &str) -> Result<Query, Refusal> {
        let mut parsed = Query {
            host: None,
            wait: Duration::ZERO,
            max: DEFAULT_FETCH,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "host" => {
                    validate_name("host", value).map_err(Refusal::bad_request)?;
                    parsed.host = Some(value.to_string());
                }
                "wait" => {
                    let seconds: f64 = value
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                        .ok_or_else(|| {
                            Refusal::bad_request(format!(
                                "invalid wait {value:?}: seconds, 0 to 60"
                            ))
                        })?;
                    parsed.wait = Duration::from_secs_f64(seconds.min(MAX_WAIT.as_secs_f64()));
                }
                "max" => {
                    parsed.max = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_FETCH).contains(n))
                        .ok_or_else(|| {
                            Refusal::bad_request(format!("invalid max {value:?}: 1 to {MAX_FETCH}"))
                        })?;
                }
                _ => {
                    return Err(Refusal::bad_request(format!(
                        "unknown query parameter {key:?}"
                    )));
                }
            }
        }
        Ok(parsed)
    }
}

async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Refusal> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit)),
        Err(_) => Err(Refusal::bad_request("could not read the request body")),
    }
}

fn too_large(limit: usize) -> Refusal {
    Refusal(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is over the limit of {limit} bytes"),
    )
}

/// `{"messages": [...]}` assembled from the stored JSON without parsing it again.
pub fn messages_answer(messages: &[Bytes]) -> Answer {
    let size = messages.iter().map(Bytes::len).sum::<usize>() + messages.len() + 16;
    let mut body = BytesMut::with_capacity(size);
    body.extend_from_slice(b"{\"messages\":[");
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            body.extend_from_slice(b",");
        }
        body.extend_from_slice(message);
    }
    body.extend_from_slice(b"]}");
    bytes_answer(StatusCode::OK, "application/json", body.freeze())
}

fn json_answer(status: StatusCode, value: &Value) -> Answer {
    let body = serde_json::to_vec(value).expect("a JSON value serializes");
    bytes_answer(status, "application/json", Bytes::from(body))
}

fn text(body: String) -> Answer {
    bytes_answer(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        Bytes::from(body),
    )
}

/// The one way an error becomes an answer.
pub fn error(status: StatusCode, message: &str) -> Answer {
    json_answer(status, &json!({ "error": message }))
}

fn bytes_answer(status: StatusCode, content_type: &'static str, body: Bytes) -> Answer {
    let mut answer = Response::new(Full::new(body));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_checked() {
        let q = Query::parse("host=a&wait=5&max=10").ok().unwrap();
        assert_eq!(q.host.as_deref(), Some("a"));
        assert_eq!(q.wait, Duration::from_secs(5));
        assert_eq!(q.max, 10);
        let q = Query::parse("host=a&wait=600").ok().unwrap();
        assert_eq!(q.wait, MAX_WAIT);
        for bad in [
            "host=../x",
            "wait=-1",
            "wait=nan",
            "max=0",
            "max=5000",
            "bogus=1",
        ] {
            assert!(Query::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_worst_status_wins() {
        let ok = StatusCode::OK;
        assert_eq!(
            worse(ok, StatusCode::TOO_MANY_REQUESTS),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            worse(
                StatusCode::INSUFFICIENT_STORAGE,
                StatusCode::TOO_MANY_REQUESTS
            ),
            StatusCode::INSUFFICIENT_STORAGE
        );
    }
}
