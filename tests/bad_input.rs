//! Bad input against a real node-aggregator: garbage and half-written HTTP/2 on both ports,
//! malformed and oversized protobuf, 10,000 streams from one client, slow clients, invalid
//! names, forged withdrawals and second claims. After each, the aggregator still serves
//! everyone else, and the series of well-behaved streams are untouched.
//!
//! Everything runs on 127.0.0.1; every loop is bounded in count and time. The gRPC clients
//! are tonic's, with the generated `HypervisorReporterClient`; raw bytes go through
//! `std::net::TcpStream`; a report stream whose payload is garbage uses tonic's own framing
//! with a codec that sends bytes as they are (`e2e::grpc::raw_report`).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::binaries::Aggregator;
use e2e::grpc::{REPORT_PATH, Reporter, code_name, connect, domain, inventory, raw_report};
use e2e::tools::{http_get, promtool_check_metrics, wait_until};
use hypervisor_proto::v1::hypervisor_reporter_client::HypervisorReporterClient;
use hypervisor_proto::v1::{
    Domain, DomainReport, HypervisorType, ReportAck, domain_report::Change,
};
use prost::Message;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

/// How long one ack or one stream end may take on a busy 2-core machine; never a target.
const ANSWER: Duration = Duration::from_secs(15);

/// Prints past the test harness's output capture, so `cargo test` shows the figures.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "bad_input: {}", format!($($arg)*));
    }};
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A report stream on a connection of its own.
async fn open_reporter(aggregator: &Aggregator) -> Result<Reporter> {
    Reporter::open(connect(&aggregator.grpc_url(), ANSWER).await?, ANSWER).await
}

/// The well-behaved client whose series the bad input must leave alone: `vm-legit`, on
/// /metrics by the time this returns.
fn legit_reporter(rt: &Runtime, aggregator: &Aggregator) -> Result<Reporter> {
    let legit = rt.block_on(async {
        let mut legit = open_reporter(aggregator).await?;
        legit
            .report(domain("default", "vm-legit", HypervisorType::Kvm))
            .await?;
        anyhow::Ok(legit)
    })?;
    aggregator.wait_for_names(&["vm-legit"], ANSWER)?;
    Ok(legit)
}

fn counter(aggregator: &Aggregator, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    aggregator
        .metric(name, labels)?
        .with_context(|| format!("no sample {name}{labels:?} on /metrics"))
}

fn rejected(aggregator: &Aggregator, reason: &str) -> Result<f64> {
    counter(
        aggregator,
        "kubevirt_hypervisor_aggregator_reports_rejected_total",
        &[("reason", reason)],
    )
}

fn limit_hits(aggregator: &Aggregator, limit: &str) -> Result<f64> {
    counter(
        aggregator,
        "kubevirt_hypervisor_aggregator_limit_hits_total",
        &[("limit", limit)],
    )
}

fn streams_open(aggregator: &Aggregator) -> Result<f64> {
    counter(
        aggregator,
        "kubevirt_hypervisor_aggregator_streams_open",
        &[],
    )
}

/// `(name, hypervisor_type)` of every series on /metrics, sorted.
fn exposed(aggregator: &Aggregator) -> Result<Vec<(String, String)>> {
    let mut series: Vec<(String, String)> = aggregator
        .series()?
        .into_iter()
        .map(|labels| (labels["name"].clone(), labels["hypervisor_type"].clone()))
        .collect();
    series.sort();
    Ok(series)
}

// ---------------------------------------------------------------------------------------
// Raw bytes

/// An HTTP/2 frame header.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame");
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const DATA: u8 = 0x0;
const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;

/// A HEADERS block for a Report call, hand-encoded in HPACK without Huffman coding.
fn report_headers(authority: &str) -> Vec<u8> {
    let literal = |out: &mut Vec<u8>, value: &[u8]| {
        out.push(u8::try_from(value.len()).expect("short header value"));
        out.extend_from_slice(value);
    };
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    block.push(0x04); // :path, literal without indexing, name from the static table
    literal(&mut block, REPORT_PATH.as_bytes());
    block.push(0x01); // :authority
    literal(&mut block, authority.as_bytes());
    block.extend([0x0f, 0x10]); // content-type (static index 31)
    literal(&mut block, b"application/grpc");
    block.push(0x00); // te: a new name
    literal(&mut block, b"te");
    literal(&mut block, b"trailers");
    block
}

/// Reads what the peer sends until it closes the connection or `timeout` passes;
/// returns the bytes and whether the peer closed.
fn read_for(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (out, false);
        }
        let _ = stream.set_read_timeout(Some(left.min(Duration::from_millis(200))));
        match stream.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (out, true),
        }
    }
}

/// The frames in `bytes` as (type, payload), up to the first incomplete one.
fn frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        if rest.len() < 9 + len {
            break;
        }
        out.push((rest[3], rest[9..9 + len].to_vec()));
        rest = &rest[9 + len..];
    }
    out
}

fn random_bytes(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    std::iter::repeat_with(|| rng.u8(..)).take(len).collect()
}

/// Writes `bytes`, ignoring a peer that already hung up (that is its right).
fn write_ignoring_reset(stream: &mut TcpStream, bytes: &[u8]) {
    let _ = stream.write_all(bytes);
}

fn tcp(addr: &str) -> Result<TcpStream> {
    let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_write_timeout(Some(ANSWER))?;
    Ok(stream)
}

/// Whether the server has closed `stream` (a read returns EOF or a reset, not a timeout).
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Garbage sent to one port of an aggregator whose keepalive drops silent HTTP/2 connections
/// within 2 s, with a well-behaved reporter on it.
struct Garbage {
    /// Connections left open half-written, each with what it is.
    held: Vec<(String, TcpStream)>,
    port_name: &'static str,
    started: Instant,
    // Dropped in this order: the reporter before its aggregator, the runtime last.
    legit: Reporter,
    aggregator: Aggregator,
    rt: Runtime,
}

