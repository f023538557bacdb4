//! Accepting gRPC connections over TCP.
//!
//! The HTTP/2 server allocates some 30 KiB per connection as soon as it takes one (h2's
//! 16 KiB write buffer, the 8 KiB read buffer under it, the HPACK decoder's 4 KiB), and its
//! keepalive only starts once the connection speaks HTTP/2. So a connection reaches it only
//! after it has proved to be an HTTP/2 client: the 24-byte preface and the header of the
//! SETTINGS frame that must follow it (RFC 9113 §3.4), within [`PREFACE_DEADLINE`]. Until
//! then it costs a socket, a small future and those 33 bytes, which the server then reads
//! first; anything else, random bytes or HTTP/1.1, is closed as soon as its first bytes
//! differ, and a client that leaves is let go at once. Many connections wait side by side,
//! so a slow one delays no other.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::debug;

use crate::memory::{TrimOnDrop, Trimmer};

/// What every HTTP/2 client sends first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface and the 9-byte header of the client's first frame.
const PROOF_LEN: usize = PREFACE.len() + 9;
const SETTINGS: u8 = 0x4;
/// Largest first SETTINGS payload accepted: six bytes per setting, and HTTP/2 defines
/// seven; h2 allows a client 16 KiB.
const MAX_SETTINGS_LEN: usize = 16 * 1024;
pub const PREFACE_DEADLINE: Duration = Duration::from_secs(10);
/// Connections waiting for their preface at once; more wait to be accepted. Each costs
/// under 1 KiB while it waits (massif: its task ~400 B, its socket's registration ~250 B),
/// so this is about the file descriptors a flood may hold.
const PENDING_HANDSHAKES: usize = 8192;

/// Passes on the connections of `incoming` that prove to be HTTP/2 clients in time;
/// `trimmer` hands their memory back after they close.
pub fn require_preface(
    incoming: impl Stream<Item = io::Result<TcpStream>>,
    trimmer: Trimmer,
) -> impl Stream<Item = io::Result<GrpcConnection>> {
    incoming
        .map(move |accepted| {
            let trim = trimmer.on_drop();
            async move {
                let mut stream = match accepted {
                    Ok(stream) => stream,
                    // tonic logs accept errors and goes on.
                    Err(err) => return Some(Err(err)),
                };
                let peer = stream.peer_addr().ok();
                match tokio::time::timeout(PREFACE_DEADLINE, read_proof(&mut stream)).await {
                    Ok(Ok(Proof::Http2(proof))) => Some(Ok(GrpcConnection {
                        stream,
                        proof,
                        replayed: 0,
                        _trim: trim,
                    })),
                    Ok(Ok(Proof::Closed)) => None,
                    Ok(Ok(Proof::NotHttp2)) => {
                        debug!(?peer, "not an HTTP/2 client; closing");
                        None
                    }
                    Ok(Err(err)) => {
                        debug!(?peer, %err, "connection failed before its HTTP/2 preface");
                        None
                    }
                    Err(_) => {
                        debug!(?peer, "no HTTP/2 preface in time; closing");
                        None
                    }
                }
            }
        })
        .buffer_unordered(PENDING_HANDSHAKES)
        .filter_map(std::future::ready)
}

#[derive(Debug, PartialEq, Eq)]
enum Proof {
    /// The first [`PROOF_LEN`] bytes, read, to be handed to the HTTP/2 server.
    Http2([u8; PROOF_LEN]),
    NotHttp2,
    Closed,
}

/// Reads the first [`PROOF_LEN`] bytes as they come and judges them. Read rather than
/// peeked: a peek would keep seeing bytes a client left behind when it closed.
async fn read_proof(stream: &mut TcpStream) -> io::Result<Proof> {
    let mut proof = [0u8; PROOF_LEN];
    let mut filled = 0;
    while filled < PROOF_LEN {
        match stream.read(&mut proof[filled..]).await? {
            0 => return Ok(Proof::Closed),
            n => filled += n,
        }
        if !right_so_far(&proof[..filled]) {
            return Ok(Proof::NotHttp2);
        }
    }
    Ok(Proof::Http2(proof))
}

