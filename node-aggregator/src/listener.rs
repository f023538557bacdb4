//! Accepting gRPC connections over TCP.
//!
//! HTTP/2 keepalive only starts once a connection speaks HTTP/2, so a client
//! that connects and sends nothing (or half the connection preface) would hold
//! a file descriptor forever. Each connection gets [`PREFACE_DEADLINE`] to send
//! the whole preface before it reaches the gRPC server; many connections wait
//! side by side, so a slow one delays no other.

use std::io;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::net::TcpStream;
use tracing::debug;

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, which every HTTP/2 client sends first.
const PREFACE_LEN: usize = 24;
pub const PREFACE_DEADLINE: Duration = Duration::from_secs(10);
/// Connections waiting for their preface at once; more wait to be accepted.
const PENDING_HANDSHAKES: usize = 1024;

/// Passes on the connections of `incoming` that send the HTTP/2 preface in time.
pub fn require_preface(
    incoming: impl Stream<Item = io::Result<TcpStream>>,
) -> impl Stream<Item = io::Result<TcpStream>> {
    incoming
        .map(|accepted| async move {
            let stream = match accepted {
                Ok(stream) => stream,
                // tonic logs accept errors and goes on.
                Err(err) => return Some(Err(err)),
            };
            match tokio::time::timeout(PREFACE_DEADLINE, preface_arrived(&stream)).await {
                Ok(Ok(true)) => Some(Ok(stream)),
                Ok(Ok(false)) => None,
                Ok(Err(err)) => {
                    debug!(%err, "connection failed before its HTTP/2 preface");
                    None
                }
                Err(_) => {
                    debug!(peer = ?stream.peer_addr().ok(), "no HTTP/2 preface in time; closing");
                    None
                }
            }
        })
        .buffer_unordered(PENDING_HANDSHAKES)
        .filter_map(std::future::ready)
}

/// Whether the first [`PREFACE_LEN`] bytes arrive (false when the peer closes first).
/// Peeking leaves them for the HTTP/2 server to read.
async fn preface_arrived(stream: &TcpStream) -> io::Result<bool> {
    let mut buf = [0u8; PREFACE_LEN];
    loop {
        match stream.peek(&mut buf).await? {
            0 => return Ok(false),
            n if n >= PREFACE_LEN => return Ok(true),
            // Part of it: the socket stays readable, so wait a little before looking again.
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
