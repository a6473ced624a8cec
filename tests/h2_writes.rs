//! The vendored h2's write grouping (`vendor/h2/TBOT-PATCH.md`, "Fewer writes per call"): frames
//! that are ready together go out in one write. Each write on a connection is a syscall, a TLS
//! record and a TCP segment, and an agent's join was 15 of them where a bare TLS handshake is 5.
//! These drive h2 itself over an in-memory connection that counts the writes made to it, one poll
//! at a time, so what is counted does not depend on timing.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One end of an in-memory connection, counting the writes made to it.
struct Counted {
    io: DuplexStream,
    writes: Arc<AtomicUsize>,
}

impl Counted {
    fn new(io: DuplexStream) -> (Counted, Arc<AtomicUsize>) {
        let writes = Arc::new(AtomicUsize::new(0));
        (
            Counted {
                io,
                writes: writes.clone(),
            },
            writes,
        )
    }
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        written
    }

    /// As a TCP or TLS stream: vectored, so h2 would chain payloads (upstream, from 256 bytes).
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Polls `future` once (it is driven, not awaited: a connection never ends by itself).
fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    let waker = std::task::Waker::noop();
    Pin::new(future).poll(&mut Context::from_waker(waker))
}

fn request() -> http::Request<()> {
    http::Request::post("https://issuer.example/tbot.Join/Join")
        .body(())
        .unwrap()
}

#[tokio::test]
async fn a_clients_preface_settings_and_first_request_with_its_data_go_out_in_one_write() {
    let (client_end, mut server_end) = tokio::io::duplex(1 << 16);
    let (client_end, writes) = Counted::new(client_end);
    let (send, mut connection) = h2::client::handshake(client_end).await.unwrap();
    assert_eq!(
        writes.load(Ordering::SeqCst),
        0,
        "the handshake only buffers the preface"
    );

    let mut send = send.ready().await.unwrap();
    let (_response, mut body) = send.send_request(request(), false).unwrap();
    // What hyper does with a request body's first chunk: ask for capacity, and send it only if
    // some is there (otherwise the body waits in a task of its own, and goes out in a later write).
    body.reserve_capacity(5);
    assert!(
        body.capacity() > 0,
        "a new stream on a connection with room is given send capacity before the connection runs"
    );
    body.send_data(Bytes::from_static(b"hello"), true).unwrap();

    assert!(poll_once(&mut connection).is_pending());
    assert_eq!(
        writes.load(Ordering::SeqCst),
        1,
        "preface, SETTINGS, WINDOW_UPDATE, HEADERS and DATA in one write"
    );
    let mut sent = vec![0u8; 1 << 16];
    let n = tokio::io::AsyncReadExt::read(&mut server_end, &mut sent).await.unwrap();
    assert!(sent[..n].starts_with(PREFACE), "the preface comes first");
}

#[tokio::test]
async fn a_servers_settings_go_with_its_settings_ack_and_a_whole_response_in_one_write() {
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let (mut send, mut client) = h2::client::handshake(client_end).await.unwrap();
    let (response, _) = send.send_request(request(), true).unwrap();
    // The client's preface, SETTINGS and request are on the wire before the server starts.
    assert!(poll_once(&mut client).is_pending());

    let (server_end, writes) = Counted::new(server_end);
    let mut server = h2::server::handshake(server_end).await.unwrap();
    let (_request, mut respond) = server.accept().await.unwrap().unwrap();
    assert_eq!(
        writes.load(Ordering::SeqCst),
        1,
        "the server's SETTINGS wait for the preface, then go with the SETTINGS ACK"
    );

    // A gRPC answer: headers, a message of a few KiB (a certificate and its bundle), trailers.
    let mut stream = respond.send_response(http::Response::new(()), false).unwrap();
    stream.reserve_capacity(2048);
    stream.send_data(Bytes::from(vec![7u8; 2048]), false).unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    stream.send_trailers(trailers).unwrap();
    let accepting = std::future::poll_fn(|cx| {
        let _ = server.poll_accept(cx);
        Poll::Ready(())
    });
    accepting.await;
    assert_eq!(
        writes.load(Ordering::SeqCst),
        2,
        "the response's HEADERS, its 2 KiB of DATA and its trailers in one write"
    );

    // And the client reads all of it.
    let driving = tokio::spawn(client);
    let response = response.await.unwrap();
    let mut body = response.into_body();
    let mut got = 0;
    while let Some(chunk) = body.data().await {
        got += chunk.unwrap().len();
    }
    assert_eq!(got, 2048);
    assert_eq!(body.trailers().await.unwrap().unwrap()["grpc-status"], "0");
    driving.abort();
}

#[tokio::test]
async fn a_server_flushes_its_settings_when_the_clients_preface_is_not_there_yet() {
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let (server_end, writes) = Counted::new(server_end);
    let mut handshake = Box::pin(h2::server::handshake(server_end));
    assert!(poll_once(&mut handshake).is_pending());
    assert_eq!(
        writes.load(Ordering::SeqCst),
        1,
        "nothing to read: the SETTINGS are not held back"
    );
    // The client still connects.
    let (mut send, client) = h2::client::handshake(client_end).await.unwrap();
    let driving = tokio::spawn(client);
    let (response, _) = send.send_request(request(), true).unwrap();
    let mut server = handshake.await.unwrap();
    let (_, mut respond) = server.accept().await.unwrap().unwrap();
    respond.send_response(http::Response::new(()), true).unwrap();
    let serving = tokio::spawn(async move { while server.accept().await.is_some() {} });
    assert_eq!(response.await.unwrap().status(), 200);
    driving.abort();
    serving.abort();
}