/// Whether a connection's first bytes are the preface and a client's SETTINGS frame
/// header, or the beginning of them.
fn right_so_far(first: &[u8]) -> bool {
    let preface = &first[..first.len().min(PREFACE.len())];
    if preface != &PREFACE[..preface.len()] {
        return false;
    }
    let Some(frame) = first.get(PREFACE.len()..PROOF_LEN) else {
        return true;
    };
    let len = usize::from(frame[0]) << 16 | usize::from(frame[1]) << 8 | usize::from(frame[2]);
    let (kind, flags) = (frame[3], frame[4]);
    let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
    // Not an acknowledgement (flag 0x1), on the connection (stream 0), whole settings.
    kind == SETTINGS && flags & 0x1 == 0 && stream == 0 && len % 6 == 0 && len <= MAX_SETTINGS_LEN
}

/// An accepted connection that proved to be an HTTP/2 client; when the gRPC server drops
/// it, the memory it used is handed back.
pub struct GrpcConnection {
    stream: TcpStream,
    proof: [u8; PROOF_LEN],
    /// How much of `proof` the server has read: it reads the proof first.
    replayed: usize,
    _trim: TrimOnDrop,
}

impl Connected for GrpcConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for GrpcConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < PROOF_LEN {
            let rest = &this.proof[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for GrpcConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_header(len: usize, flags: u8, stream: u32) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(&(len as u32).to_be_bytes()[1..]);
        bytes.extend([SETTINGS, flags]);
        bytes.extend(stream.to_be_bytes());
        bytes
    }

    #[test]
    fn a_preface_and_a_settings_header_prove_an_http2_client() {
        assert!(right_so_far(&settings_header(0, 0, 0)));
        assert!(right_so_far(&settings_header(18, 0, 0)));
        assert!(
            right_so_far(&settings_header(0, 0x80, 0)),
            "unknown flags are ignored"
        );
    }

    #[test]
    fn the_beginning_of_the_proof_is_right_so_far() {
        let whole = settings_header(0, 0, 0);
        for n in 0..PROOF_LEN {
            assert!(right_so_far(&whole[..n]), "{n} bytes");
        }
    }

    #[test]
    fn anything_else_is_refused_at_its_first_wrong_byte() {
        assert!(!right_so_far(b"G"));
        assert!(!right_so_far(b"GET / HTTP/1.1\r\n"));
        assert!(!right_so_far(b"\x16\x03\x01"));
        assert!(!right_so_far(b"PRI * HTTP/1.1"));
        // The preface, then something other than a client's SETTINGS.
        let mut headers = settings_header(0, 0, 0);
        headers[PREFACE.len() + 3] = 0x1;
        assert!(!right_so_far(&headers));
        assert!(!right_so_far(&settings_header(0, 0x1, 0)));
        assert!(!right_so_far(&settings_header(0, 0, 1)));
        assert!(!right_so_far(&settings_header(7, 0, 0)));
        assert!(!right_so_far(&settings_header(MAX_SETTINGS_LEN + 6, 0, 0)));
    }

    #[tokio::test]
    async fn the_server_reads_the_proof_then_the_rest() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut client = TcpStream::connect(addr).await.unwrap();
            // In pieces, as a slow client sends it.
            let mut sent = settings_header(6, 0, 0);
            sent.extend([0, 3, 0, 0, 0, 100]);
            for piece in sent.chunks(5) {
                tokio::io::AsyncWriteExt::write_all(&mut client, piece)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sent
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let Proof::Http2(proof) = read_proof(&mut stream).await.unwrap() else {
            panic!("a real preface was refused");
        };
        let mut connection = GrpcConnection {
            stream,
            proof,
            replayed: 0,
            _trim: Trimmer::start().on_drop(),
        };
        let sent = client.await.unwrap();
        let mut read = vec![0u8; sent.len()];
        connection.read_exact(&mut read).await.unwrap();
        assert_eq!(read, sent);
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_preface_is_let_go() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut client, PREFACE)
            .await
            .unwrap();
        drop(client);
        let (mut stream, _) = listener.accept().await.unwrap();
        assert_eq!(read_proof(&mut stream).await.unwrap(), Proof::Closed);
    }
}
