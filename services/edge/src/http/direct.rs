//! SSE streams served straight on the socket, without hyper's buffers.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB header write buffer for the
//! whole life of a connection; for a stream that sits idle for hours that is
//! most of its memory (docs/benchmarks.md). So the accept loop reads the
//! first request head itself, into a buffer sized to the head:
//!
//! - a complete, well-formed `GET /v1/stream` without a body is answered here:
//!   the same warp filter tree builds the response (auth, CORS, refusals,
//!   errors are unchanged), the head is written once, and the body's frames go
//!   to the socket as they come, delimited by the connection's end
//!   (`Connection: close`), so nothing is buffered between them;
//! - anything else (other paths, methods, bodies, malformed or oversized
//!   heads) goes to hyper with the bytes already read put back in front
//!   ([`Rewind`]), and hyper answers exactly as before.
//!
//! The head must arrive within `http.header_read_timeout_ms`, as with hyper.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use warp::http::{self, HeaderName, HeaderValue};

use super::rare_wake::RareWake;
use super::server::MAX_HEADERS;
use crate::registry::Kill;

/// What the first request head turned out to be.
#[derive(Debug)]
pub(crate) enum FirstRequest {
    /// A stream request, answered by [`serve_stream`].
    Stream(http::Request<http_body_util::Empty<Bytes>>),
    /// Anything else: hyper serves the connection, starting with these bytes.
    Other(Bytes),
    /// The client closed, failed or did not finish its head in time.
    Gone,
}

/// Reads the first request head (up to `max_bytes`, within `timeout`).
pub(crate) async fn read_first_request(
    socket: &mut TcpStream,
    max_bytes: usize,
    timeout: Duration,
) -> FirstRequest {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if buf.len() >= max_bytes {
            // Too large for us; hyper answers it with 431.
            return FirstRequest::Other(buf.freeze());
        }
        let read = tokio::time::timeout_at(deadline, socket.read_buf(&mut buf)).await;
        match read {
            Err(_) | Ok(Err(_)) => return FirstRequest::Gone,
            Ok(Ok(0)) if buf.is_empty() => return FirstRequest::Gone,
            Ok(Ok(0)) => return FirstRequest::Other(buf.freeze()),
            Ok(Ok(_)) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut head = httparse::Request::new(&mut headers);
        match head.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let stream = (len == buf.len()).then(|| stream_request(&head)).flatten();
                return match stream {
                    Some(request) => FirstRequest::Stream(request),
                    None => FirstRequest::Other(buf.freeze()),
                };
            }
            Ok(httparse::Status::Partial) => {}
            // Malformed or too many headers: hyper says so.
            Err(_) => return FirstRequest::Other(buf.freeze()),
        }
    }
}

/// The request, if it is a body-less `GET /v1/stream` this path serves.
fn stream_request(
    head: &httparse::Request<'_, '_>,
) -> Option<http::Request<http_body_util::Empty<Bytes>>> {
    let path = head.path?;
    let route = path.split('?').next()?;
    if head.method? != "GET" || route != "/v1/stream" {
        return None;
    }
    let mut request = http::Request::builder()
        .method(http::Method::GET)
        .uri(path)
        .version(match head.version? {
            0 => http::Version::HTTP_10,
            _ => http::Version::HTTP_11,
        });
    for header in head.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        if (name == http::header::CONTENT_LENGTH && header.value != b"0")
            || name == http::header::TRANSFER_ENCODING
            || name == http::header::UPGRADE
        {
            return None;
        }
        request = request.header(name, HeaderValue::from_bytes(header.value).ok()?);
    }
    request.body(http_body_util::Empty::new()).ok()
}