impl Garbage {
    /// Sends to the port at `addr_of`: random bytes, from a few bytes to a few KiB, some
    /// closed after and some not; random bytes after a valid preface; and left hanging: half a
    /// preface, a preface with half a SETTINGS frame. Returns the port's address too.
    fn send(port_name: &'static str, addr_of: fn(&Aggregator) -> String) -> Result<(Self, String)> {
        let rt = runtime();
        let aggregator = Aggregator::start_with(
            "node-1",
            &["--keepalive-interval", "1s", "--keepalive-timeout", "1s"],
        )?;
        let legit = legit_reporter(&rt, &aggregator)?;
        let addr = addr_of(&aggregator);
        let mut garbage = Garbage {
            held: Vec::new(),
            port_name,
            started: Instant::now(),
            legit,
            aggregator,
            rt,
        };
        let mut rng = fastrand::Rng::with_seed(0x6b76_686d);
        for i in 0..20 {
            let mut stream = tcp(&addr)?;
            let len = rng.usize(1..4096);
            write_ignoring_reset(&mut stream, &random_bytes(&mut rng, len));
            if i % 2 == 0 {
                let _ = stream.shutdown(Shutdown::Write);
                let _ = read_for(&mut stream, Duration::from_millis(100));
            }
        }
        for _ in 0..10 {
            let mut stream = tcp(&addr)?;
            let mut bytes = PREFACE.to_vec();
            let len = rng.usize(1..2048);
            bytes.extend(random_bytes(&mut rng, len));
            write_ignoring_reset(&mut stream, &bytes);
        }
        let mut half_preface = tcp(&addr)?;
        write_ignoring_reset(&mut half_preface, &PREFACE[..10]);
        garbage.hold("half a preface", half_preface);
        let mut half_settings = tcp(&addr)?;
        let mut bytes = PREFACE.to_vec();
        bytes.extend(&frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100])[..12]);
        write_ignoring_reset(&mut half_settings, &bytes);
        garbage.hold("half a SETTINGS frame", half_settings);
        Ok((garbage, addr))
    }

    /// Leaves `stream` open; the aggregator must close it in time.
    fn hold(&mut self, what: &str, stream: TcpStream) {
        self.held
            .push((format!("{}: {what}", self.port_name), stream));
    }

    /// With all of the garbage still open: the legit stream's series is untouched, it still
    /// gets answers, a new stream works, and so do /metrics and the inventory. Then the
    /// aggregator closes every held connection in time.
    fn served_throughout_then_closed(mut self) -> Result<()> {
        let aggregator = &self.aggregator;
        ensure!(
            exposed(aggregator)? == [("vm-legit".to_string(), "kvm".to_string())],
            "the legit series changed: {:?}",
            exposed(aggregator)?
        );
        let legit = &mut self.legit;
        self.rt.block_on(async {
            legit
                .report(domain("default", "vm-legit", HypervisorType::QemuTcg))
                .await?;
            let mut fresh = open_reporter(aggregator).await?;
            fresh
                .report(domain("default", "vm-fresh", HypervisorType::Kvm))
                .await?;
            let listed = inventory(&aggregator.grpc_url(), ANSWER).await?;
            ensure!(listed.len() == 2, "Inventory/List: {listed:?}");
            drop(fresh);
            anyhow::Ok(())
        })?;
        aggregator.wait_for_names(&["vm-legit"], ANSWER)?;
        ensure!(exposed(aggregator)? == [("vm-legit".to_string(), "qemu-tcg".to_string())]);
        promtool_check_metrics(&aggregator.metrics()?)?;
        http_get(&aggregator.url("/healthz"))?;
        note!(
            "garbage on the {} port: served throughout ({:?})",
            self.port_name,
            self.started.elapsed()
        );

        // No half-written connection may hold a descriptor for long: silent HTTP/2 connections
        // answer no ping and fall to the keepalive (1 s + 1 s here), ones that never finish the
        // HTTP/2 preface to the aggregator's 10 s preface deadline, and half an HTTP/1.1 request
        // to the metrics port's 10 s header deadline.
        let mut open: Vec<String> = self.held.iter().map(|(what, _)| what.clone()).collect();
        let closing = wait_until(
            Duration::from_secs(30),
            "every half-written connection to be closed by the aggregator",
            || {
                open = self
                    .held
                    .iter_mut()
                    .filter_map(|(what, stream)| (!closed_by_server(stream)).then(|| what.clone()))
                    .collect();
                Ok(open.is_empty().then_some(()))
            },
        );
        note!(
            "after {:?}, half-written connections the aggregator still holds open: {open:?}",
            self.started.elapsed()
        );
        closing
    }
}

