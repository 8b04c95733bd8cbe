//! Light hosts: many simulated agents in one process, each a single TCP connection (plain
//! or TLS) speaking just enough of the hub's HTTP API to long-poll. They stand in for a
//! fleet (1,000 hosts for the broadcast figure, up to 20,000 for the idle one) that real
//! agent processes would make too heavy for the machine running the benchmark.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;

/// How light hosts reach the hub.
#[derive(Clone)]
pub enum Transport {
    Plain,
    /// TLS, trusting what the configuration trusts; the hub is addressed as `localhost`.
    Tls(TlsConnector),
}

impl Transport {
    pub fn tls(config: ClientConfig) -> Transport {
        Transport::Tls(TlsConnector::from(Arc::new(config)))
    }
}

/// A connection to the hub, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Raises this process's open-file limit (one descriptor per light host).
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Sends one request on a connection and reads one whole answer; returns the status and body.
pub async fn exchange(
    stream: &mut (impl Stream + ?Sized),
    request: &str,
) -> Result<(u16, Vec<u8>), String> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    // Read straight into the answer's buffer: tens of thousands of hosts each waiting in
    // this future must not each hold a scratch array.
    let mut buf = Vec::with_capacity(512);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(4096);
        }
        let n = stream.read_buf(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Ok((status, buf[end + 4..end + 4 + length].to_vec()));
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn get(addr: &str, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")
}

/// A fleet of light hosts named `{prefix}{i}`.
pub struct Fleet {
    /// Each host's time of receiving its first non-empty answer.
    received: mpsc::UnboundedReceiver<Instant>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Connects `count` hosts, registers each (a first poll that does not wait), then leaves
    /// each waiting in a long-poll of `wait` seconds, re-polling when it ends empty.
    pub async fn start(addr: &str, prefix: &str, count: usize, wait: u64) -> Result<Fleet, String> {
        Fleet::start_over(&Transport::Plain, addr, prefix, count, wait).await
    }

    /// [`Fleet::start`] over `transport`.
    pub async fn start_over(
        transport: &Transport,
        addr: &str,
        prefix: &str,
        count: usize,
        wait: u64,
    ) -> Result<Fleet, String> {
        let (tx, received) = mpsc::unbounded_channel();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
        let mut tasks = Vec::with_capacity(count);
        // Registering all at once would overflow the hub's listen backlog.
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(128));
        for i in 0..count {
            let gate = std::sync::Arc::clone(&gate);
            let transport = transport.clone();
            let addr = addr.to_string();
            let host = format!("{prefix}{i}");
            let tx = tx.clone();
            let ready = ready_tx.clone();
            tasks.push(tokio::spawn(async move {
                let permit = gate.acquire_owned().await;
                let mut stream = match connect_over(&transport, &addr).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let register = get(&addr, &format!("/v1/messages?host={host}&wait=0"));
                if let Err(e) = exchange(&mut stream, &register).await {
                    let _ = ready.send(Err(e));
                    return;
                }
                let _ = ready.send(Ok(()));
                drop(permit);
                let poll = get(
                    &addr,
                    &format!("/v1/messages?host={host}&wait={wait}&max=1000"),
                );
                loop {
                    match exchange(&mut stream, &poll).await {
                        Ok((200, body)) if body.len() > b"{\"messages\":[]}".len() => {
                            let _ = tx.send(Instant::now());
                            return;
                        }
                        Ok(_) => continue,
                        Err(_) => return,
                    }
                }
            }));
        }
        drop(ready_tx);
        for _ in 0..count {
            match tokio::time::timeout(Duration::from_secs(120), ready_rx.recv()).await {
                Ok(Some(Ok(()))) => {}
                Ok(Some(Err(e))) => return Err(format!("a light host failed to register: {e}")),
                Ok(None) | Err(_) => return Err("light hosts did not all register in time".into()),
            }
        }
        Ok(Fleet { received, tasks })
    }

    /// Waits until `count` hosts received a message; the time of the last one.
    pub async fn wait_received(
        &mut self,
        count: usize,
        timeout: Duration,
    ) -> Result<Instant, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = Instant::now();
        for got in 0..count {
            match tokio::time::timeout_at(deadline, self.received.recv()).await {
                Ok(Some(at)) => last = at,
                _ => return Err(format!("only {got} of {count} light hosts got the message")),
            }
        }
        Ok(last)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A connection over `transport`.
pub async fn connect_over(transport: &Transport, addr: &str) -> Result<Box<dyn Stream>, String> {
    let tcp = connect(addr).await?;
    match transport {
        Transport::Plain => Ok(Box::new(tcp)),
        Transport::Tls(connector) => {
            let name = ServerName::try_from("localhost").expect("localhost is a server name");
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
            Ok(Box::new(stream))
        }
    }
}

/// One GET on a connection of its own; the status and the body.
pub async fn get_over(
    transport: &Transport,
    addr: &str,
    path: &str,
) -> Result<(u16, Vec<u8>), String> {
    let mut stream = connect_over(transport, addr).await?;
    exchange(&mut stream, &get(addr, path)).await
}

async fn connect(addr: &str) -> Result<TcpStream, String> {
    // Many connections at once can overflow the listen backlog; retry briefly.
    for _ in 0..50 {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Err(format!("cannot connect to {addr}"))
}

/// POSTs one message and checks the hub accepted it.
pub async fn post(addr: &str, body: &str) -> Result<(), String> {
    let mut stream = connect(addr).await?;
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, answer) = exchange(&mut stream, &request).await?;
    if status != 200 {
        return Err(format!(
            "hub answered {status}: {}",
            String::from_utf8_lossy(&answer)
        ));
    }
    Ok(())
}
