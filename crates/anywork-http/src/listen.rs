//! A TCP listener for `axum::serve` whose connections have TCP_NODELAY and whose refusals made
//! below the application — by hyper, before any route or middleware runs — carry the same JSON
//! error body as every other refusal.
//!
//! hyper answers a request it cannot parse on its own and closes the connection: 400 for a
//! malformed request line or header, 414 for a request target longer than it reads (64 KiB),
//! 431 for a head larger than its read buffer, 505 for an unknown HTTP version. Those answers
//! have an empty body (`content-length: 0`), so a client sees a bare status where the API
//! promises `{"error":{"code","message"}}`. [`JsonErrors`] recognises exactly such a head on the
//! way out — one of those four statuses, a complete head with `content-length: 0` and nothing
//! after it — and sends the same head with a JSON body instead. Every other byte passes
//! through untouched (the application's own errors already have a JSON body, so a
//! `content-length: 0` error head can only be hyper's).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::serve::{ListenerExt as _, TapIo};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// `tcp` as a listener for [`axum::serve`]: hyper's own refusals as JSON errors
/// ([`JsonListener`]) and TCP_NODELAY on every connection (small frames such as SSE events and
/// WebSocket messages would otherwise wait for the peer's delayed ACK, ≈ 40 ms). The peer's
/// address is known to handlers through `into_make_service_with_connect_info::<SocketAddr>`,
/// as with a bare [`TcpListener`] (axum gives connect info to a tapped listener of any kind).
pub fn listener(tcp: TcpListener) -> TapIo<JsonListener, fn(&mut JsonErrors<TcpStream>)> {
    JsonListener::new(tcp).tap_io(|io| {
        let _ = io.get_ref().set_nodelay(true);
    })
}

/// A listener for [`axum::serve`] whose connections are [`JsonErrors`]; see [`listener`] for
/// one with TCP_NODELAY and connect info.
#[derive(Debug)]
pub struct JsonListener {
    inner: TcpListener,
}

impl JsonListener {
    /// Wraps a bound listener.
    pub fn new(inner: TcpListener) -> Self {
        Self { inner }
    }
}

impl axum::serve::Listener for JsonListener {
    type Io = JsonErrors<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's own accept loop: it retries transient errors (EMFILE, ECONNABORTED, …).
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (JsonErrors::new(tcp), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection whose hyper-made error answers are rewritten with a JSON body (see the
/// module's documentation); reads and all other writes go straight to `T`.
#[derive(Debug)]
pub struct JsonErrors<T> {
    io: T,
    /// A rewritten answer not yet fully written, and how much of it was.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> JsonErrors<T> {
    /// Wraps a connection.
    pub fn new(io: T) -> Self {
        Self { io, pending: None }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncWrite + Unpin> JsonErrors<T> {
    /// Writes what is left of a rewritten answer; ready when nothing is left.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.pending {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
            if *done == bytes.len() {
                self.pending = None;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `buf` as written when it is one of hyper's bare error heads, queuing its JSON
    /// version instead (written now as far as the socket takes it, the rest on flush).
    fn rewrite(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<io::Result<usize>> {
        let answer = json_error_answer(buf)?;
        self.pending = Some((answer, 0));
        match self.drain(cx) {
            Poll::Ready(Err(e)) => Some(Err(e)),
            // The bytes are ours now: hyper flushes next, which writes the rest.
            Poll::Ready(Ok(())) | Poll::Pending => Some(Ok(buf.len())),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        if let Some(done) = self.rewrite(cx, buf) {
            return Poll::Ready(done);
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        // An error head comes alone (its body is empty); anything with more is not one.
        let mut non_empty = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(head), None) = (non_empty.next(), non_empty.next())
            && let Some(done) = self.rewrite(cx, head)
        {
            return Poll::Ready(done);
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The JSON version of `head` when it is one of hyper's bare error answers: a complete
/// HTTP/1.x response head (nothing after its blank line) with status 400, 414, 431 or 505 and
/// `content-length: 0`. The status line and the other headers are kept; the body says what was
/// refused and what to do.
fn json_error_answer(head: &[u8]) -> Option<Vec<u8>> {
    // Every write of the connection passes here: a few byte compares decide for all but
    // hyper's short error heads (well under 1 KiB), before any pass over the bytes.
    let candidate = head.len() <= 1024
        && (head.starts_with(b"HTTP/1.1 4")
            || head.starts_with(b"HTTP/1.1 5")
            || head.starts_with(b"HTTP/1.0 4")
            || head.starts_with(b"HTTP/1.0 5"));
    if !candidate {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?;
    let rest = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))?;
    let message = match rest.get(..4)? {
        "400 " => {
            "the request is not valid HTTP/1.1: check its request line (method, target, version) \
             and headers"
        }
        "414 " => {
            "the request target is longer than the server reads (64 KiB; the API's own limit is \
             8 KiB): send large values in a request body"
        }
        "431 " => "the request's headers are larger than the server reads: send less in headers",
        "505 " => "the HTTP version is not served: use HTTP/1.1",
        _ => return None,
    };
    let lines = text.strip_suffix("\r\n\r\n")?;
    if lines.contains("\r\n\r\n") {
        return None;
    }
    let mut lines = lines.split("\r\n");
    let status_line = lines.next()?;
    let mut headers = Vec::new();
    let mut empty_body = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            if value.trim() != "0" {
                return None;
            }
            empty_body = true;
        } else {
            headers.push(line);
        }
    }
    if !empty_body {
        return None;
    }
    let body = json!({"error": {"code": "invalid_input", "message": message}}).to_string();
    let mut out = format!("{status_line}\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("content-type: application/json\r\n");
    out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    out.push_str(&body);
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::json_error_answer;

    #[test]
    fn only_bare_error_heads_are_rewritten() {
        let bare = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(json_error_answer(bare).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains("\r\ndate: x"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_input");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("request body")
        );
        for keep in [
            // The application's own answers: a body, another status, a partial head.
            &b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 12\r\n\r\n"[..],
            b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n",
            b"data: HTTP/1.1 400 \r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
            b"\xff\xfe",
            // Longer than any head hyper makes.
            &[
                b"HTTP/1.1 400 Bad Request\r\nx: ".as_slice(),
                &[b'a'; 1100],
                b"\r\ncontent-length: 0\r\n\r\n",
            ]
            .concat(),
        ] {
            assert!(
                json_error_answer(keep).is_none(),
                "{}",
                String::from_utf8_lossy(keep)
            );
        }
    }
}