#[test]
fn garbage_and_half_written_http2_on_the_grpc_port() -> Result<()> {
    let (mut garbage, grpc) = Garbage::send("gRPC", Aggregator::grpc_addr)?;

    // The server's SETTINGS carry the per-connection stream limit.
    let mut settings = tcp(&grpc)?;
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    write_ignoring_reset(&mut settings, &bytes);
    let (answer, _) = read_for(&mut settings, Duration::from_millis(500));
    let server_settings = frames(&answer)
        .into_iter()
        .find(|(kind, _)| *kind == SETTINGS)
        .context("the gRPC port answered a preface with no SETTINGS frame")?
        .1;
    let max_concurrent_streams = server_settings
        .chunks_exact(6)
        .find(|p| p[..2] == [0, 3])
        .map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
    note!("gRPC: SETTINGS_MAX_CONCURRENT_STREAMS = {max_concurrent_streams:?}");
    ensure!(
        max_concurrent_streams == Some(16),
        "--max-streams-per-connection defaults to 16, the server announced {max_concurrent_streams:?}"
    );
    garbage.hold("preface and SETTINGS, then nothing", settings);

    // A HEADERS frame whose HPACK block is garbage → GOAWAY.
    let mut bad_hpack = tcp(&grpc)?;
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &[0xff; 12]));
    write_ignoring_reset(&mut bad_hpack, &bytes);
    let (answer, closed) = read_for(&mut bad_hpack, Duration::from_secs(5));
    let goaway = frames(&answer)
        .into_iter()
        .find(|(kind, _)| *kind == GOAWAY);
    let error_code = goaway
        .as_ref()
        .filter(|(_, payload)| payload.len() >= 8)
        .map(|(_, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
    note!("gRPC: garbage HPACK → GOAWAY error code {error_code:?}, connection closed: {closed}");
    ensure!(
        goaway.is_some() || closed,
        "garbage HPACK neither got a GOAWAY nor a close"
    );

    // A real Report call whose first message claims to be 4 GiB long.
    let limit_before = limit_hits(&garbage.aggregator, "message_bytes")?;
    let mut huge_prefix = tcp(&grpc)?;
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &report_headers(&grpc)));
    let mut data = vec![0u8, 0xff, 0xff, 0xff, 0xff];
    data.extend([0x08, 0x01]);
    bytes.extend(frame(DATA, 0, 1, &data));
    write_ignoring_reset(&mut huge_prefix, &bytes);
    wait_until(
        ANSWER,
        "a 4 GiB length prefix to count as a message_bytes limit hit",
        || Ok((limit_hits(&garbage.aggregator, "message_bytes")? > limit_before).then_some(())),
    )?;
    note!("gRPC: a message claiming 4 GiB → refused and counted (limit=\"message_bytes\")");
    garbage.hold("a Report call after a refused 4 GiB message", huge_prefix);

    garbage.served_throughout_then_closed()
}

/// The metrics port speaks HTTP/1.1; HTTP/2 garbage and half-written HTTP/1.1 requests.
#[test]
fn garbage_and_half_written_requests_on_the_metrics_port() -> Result<()> {
    let (mut garbage, metrics) = Garbage::send("metrics", Aggregator::metrics_target)?;

    // Half a request line, and a request with a 1 MiB header.
    let mut half_request = tcp(&metrics)?;
    write_ignoring_reset(&mut half_request, b"GET /metr");
    garbage.hold("half a request line", half_request);
    let mut huge_header = tcp(&metrics)?;
    let mut request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 1 << 20));
    request.extend(b"\r\n\r\n");
    write_ignoring_reset(&mut huge_header, &request);
    let (answer, _) = read_for(&mut huge_header, Duration::from_secs(2));
    let status_line = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("(connection closed without an answer)")
        .to_string();
    note!("metrics: a 1 MiB request header → {status_line}");
    ensure!(
        !status_line.contains(" 200 "),
        "a 1 MiB header was served: {status_line}"
    );

    garbage.served_throughout_then_closed()
}

// ---------------------------------------------------------------------------------------
// Protobuf

