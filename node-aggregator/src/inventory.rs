//! `Inventory/List` and `Inventory/Watch`: what the registry holds, for grpcurl.

use std::pin::Pin;
use std::sync::Arc;

use hypervisor_proto::v1::inventory_server::Inventory;
use hypervisor_proto::v1::{
    ListRequest, ListResponse, Series, WatchEvent, WatchRequest, watch_event::Kind,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::registry::{ChangeKind, Claim, Registry};

pub struct InventoryService {
    registry: Arc<Registry>,
}

impl InventoryService {
    pub fn new(registry: Arc<Registry>) -> Self {
        InventoryService { registry }
    }

    fn series(&self, claim: Claim) -> Series {
        Series {
            domain: Some(claim.domain),
            node: self.registry.node().to_string(),
            stream_id: claim.stream_id,
            peer: claim.peer.to_string(),
            reported_at: Some(claim.reported_at.into()),
            held: claim.held,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Inventory for InventoryService {
    type WatchStream = WatchStream;

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let series = self
            .registry
            .claims()
            .into_iter()
            .map(|claim| self.series(claim))
            .collect();
        Ok(Response::new(ListResponse {
            node: self.registry.node().to_string(),
            series,
        }))
    }

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let (initial, mut changes) = self.registry.watch();
        let (events, event_stream) = mpsc::channel(64);
        let added: Vec<WatchEvent> = initial
            .into_iter()
            .map(|claim| event(Kind::Added, self.series(claim)))
            .collect();
        let inventory = InventoryService::new(Arc::clone(&self.registry));
        tokio::spawn(async move {
            for event in added {
                if events.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            loop {
                let event = match changes.recv().await {
                    Ok(change) => Ok(event(kind(change.kind), inventory.series(change.claim))),
                    Err(RecvError::Lagged(missed)) => Err(Status::data_loss(format!(
                        "this watcher fell {missed} changes behind; watch again for a fresh snapshot"
                    ))),
                    Err(RecvError::Closed) => return,
                };
                let failed = event.is_err();
                if events.send(event).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(event_stream))))
    }
}

fn kind(kind: ChangeKind) -> Kind {
    match kind {
        ChangeKind::Added => Kind::Added,
        ChangeKind::Modified => Kind::Modified,
        ChangeKind::Removed => Kind::Removed,
    }
}

fn event(kind: Kind, series: Series) -> WatchEvent {
    WatchEvent {
        kind: kind.into(),
        series: Some(series),
    }
}
