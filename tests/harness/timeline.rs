//! What an aggregator showed, and when: every event of its `Inventory/Watch` stream
//! ([`WatchRecorder`]) and every change of its `/metrics` series ([`MetricsRecorder`]), each
//! with the wall-clock time it was seen, so that a test can prove when a series appeared and
//! that it never went away in between. Both keep recording across aggregator restarts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use hypervisor_proto::v1::inventory_client::InventoryClient;
use hypervisor_proto::v1::watch_event::Kind;
use hypervisor_proto::v1::{Series, WatchRequest};

use crate::binaries::{Labels, info_series};
use crate::grpc;
use crate::tools::http_get;

/// How often [`MetricsRecorder`] scrapes.
const SCRAPE_EVERY: Duration = Duration::from_millis(20);
/// How long to wait before subscribing again after the Watch stream ended.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(50);

/// `Inventory/List` of the aggregator at `grpc_addr` (`127.0.0.1:PORT`).
pub fn inventory_list(grpc_addr: &str) -> Result<Vec<Series>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio runtime")?;
    runtime.block_on(grpc::inventory(
        &format!("http://{grpc_addr}"),
        Duration::from_secs(5),
    ))
}

/// One thing the Watch stream said, or that it ended.
#[derive(Clone, Debug)]
pub enum Watched {
    Event {
        at: SystemTime,
        kind: Kind,
        series: Series,
    },
    /// The stream ended (the aggregator went away): every series it held is gone with it.
    Ended { at: SystemTime, reason: String },
}

/// Follows an aggregator's `Inventory/Watch` stream on a thread of its own, subscribing
/// again whenever the stream ends.
pub struct WatchRecorder {
    seen: Arc<Mutex<Vec<Watched>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WatchRecorder {
    pub fn start(grpc_addr: &str) -> Result<Self> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a tokio runtime")?;
        let uri = format!("http://{grpc_addr}");
        let thread = std::thread::Builder::new()
            .name("inventory-watch".into())
            .spawn({
                let seen = Arc::clone(&seen);
                let stop = Arc::clone(&stop);
                move || runtime.block_on(follow(uri, seen, stop))
            })
            .context("starting the Watch recorder")?;
        Ok(WatchRecorder {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// Everything seen so far.
    pub fn seen(&self) -> Vec<Watched> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for WatchRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn follow(uri: String, seen: Arc<Mutex<Vec<Watched>>>, stop: Arc<AtomicBool>) {
    let record = |item: Watched| seen.lock().unwrap_or_else(|p| p.into_inner()).push(item);
    let stopped = || stop.load(Ordering::Acquire);
    // Checked between messages, and at least this often while the stream is quiet.
    let tick = Duration::from_millis(100);
    while !stopped() {
        let stream = async {
            let channel = grpc::connect(&uri, Duration::from_secs(2)).await?;
            anyhow::Ok(
                InventoryClient::new(channel)
                    .watch(WatchRequest {})
                    .await?
                    .into_inner(),
            )
        }
        .await;
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(_) => {
                tokio::time::sleep(RESUBSCRIBE_AFTER).await;
                continue;
            }
        };
        let reason = loop {
            if stopped() {
                return;
            }
            match tokio::time::timeout(tick, stream.message()).await {
                Err(_) => continue,
                Ok(Ok(Some(event))) => record(Watched::Event {
                    at: SystemTime::now(),
                    kind: event.kind(),
                    series: event.series.unwrap_or_default(),
                }),
                Ok(Ok(None)) => break "the aggregator ended the stream".to_owned(),
                Ok(Err(status)) => break format!("{status}"),
            }
        };
        record(Watched::Ended {
            at: SystemTime::now(),
            reason,
        });
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

/// A scrape that differed from the one before: the series then on /metrics, or `None`
/// when /metrics did not answer.
#[derive(Clone, Debug)]
pub struct Scrape {
    pub at: SystemTime,
    pub series: Option<Vec<Labels>>,
}

#[derive(Default)]
struct Scrapes {
    changes: Vec<Scrape>,
    /// When the latest finished scrape started.
    last: Option<SystemTime>,
}

/// Scrapes an aggregator's /metrics every [`SCRAPE_EVERY`] on a thread of its own and keeps
/// every scrape that differed from the previous one.
pub struct MetricsRecorder {
    changes: Arc<Mutex<Scrapes>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsRecorder {
    /// `url` is the aggregator's /metrics URL.
    pub fn start(url: &str) -> Result<Self> {
        let changes = Arc::new(Mutex::new(Scrapes::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("metrics-recorder".into())
            .spawn({
                let changes = Arc::clone(&changes);
                let stop = Arc::clone(&stop);
                let url = url.to_owned();
                move || {
                    while !stop.load(Ordering::Acquire) {
                        let at = SystemTime::now();
                        let series = http_get(&url)
                            .ok()
                            .and_then(|body| info_series(&body).ok())
                            .map(|mut series| {
                                series.sort();
                                series
                            });
                        let mut scrapes = changes.lock().unwrap_or_else(|p| p.into_inner());
                        if scrapes
                            .changes
                            .last()
                            .is_none_or(|last| last.series != series)
                        {
                            scrapes.changes.push(Scrape { at, series });
                        }
                        scrapes.last = Some(at);
                        drop(scrapes);
                        std::thread::sleep(SCRAPE_EVERY);
                    }
                }
            })
            .context("starting the /metrics recorder")?;
        Ok(MetricsRecorder {
            changes,
            stop,
            thread: Some(thread),
        })
    }

    /// Every change seen so far.
    pub fn changes(&self) -> Vec<Scrape> {
        self.changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .changes
            .clone()
    }

    /// Waits until a scrape that started at or after `since` has finished, so that
    /// [`changes`](Self::changes) covers everything up to `since`: on a busy machine the
    /// recorder can lag behind the test.
    pub fn wait_caught_up(&self, since: SystemTime, timeout: Duration) -> Result<()> {
        crate::tools::wait_until(timeout, "the /metrics recorder to catch up", || {
            let last = self.changes.lock().unwrap_or_else(|p| p.into_inner()).last;
            Ok(last.is_some_and(|last| last >= since).then_some(()))
        })
    }
}

impl Drop for MetricsRecorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