#[test]
fn malformed_and_oversized_protobuf_end_only_their_own_stream() -> Result<()> {
    let rt = runtime();
    let aggregator = Aggregator::start_with("node-1", &["--max-message-bytes", "4096"])?;
    let _legit = rt.block_on(async {
        let mut legit = open_reporter(&aggregator).await?;
        legit
            .report(domain("default", "vm-legit", HypervisorType::Kvm))
            .await?;

        // Each garbage stream first reports a VMI of its own properly, then sends garbage.
        let garbage: [(&str, Vec<u8>); 5] = [
            ("an endless varint", vec![0xff; 16]),
            ("wire type 7", vec![0x0f, 0x01]),
            ("a field longer than the message", vec![0x12, 0x7f, 0x01]),
            ("invalid UTF-8 in namespace", {
                let inner = [0x0a, 0x02, 0xc3, 0x28];
                let mut m = vec![0x12, inner.len() as u8];
                m.extend(inner);
                m
            }),
            (
                "a truncated nested message",
                vec![0x08, 0x01, 0x12, 0x05, 0x0a, 0x03, b'a'],
            ),
        ];
        let channel = connect(&aggregator.grpc_url(), ANSWER).await?;
        for (i, (what, payload)) in garbage.into_iter().enumerate() {
            let name = format!("vm-garbage-{i}");
            let good = DomainReport {
                sequence: 1,
                change: Some(Change::Upsert(domain(
                    "default",
                    &name,
                    HypervisorType::Kvm,
                ))),
            }
            .encode_to_vec();
            let status = raw_report(channel.clone(), vec![good, payload], ANSWER).await?;
            note!(
                "malformed protobuf ({what}) → stream ended with {:?}: {}",
                status.code(),
                status.message()
            );
            ensure!(
                status.code() != Code::Ok,
                "{what}: the stream ended cleanly"
            );
        }

        // Oversized: a well-formed report over --max-message-bytes.
        let mut big = open_reporter(&aggregator).await?;
        big.report(domain("default", "vm-big", HypervisorType::Kvm))
            .await?;
        let mut huge = domain("default", "vm-big", HypervisorType::Kvm);
        huge.hypervisor_version = "9".repeat(20_000);
        big.queue(Some(Change::Upsert(huge))).await?;
        let status = big.end_status().await?;
        note!(
            "oversized protobuf (20 kB > --max-message-bytes 4096) → {:?}: {}",
            status.code(),
            status.message()
        );
        ensure!(
            matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
            "oversized report: {status:?}"
        );

        // The legit stream's series is untouched and it still gets answers.
        legit
            .report(domain("default", "vm-legit", HypervisorType::QemuTcg))
            .await?;
        anyhow::Ok(legit)
    })?;
    // Every broken stream took its own series with it, and only its own.
    aggregator.wait_for_names(&["vm-legit"], ANSWER)?;
    ensure!(exposed(&aggregator)? == [("vm-legit".to_string(), "qemu-tcg".to_string())]);
    ensure!(limit_hits(&aggregator, "message_bytes")? >= 1.0);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Floods

const FLOOD_CONNECTIONS: usize = 40;
const FLOOD_PER_CONNECTION: usize = 250;
const FLOOD_MAX_STREAMS: usize = 512;

/// What one flood of stream opens got.
struct Flood {
    /// Accepted streams, kept open: the request sender and the acks.
    accepted: Vec<(mpsc::Sender<DomainReport>, Streaming<ReportAck>)>,
    /// How many accepted streams had their one report acked with OK.
    acked: usize,
    refusals: Vec<Status>,
    took: Duration,
}

/// Opens `FLOOD_CONNECTIONS` × `FLOOD_PER_CONNECTION` report streams at once; each one the
/// aggregator accepts reports a VMI of its own and stays open.
async fn flood(aggregator: &Aggregator, round: usize) -> Result<Flood> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..FLOOD_CONNECTIONS {
        let channel = connect(&aggregator.grpc_url(), ANSWER).await?;
        for s in 0..FLOOD_PER_CONNECTION {
            let channel = channel.clone();
            tasks.spawn(async move {
                let (requests, stream) = mpsc::channel::<DomainReport>(4);
                let mut acks = HypervisorReporterClient::new(channel)
                    .report(ReceiverStream::new(stream))
                    .await?
                    .into_inner();
                let name = format!("flood-{round}-{c}-{s}");
                let vm = domain("flood", &name, HypervisorType::QemuTcg);
                let _ = requests
                    .send(DomainReport {
                        sequence: 1,
                        change: Some(Change::Upsert(vm)),
                    })
                    .await;
                let acked = matches!(acks.message().await, Ok(Some(ack)) if ack.code == 0);
                Ok::<_, Status>((requests, acks, acked))
            });
        }
    }
    let mut flood = Flood {
        accepted: Vec::new(),
        acked: 0,
        refusals: Vec::new(),
        took: Duration::ZERO,
    };
    let collect = async {
        while let Some(joined) = tasks.join_next().await {
            match joined.expect("a flood task panicked") {
                Ok((requests, acks, acked)) => {
                    flood.acked += usize::from(acked);
                    flood.accepted.push((requests, acks));
                }
                Err(status) => flood.refusals.push(status),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), collect)
        .await
        .context("10,000 stream opens did not finish in 120 s")?;
    flood.took = started.elapsed();
    Ok(flood)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// One flood of [`ten_thousand_streams_from_one_client`], checked while it is open and after
/// its client went away; returns the aggregator's RSS then. `refused_total` counts the
/// refusals of all rounds so far.
fn flood_round(
    rt: &Runtime,
    aggregator: &Aggregator,
    legit: &mut Reporter,
    round: usize,
    refused_total: &mut usize,
    baseline: u64,
) -> Result<u64> {
    let flood = rt.block_on(flood(aggregator, round))?;
    let peak = aggregator.rss_bytes()?;
    let exhausted = flood
        .refusals
        .iter()
        .filter(|s| s.code() == Code::ResourceExhausted)
        .count();
    note!(
        "round {round}: 10,000 stream opens in {:?}: {} accepted ({} acked their report), \
         {} refused ({exhausted} RESOURCE_EXHAUSTED); first other refusal: {:?}",
        flood.took,
        flood.accepted.len(),
        flood.acked,
        flood.refusals.len(),
        flood
            .refusals
            .iter()
            .find(|s| s.code() != Code::ResourceExhausted)
    );
    ensure!(
        flood.accepted.len() == FLOOD_MAX_STREAMS - 1,
        "with the legit stream open, exactly {} more fit under --max-streams {FLOOD_MAX_STREAMS}",
        FLOOD_MAX_STREAMS - 1
    );
    ensure!(
        flood.acked == flood.accepted.len(),
        "every accepted stream got its ack"
    );
    ensure!(
        exhausted == flood.refusals.len(),
        "every refusal is RESOURCE_EXHAUSTED"
    );
    *refused_total += flood.refusals.len();
    ensure!(streams_open(aggregator)? == FLOOD_MAX_STREAMS as f64);
    ensure!(
        limit_hits(aggregator, "streams")? == *refused_total as f64,
        "limit_hits_total{{limit=\"streams\"}} counts each refusal"
    );
    ensure!(aggregator.series()?.len() == FLOOD_MAX_STREAMS);
    let during = rt.block_on(async {
        let started = Instant::now();
        legit
            .report(domain("default", "vm-legit", HypervisorType::QemuTcg))
            .await?;
        legit
            .report(domain("default", "vm-legit", HypervisorType::Kvm))
            .await?;
        anyhow::Ok(started.elapsed())
    })?;

    // The client goes away: every stream and its series with it.
    let closing = Instant::now();
    drop(flood);
    wait_until(ANSWER, "the flood's streams to close", || {
        Ok((streams_open(aggregator)? == 1.0).then_some(()))
    })?;
    aggregator.wait_for_names(&["vm-legit"], ANSWER)?;
    ensure!(exposed(aggregator)? == [("vm-legit".to_string(), "kvm".to_string())]);
    let after = aggregator.rss_bytes()?;
    note!(
        "round {round}: two legit acks with 512 streams open took {during:?}; flood closed → \
         streams_open 1 in {:?}; RSS {:.1} MiB with the flood, {:.1} MiB after (baseline {:.1} MiB)",
        closing.elapsed(),
        mib(peak),
        mib(after),
        mib(baseline)
    );
    Ok(after)
}

/// 10,000 report streams from one client process, three times over: 40 HTTP/2 connections
/// with 250 concurrent streams each, against `--max-streams 512`.
#[test]
fn ten_thousand_streams_from_one_client() -> Result<()> {
    const ROUNDS: usize = 3;
    let rt = runtime();
    let aggregator = Aggregator::start_with(
        "node-1",
        &[
            "--max-streams",
            &FLOOD_MAX_STREAMS.to_string(),
            "--max-streams-per-connection",
            "256",
        ],
    )?;
    let mut legit = legit_reporter(&rt, &aggregator)?;
    // Warm the paths the flood uses before measuring the baseline.
    aggregator.metrics()?;
    let baseline = aggregator.rss_bytes()?;
    let mut after_rounds = Vec::new();
    let mut refused_total = 0;
    for round in 0..ROUNDS {
        let after = flood_round(
            &rt,
            &aggregator,
            &mut legit,
            round,
            &mut refused_total,
            baseline,
        )?;
        after_rounds.push(after);
    }
    // Memory. The aggregator hands freed memory back to the system about a second after
    // streams close (glibc's malloc would otherwise keep it for reuse), so RSS must come back
    // near the baseline: within 8 MiB, which a leak of even one flood's streams (~15 MiB)
    // would exceed.
    let growth_allowed: u64 = 8 << 20;
    let bound = baseline + growth_allowed;
    let rounded: Vec<f64> = after_rounds
        .iter()
        .map(|&b| (mib(b) * 10.0).round() / 10.0)
        .collect();
    let mut settled = after_rounds[ROUNDS - 1];
    let previous = after_rounds[ROUNDS - 2];
    wait_until(Duration::from_secs(10), "RSS to settle", || {
        settled = aggregator.rss_bytes()?;
        Ok((settled <= previous + growth_allowed && settled <= bound).then_some(()))
    })
    .with_context(|| {
        format!(
            "aggregator RSS after each round {:?} MiB, now {:.1} MiB: the last round added more \
             than {:.1} MiB, or it is over the baseline {:.1} MiB + 8 MiB",
            rounded,
            mib(settled),
            mib(growth_allowed),
            mib(baseline)
        )
    })?;
    note!(
        "aggregator RSS: baseline {:.1} MiB, after each of {ROUNDS} floods {:?} MiB, now {:.1} MiB \
         ({})",
        mib(baseline),
        rounded,
        mib(settled),
        if settled <= baseline + (8 << 20) {
            "back at the baseline"
        } else {
            "not back at the baseline: freed memory kept by the allocator"
        }
    );
    rt.block_on(legit.report(domain("default", "vm-legit", HypervisorType::QemuTcg)))?;
    Ok(())
}

/// Rounds of the connection flood, and what each round opens at once.
const HOSTILE_ROUNDS: usize = 4;
const HOSTILE_GRPC: usize = 2_000;
const HOSTILE_HTTP: usize = 200;

/// One round of hostile clients, all left open: on the gRPC port half send random bytes and
/// half a bare HTTP/2 preface; on the metrics port, requests whose head (with a header of up
/// to 8 KiB) never ends.
fn hostile_connections(
    grpc: &str,
    metrics: &str,
    rng: &mut fastrand::Rng,
) -> Result<Vec<TcpStream>> {
    let mut open = Vec::with_capacity(HOSTILE_GRPC + HOSTILE_HTTP);
    for i in 0..HOSTILE_GRPC {
        let mut stream = tcp(grpc)?;
        if i % 2 == 0 {
            let len = rng.usize(1..4096);
            write_ignoring_reset(&mut stream, &random_bytes(rng, len));
        } else {
            write_ignoring_reset(&mut stream, PREFACE);
        }
        open.push(stream);
    }
    for _ in 0..HOSTILE_HTTP {
        let mut stream = tcp(metrics)?;
        let mut request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
        request.extend(std::iter::repeat_n(b'a', rng.usize(1..8 * 1024)));
        request.extend(b"\r\n");
        write_ignoring_reset(&mut stream, &request);
        open.push(stream);
    }
    Ok(open)
}

/// The aggregator's RSS once it has come down to `bound`: the lowest reading in the 3 s after
/// the first one at or under it (the aggregator hands freed memory back a second or two after
/// connections close), and how long it took to come down. Polls until `timeout`: the bound is
/// on memory, not on time.
fn settled_rss(aggregator: &Aggregator, bound: u64, timeout: Duration) -> Result<(u64, Duration)> {
    let started = Instant::now();
    let mut last = aggregator.rss_bytes()?;
    wait_until(timeout, "the aggregator's RSS to come down", || {
        last = aggregator.rss_bytes()?;
        Ok((last <= bound).then_some(()))
    })
    .with_context(|| {
        format!(
            "aggregator RSS {:.1} MiB, bound {:.1} MiB",
            mib(last),
            mib(bound)
        )
    })?;
    let came_down = started.elapsed();
    let mut lowest = last;
    while started.elapsed() < came_down + Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(250));
        lowest = lowest.min(aggregator.rss_bytes()?);
    }
    Ok((lowest, came_down))
}

