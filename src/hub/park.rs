//! Long-polls parked outside hyper.
//!
//! hyper keeps two 8 KiB buffers per HTTP/1 connection (one to read, one to write) for as
//! long as it serves it, and a long-poll waiting inside a handler keeps them, and the
//! handler's future, for the whole wait: about 14 KiB of an idle hub's memory per agent.
//! So a pull handler that has to wait offers its [`LongPoll`] to the connection
//! ([`ParkOffer`]); the connection task takes it once hyper has nothing left to send,
//! takes the socket back from hyper (`into_parts`, which frees hyper's buffers and drops
//! the handler), and waits here with nothing but the socket: [`wait`] for a message, the
//! deadline or the client going away, then [`write_answer`] itself, and hands the socket to
//! a new hyper connection for the next request.
//!
//! What holds as with a poll waiting inside hyper: the wake-up is registered before each
//! fetch, so a message committed at any moment wakes the poll; the poll keeps its slot
//! (the per-host cap) until it ends; a client that closes its end ends the poll at once;
//! shutdown answers it empty, closing the connection (the drain).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::api::{Answer, Api, LongPoll, ParkOffer};
use super::store::Store;

/// Bytes read at most when the client sends something while its poll is parked: HTTP/1.1
/// lets it send its next request early. They are kept for hyper.
const EARLY_BYTES: usize = 4096;

/// What a connection shares with the requests hyper serves on it.
#[derive(Default)]
pub struct Parking {
    /// The long-poll a pull handler offers.
    pub offer: ParkOffer,
    /// Whether hyper wrote something it has not flushed yet. hyper flushes only once its
    /// own buffer is empty, so while this is false hyper holds nothing unsent, and the
    /// socket can be taken from it without losing a byte.
    unflushed: AtomicBool,
}

impl Parking {
    /// The offered long-poll, if there is one and hyper can be left now.
    pub fn take(&self) -> Option<LongPoll> {
        if self.unflushed.load(Ordering::Relaxed) {
            return None;
        }
        self.offer.take()
    }
}

/// A stream over a TCP socket (plain, or TLS over it), whose readiness tells when the
/// client sends something or goes away.
pub trait OverTcp: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

/// The connection's stream as hyper reads and writes it: first the bytes hyper had read
/// and not used when the socket was taken from it, then the stream; writes and flushes
/// are tracked for [`Parking::take`].
pub struct Tracked<S> {
    stream: S,
    unread: Bytes,
    parking: Arc<Parking>,
}

impl<S: OverTcp> Tracked<S> {
    pub fn new(stream: S, parking: Arc<Parking>) -> Tracked<S> {
        Tracked {
            stream,
            unread: Bytes::new(),
            parking,
        }
    }

    /// Puts back bytes that hyper read and did not use, before any still unread. They are
    /// copied out: `bytes` is a view of hyper's whole read buffer, which must not be kept
    /// alive by a few bytes (or none) in it.
    pub fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        let mut both = BytesMut::with_capacity(bytes.len() + self.unread.len());
        both.extend_from_slice(&bytes);
        both.extend_from_slice(&self.unread);
        self.unread = both.freeze();
    }

    /// Returns when the client has closed its end of the connection, or the connection
    /// failed. Bytes that come instead (the next request, sent early) are kept for hyper,
    /// and a close can no longer be told from them: then this never returns, as hyper does
    /// not notice a close behind a request it has not read either.
    async fn closed(&mut self) {
        if !self.unread.is_empty() {
            return std::future::pending().await;
        }
        // A peek at the socket first, so that a parked connection holds no buffer. (Its
        // readiness alone would not do: it can still be set from the request's bytes.)
        let mut probe = [0u8; 1];
        match self.stream.tcp().peek(&mut probe).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut early = BytesMut::with_capacity(EARLY_BYTES);
        match self.stream.read_buf(&mut early).await {
            Ok(0) | Err(_) => {}
            Ok(_) => {
                self.unread = early.freeze();
                std::future::pending().await
            }
        }
    }
}

impl<S: OverTcp> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread[..n]);
            self.unread.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: OverTcp> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.parking.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.parking.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.parking.unflushed.store(false, Ordering::Relaxed);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Waits, outside hyper, until `poll` has its answer; `None` when the client went away
/// first (dropping the poll gives its slot back).
pub async fn wait<S: Store, T: OverTcp>(
    api: &Api<S>,
    poll: &LongPoll,
    io: &mut Tracked<T>,
) -> Option<Answer> {
    let closed = io.closed();
    tokio::pin!(closed);
    loop {
        let notify = api.waiter(poll);
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before the fetch: a message committed after it wakes us.
        notified.as_mut().enable();
        // Boxed: the fetch's state is needed only while it runs, not while the poll waits.
        if let Some(answer) = Box::pin(api.look(poll)).await {
            return Some(answer);
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(poll.deadline()) => {}
            _ = &mut closed => return None,
        }
    }
}

/// Writes an answer as HTTP/1.1, as hyper would: the status, the answer's headers, its
/// length, the date, and `Connection: close` when the connection ends after it.
pub async fn write_answer<T: OverTcp>(
    io: &mut Tracked<T>,
    answer: Answer,
    keep_alive: bool,
) -> io::Result<()> {
    let (head, body) = answer.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            head.status.as_str(),
            head.status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in &head.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT");
    out.extend_from_slice(format!("content-length: {}\r\ndate: {date}\r\n", body.len()).as_bytes());
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    io.write_all(&out).await?;
    io.flush().await
}