/// Answers a stream request with `routes` and streams the body to the socket
/// until it ends, the client goes away, the connection is killed, or `cut`.
pub(crate) async fn serve_stream<S>(
    socket: TcpStream,
    mut request: http::Request<http_body_util::Empty<Bytes>>,
    mut routes: S,
    kill: Kill,
    cut: CancellationToken,
) where
    S: tower_service::Service<
            http::Request<http_body_util::Empty<Bytes>>,
            Response = warp::reply::Response,
            Error = std::convert::Infallible,
        >,
{
    request.extensions_mut().insert(kill.clone());
    let Ok(response) = routes.call(request).await;
    let (parts, mut body) = response.into_parts();
    let length = http_body::Body::size_hint(&body).exact();
    let head = response_head(&parts, length);
    // Not held for the stream's life.
    drop(parts);
    let (reader, mut writer) = socket.into_split();
    let mut pending = Some(head);
    // Waited on for the stream's whole life, polled only when they wake
    // (see `rare_wake.rs`): most wake-ups are the body's or the socket's.
    let killed = kill.killed_owned();
    let cut = cut.cancelled_owned();
    tokio::pin!(killed, cut);
    let mut stops = Stops {
        rare: RareWake::new(),
        killed,
        cut,
        reader,
        scratch: [0; 64],
    };
    loop {
        if let Some(bytes) = pending.take() {
            let mut write = std::pin::pin!(writer.write_all(&bytes));
            let written = std::future::poll_fn(|cx| {
                if stops.any(cx) {
                    return Poll::Ready(false);
                }
                write.as_mut().poll(cx).map(|written| written.is_ok())
            })
            .await;
            if !written {
                return;
            }
        }
        let frame = std::future::poll_fn(|cx| {
            if stops.any(cx) {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let Some(frame) = frame else { return };
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        pending = Some(data);
                    }
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    let _ = writer.shutdown().await;
}

/// Why a stream stops besides its body ending: its connection was killed,
/// the node cut it, or the client went away (or sent more than we serve).
/// Looked at only when one of them woke `rare`, and always polled with it.
struct Stops<'a, K, C> {
    rare: RareWake,
    killed: Pin<&'a mut K>,
    cut: Pin<&'a mut C>,
    reader: tokio::net::tcp::OwnedReadHalf,
    scratch: [u8; 64],
}

impl<K: Future<Output = ()>, C: Future<Output = ()>> Stops<'_, K, C> {
    /// Whether the stream must stop now.
    fn any(&mut self, cx: &Context<'_>) -> bool {
        if !self.rare.woken(cx) {
            return false;
        }
        let mut rare_cx = self.rare.context();
        let mut read = ReadBuf::new(&mut self.scratch);
        self.killed.as_mut().poll(&mut rare_cx).is_ready()
            || self.cut.as_mut().poll(&mut rare_cx).is_ready()
            || Pin::new(&mut self.reader)
                .poll_read(&mut rare_cx, &mut read)
                .is_ready()
    }
}

/// `HTTP/1.1 <status>` and the headers, with `Connection: close` (the body
/// ends with the connection unless its length is known).
fn response_head(parts: &http::response::Parts, length: Option<u64>) -> Bytes {
    let mut head = BytesMut::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.extend_from_slice(b" ");
    head.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == http::header::CONNECTION || name == http::header::CONTENT_LENGTH {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // A 204 or 304 carries no body and no Content-Length (RFC 9110 §8.6).
    let bodiless = matches!(
        parts.status,
        http::StatusCode::NO_CONTENT | http::StatusCode::NOT_MODIFIED
    );
    if let Some(length) = length.filter(|_| !bodiless) {
        head.extend_from_slice(format!("content-length: {length}\r\n").as_bytes());
    }
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    head.extend_from_slice(format!("date: {date}\r\nconnection: close\r\n\r\n").as_bytes());
    head.freeze()
}

/// A socket with bytes already read put back in front of it.
#[derive(Debug)]
pub(crate) struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl Rewind {
    /// `inner`, reading `prefix` first.
    pub(crate) fn new(prefix: Bytes, inner: TcpStream) -> Self {
        Rewind { prefix, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