/// Hostile clients on both ports, several rounds: 2,000 gRPC connections that send garbage or
/// a bare preface and 200 never-ending HTTP requests each round, then all closed. The
/// aggregator answers throughout, and after each round its memory comes back: within 8 MiB
/// of where it started, and no higher round after round.
#[test]
fn connection_floods_leave_the_aggregator_no_larger() -> Result<()> {
    let nofile = e2e::tools::raise_nofile(8192)?;
    ensure!(
        nofile >= (HOSTILE_GRPC + HOSTILE_HTTP) as u64 + 512,
        "RLIMIT_NOFILE is {nofile}: a round's connections need a descriptor each, here and in the aggregator"
    );
    let rt = runtime();
    // Started after raising the limit, which it inherits.
    let aggregator = Aggregator::start("node-1")?;
    let (grpc, metrics) = (aggregator.grpc_addr(), aggregator.metrics_target());
    let mut legit = legit_reporter(&rt, &aggregator)?;
    aggregator.metrics()?;
    let (baseline, _) = settled_rss(&aggregator, u64::MAX, ANSWER)?;
    let bound = baseline + (8 << 20);
    let mut rng = fastrand::Rng::with_seed(0x666c_6f6f);
    let mut settled = Vec::new();
    for round in 0..HOSTILE_ROUNDS {
        let opening = Instant::now();
        let open = hostile_connections(&grpc, &metrics, &mut rng)?;
        let opened_in = opening.elapsed();
        // With the whole round open: the legit stream is answered, a new client is served
        // (Inventory/List on a connection of its own), /metrics shows the series. No report
        // stream ends here: closing one would have the aggregator trim its memory anyway.
        let hypervisor = if round % 2 == 0 {
            HypervisorType::QemuTcg
        } else {
            HypervisorType::Kvm
        };
        let listed = rt.block_on(async {
            legit
                .report(domain("default", "vm-legit", hypervisor))
                .await?;
            inventory(&aggregator.grpc_url(), ANSWER).await
        })?;
        ensure!(
            listed.len() == 1
                && listed[0]
                    .domain
                    .as_ref()
                    .is_some_and(|d| d.hypervisor_type == hypervisor as i32),
            "round {round}: Inventory/List during the flood: {listed:?}"
        );
        let series = exposed(&aggregator)?;
        ensure!(
            series == [("vm-legit".to_string(), hypervisor.label().to_string())],
            "round {round}: /metrics during the flood shows {series:?}"
        );
        let during = aggregator.rss_bytes()?;
        drop(open);
        let (after, came_down) = settled_rss(&aggregator, bound, Duration::from_secs(60))
            .with_context(|| {
                format!(
                    "round {round}: RSS did not come back within 8 MiB of the baseline {:.1} \
                     MiB after the flood closed (after the earlier rounds: {:?} MiB)",
                    mib(baseline),
                    settled
                        .iter()
                        .map(|&b| format!("{:.1}", mib(b)))
                        .collect::<Vec<_>>()
                )
            })?;
        note!(
            "connection flood round {round}: {HOSTILE_GRPC} gRPC + {HOSTILE_HTTP} HTTP connections \
             opened in {opened_in:?}; aggregator RSS {:.1} MiB with them open; closed, under \
             the bound ({:.1} MiB) after {came_down:?}, then {:.1} MiB (baseline {:.1} MiB)",
            mib(during),
            mib(bound),
            mib(after),
            mib(baseline)
        );
        settled.push(after);
    }
    let first = settled[0];
    for (round, &after) in settled.iter().enumerate().skip(1) {
        ensure!(
            after <= first + (2 << 20),
            "round {round} left the aggregator at {:.1} MiB, more than 2 MiB over round 0's {:.1} MiB",
            mib(after),
            mib(first)
        );
    }
    aggregator.wait_for_names(&["vm-legit"], ANSWER)?;
    Ok(())
}

/// Streams that send many reports and never read their acks: the aggregator stops reading
/// them (flow control) and everyone else goes on.
#[test]
fn slow_clients_do_not_hold_up_others() -> Result<()> {
    const SLOW: usize = 8;
    let rt = runtime();
    let aggregator = Aggregator::start_with("node-1", &["--max-reports-per-second", "100000"])?;
    aggregator.metrics()?;
    let baseline = aggregator.rss_bytes()?;
    let (slow, sent) = rt.block_on(async {
        let mut slow = Vec::new();
        let mut pumps = tokio::task::JoinSet::new();
        for i in 0..SLOW {
            // A connection each: an unread stream holds its connection's flow-control window.
            let channel = connect(&aggregator.grpc_url(), ANSWER).await?;
            let (requests, stream) = mpsc::channel::<DomainReport>(16);
            let acks = HypervisorReporterClient::new(channel)
                .report(ReceiverStream::new(stream))
                .await?
                .into_inner();
            // Never read: the acks pile up until the aggregator stops reading this stream.
            slow.push(acks);
            pumps.spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(3);
                let mut sent = 0u64;
                while Instant::now() < deadline && sent < 200_000 {
                    let mut vm = domain("slow", &format!("vm-{i}"), HypervisorType::Kvm);
                    vm.hypervisor_version = format!("7.2.{}", sent % 50);
                    let report = DomainReport {
                        sequence: sent + 1,
                        change: Some(Change::Upsert(vm)),
                    };
                    match tokio::time::timeout(Duration::from_millis(500), requests.send(report))
                        .await
                    {
                        Ok(Ok(())) => sent += 1,
                        // Blocked by flow control (or closed): that is the point.
                        _ => break,
                    }
                }
                (sent, requests)
            });
        }
        let mut sent = Vec::new();
        while let Some(joined) = pumps.join_next().await {
            sent.push(joined?);
        }
        anyhow::Ok((slow, sent))
    })?;
    let counts: Vec<u64> = sent.iter().map(|(n, _)| *n).collect();
    note!("slow clients sent {counts:?} reports each before the aggregator stopped reading");

    // With every slow stream stuck, a well-behaved stream is answered at once.
    let latencies = rt.block_on(async {
        let mut legit = open_reporter(&aggregator).await?;
        let mut latencies = Vec::new();
        for i in 0..20 {
            let started = Instant::now();
            let hypervisor = if i % 2 == 0 {
                HypervisorType::Kvm
            } else {
                HypervisorType::QemuTcg
            };
            legit
                .report(domain("default", "vm-legit", hypervisor))
                .await?;
            latencies.push(started.elapsed());
        }
        let listed = inventory(&aggregator.grpc_url(), ANSWER).await?;
        ensure!(
            listed
                .iter()
                .any(|s| s.domain.as_ref().is_some_and(|d| d.name == "vm-legit")),
            "Inventory/List lacks the legit stream"
        );
        anyhow::Ok((legit, latencies))
    });
    let (legit, latencies) = latencies?;
    let slowest = latencies.iter().max().copied().unwrap_or_default();
    let during = aggregator.rss_bytes()?;
    note!(
        "with {SLOW} stuck slow clients: 20 legit acks, slowest {slowest:?}; aggregator RSS \
         {:.1} MiB (baseline {:.1} MiB)",
        during as f64 / f64::from(1 << 20),
        baseline as f64 / f64::from(1 << 20)
    );
    ensure!(
        during < baseline + (256 << 20),
        "slow clients cost the aggregator more than 256 MiB"
    );
    let mut expected: Vec<String> = (0..SLOW).map(|i| format!("vm-{i}")).collect();
    expected.push("vm-legit".into());
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    aggregator.wait_for_names(&expected, ANSWER)?;

    drop(sent);
    drop(slow);
    aggregator.wait_for_names(&["vm-legit"], ANSWER)?;
    drop(legit);
    aggregator.wait_for_names(&[], ANSWER)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Names and ownership

/// Reports the aggregator must refuse: (what, the domain, the reason it counts).
fn invalid_reports() -> Vec<(&'static str, Domain, &'static str)> {
    let long_name = format!("{}a", "a.".repeat(127));
    let d = |ns: &str, name: &str| domain(ns, name, HypervisorType::Kvm);
    let with = |f: &dyn Fn(&mut Domain)| {
        let mut vm = d("default", "vm-a");
        f(&mut vm);
        vm
    };
    vec![
        (
            "namespace with '_'",
            d("bad_ns", "vm-a"),
            "invalid_namespace",
        ),
        (
            "upper-case namespace",
            d("Default", "vm-a"),
            "invalid_namespace",
        ),
        (
            "64-character namespace",
            d(&"a".repeat(64), "vm-a"),
            "invalid_namespace",
        ),
        ("empty namespace", d("", "vm-a"), "invalid_namespace"),
        ("upper-case name", d("default", "VM-A"), "invalid_name"),
        (
            "255-character name",
            d("default", &long_name),
            "invalid_name",
        ),
        (
            "a name that injects a series",
            d("default", "vm\"} 1\nkubevirt_vmi_hypervisor_info{name=\"x"),
            "invalid_name",
        ),
        ("empty name", d("default", ""), "invalid_name"),
        (
            "uid that is no UUID",
            with(&|vm| vm.uid = "not-a-uuid".into()),
            "invalid_uid",
        ),
        (
            "uid one digit short",
            with(&|vm| vm.uid = "6f1e9cde-8c1a-4a0e-9d43-2d2a1d5b7c1".into()),
            "invalid_uid",
        ),
        (
            "domain name with a newline",
            with(&|vm| vm.domain_name = "default_vm-a\n".into()),
            "invalid_domain_name",
        ),
        (
            "version with a newline",
            with(&|vm| vm.hypervisor_version = "7.2\n".into()),
            "invalid_version",
        ),
        (
            "65-character version",
            with(&|vm| vm.hypervisor_version = "9".repeat(65)),
            "invalid_version",
        ),
    ]
}

#[test]
fn invalid_names_are_refused_and_counted_by_reason() -> Result<()> {
    let rt = runtime();
    let aggregator = Aggregator::start("node-1")?;
    let cases = invalid_reports();
    let reasons = [
        "empty",
        "invalid_namespace",
        "invalid_name",
        "invalid_uid",
        "invalid_domain_name",
        "invalid_version",
    ];
    let before: Vec<f64> = reasons
        .iter()
        .map(|r| rejected(&aggregator, r))
        .collect::<Result<_>>()?;
    let _stream = rt.block_on(async {
        let mut stream = open_reporter(&aggregator).await?;
        for (what, vm, reason) in &cases {
            let ack = stream.upsert(vm.clone()).await?;
            eprintln!(
                "{what} → {} \"{}\" (expected reason {reason})",
                code_name(ack.code),
                ack.message
            );
            ensure!(
                ack.code == Code::InvalidArgument as i32 && !ack.message.is_empty(),
                "{what}: {ack:?}"
            );
        }
        let ack = stream.send(None).await?;
        note!(
            "a report with no change → {} \"{}\"",
            code_name(ack.code),
            ack.message
        );
        ensure!(
            ack.code == Code::InvalidArgument as i32,
            "empty report: {ack:?}"
        );
        // The stream goes on: a valid report is applied.
        let mut good = domain("default", "vm-a", HypervisorType::Kvm);
        good.uid = "6f1e9cde-8c1a-4a0e-9d43-2d2a1d5b7c10".into();
        stream.report(good).await?;
        anyhow::Ok(stream)
    })?;
    aggregator.wait_for_names(&["vm-a"], ANSWER)?;
    for (reason, before) in reasons.iter().zip(before) {
        let expected =
            cases.iter().filter(|(_, _, r)| r == reason).count() + usize::from(*reason == "empty");
        let counted = rejected(&aggregator, reason)? - before;
        ensure!(
            counted == expected as f64,
            "reports_rejected_total{{reason=\"{reason}\"}} rose by {counted}, expected {expected}"
        );
    }
    ensure!(exposed(&aggregator)? == [("vm-a".to_string(), "kvm".to_string())]);
    promtool_check_metrics(&aggregator.metrics()?)?;
    Ok(())
}

#[test]
fn a_stream_cannot_erase_or_take_another_streams_vmi() -> Result<()> {
    let rt = runtime();
    let aggregator = Aggregator::start("node-1")?;
    let kvm = || ("vm-a".to_string(), "kvm".to_string());
    let (owner, mut other) = rt.block_on(async {
        let mut owner = open_reporter(&aggregator).await?;
        let mut other = open_reporter(&aggregator).await?;
        owner
            .report(domain("default", "vm-a", HypervisorType::Kvm))
            .await?;
        // A forged withdrawal of the owner's VMI.
        let ack = other.withdraw("default", "vm-a").await?;
        note!(
            "forged withdrawal → {} \"{}\"",
            code_name(ack.code),
            ack.message
        );
        ensure!(
            ack.code == Code::NotFound as i32,
            "forged withdrawal: {ack:?}"
        );
        anyhow::Ok((owner, other))
    })?;
    ensure!(
        exposed(&aggregator)? == [kvm()],
        "the forged withdrawal took effect"
    );
    ensure!(rejected(&aggregator, "not_reported")? == 1.0);

    // A second claim of the same VMI is held: counted, visible, not exposed.
    let listed = rt.block_on(async {
        let ack = other
            .upsert(domain("default", "vm-a", HypervisorType::QemuTcg))
            .await?;
        note!("second claim → {} \"{}\"", code_name(ack.code), ack.message);
        inventory(&aggregator.grpc_url(), ANSWER).await
    })?;
    ensure!(
        exposed(&aggregator)? == [kvm()],
        "the second claim overwrote the first"
    );
    ensure!(
        counter(
            &aggregator,
            "kubevirt_hypervisor_aggregator_claims_held",
            &[]
        )? == 1.0
    );
    let held: Vec<(bool, i32)> = listed
        .iter()
        .map(|s| (s.held, s.domain.as_ref().map_or(-1, |d| d.hypervisor_type)))
        .collect();
    note!("Inventory/List (held, hypervisor_type): {held:?}");
    ensure!(
        held.len() == 2
            && held.contains(&(false, HypervisorType::Kvm as i32))
            && held.contains(&(true, HypervisorType::QemuTcg as i32)),
        "Inventory/List should show the owner's claim and a held one: {listed:?}"
    );

    // The holder cannot erase the owner's series by withdrawing its own claim either.
    rt.block_on(async {
        let ack = other.withdraw("default", "vm-a").await?;
        ensure!(ack.code == 0, "withdrawing its own held claim: {ack:?}");
        other
            .report(domain("default", "vm-a", HypervisorType::QemuTcg))
            .await
    })?;
    ensure!(exposed(&aggregator)? == [kvm()]);

    // The owner's stream ends: the held claim takes over at once.
    let started = Instant::now();
    drop(owner);
    wait_until(ANSWER, "the held claim to take over", || {
        Ok((exposed(&aggregator)? == [("vm-a".to_string(), "qemu-tcg".to_string())]).then_some(()))
    })?;
    note!(
        "first stream ended → held claim exposed after {:?}",
        started.elapsed()
    );
    ensure!(
        counter(
            &aggregator,
            "kubevirt_hypervisor_aggregator_claims_held",
            &[]
        )? == 0.0
    );
    let listed = rt.block_on(inventory(&aggregator.grpc_url(), ANSWER))?;
    ensure!(
        listed.len() == 1 && !listed[0].held,
        "after the take-over: {listed:?}"
    );
    drop(other);
    aggregator.wait_for_names(&[], ANSWER)?;
    Ok(())
}

#[test]
fn per_stream_limits_refuse_only_the_excess() -> Result<()> {
    const RATE: u32 = 10;
    let rt = runtime();
    let aggregator = Aggregator::start_with(
        "node-1",
        &[
            "--max-domains-per-stream",
            "4",
            "--max-reports-per-second",
            &RATE.to_string(),
        ],
    )?;
    let streams = rt.block_on(async {
        // Domains per stream: the fifth VMI is refused, the stream goes on.
        let mut many = open_reporter(&aggregator).await?;
        for i in 0..4 {
            many.report(domain("default", &format!("vm-{i}"), HypervisorType::Kvm))
                .await?;
        }
        let ack = many
            .upsert(domain("default", "vm-4", HypervisorType::Kvm))
            .await?;
        note!(
            "fifth VMI on a stream → {} \"{}\"",
            code_name(ack.code),
            ack.message
        );
        ensure!(ack.code == Code::ResourceExhausted as i32, "{ack:?}");
        many.report(domain("default", "vm-3", HypervisorType::QemuTcg))
            .await?;

        // Reports per second: a burst of 40 on another stream, acks read afterwards.
        let mut burst = open_reporter(&aggregator).await?;
        let started = Instant::now();
        for i in 1..=40u64 {
            let mut vm = domain("default", "vm-burst", HypervisorType::Kvm);
            vm.hypervisor_version = format!("7.2.{i}");
            burst.queue(Some(Change::Upsert(vm))).await?;
        }
        let mut codes = Vec::new();
        for _ in 0..40 {
            codes.push(burst.next_ack().await?.code);
        }
        let took = started.elapsed();
        let ok = codes.iter().filter(|&&c| c == 0).count();
        let limited = codes
            .iter()
            .filter(|&&c| c == Code::ResourceExhausted as i32)
            .count();
        let allowed = RATE as f64 * (1.0 + took.as_secs_f64()) + 1.0;
        note!(
            "40 reports in {took:?} at --max-reports-per-second {RATE}: {ok} applied, {limited} \
             RESOURCE_EXHAUSTED (at most {allowed:.1} may pass)"
        );
        ensure!(ok + limited == 40, "other codes: {codes:?}");
        ensure!(limited >= 1 && ok as f64 <= allowed, "{codes:?}");
        ensure!(rejected(&aggregator, "rate_limited")? == limited as f64);
        ensure!(limit_hits(&aggregator, "reports_per_second")? == limited as f64);
        // Once the bucket refills, the same stream is served again.
        let refilled = Instant::now();
        loop {
            let ack = burst
                .upsert(domain("default", "vm-burst", HypervisorType::QemuTcg))
                .await?;
            if ack.code == 0 {
                break;
            }
            ensure!(refilled.elapsed() < ANSWER, "still rate-limited: {ack:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        note!(
            "rate-limited stream served again after {:?}",
            refilled.elapsed()
        );
        anyhow::Ok((many, burst))
    })?;
    // Only the excess was refused: both streams' series are what they last reported.
    let expected: Vec<(String, String)> = [
        ("vm-0", "kvm"),
        ("vm-1", "kvm"),
        ("vm-2", "kvm"),
        ("vm-3", "qemu-tcg"),
        ("vm-burst", "qemu-tcg"),
    ]
    .iter()
    .map(|(n, t)| (n.to_string(), t.to_string()))
    .collect();
    let series = exposed(&aggregator)?;
    ensure!(series == expected, "{series:?}");
    drop(streams);
    ensure!(rejected(&aggregator, "too_many_domains")? == 1.0);
    ensure!(limit_hits(&aggregator, "domains_per_stream")? == 1.0);
    aggregator.wait_for_names(&[], ANSWER)?;
    Ok(())
}
