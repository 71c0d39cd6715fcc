//! A real OpenTelemetry trace receiver for the lab: OTLP/gRPC (the `TraceService` of the `opentelemetry-proto`
//! crate, served by tonic) and OTLP/HTTP (`POST /v1/traces`, protobuf) on one port, inside a lab network namespace.
//! It keeps every span it receives, with the transport that carried it, for the tests to inspect.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::sync::oneshot;

use crate::netns::NetNs;

/// How a span reached the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

/// One span received.
#[derive(Clone, Debug)]
pub struct Received {
    pub via: Transport,
    /// The resource's `service.name`.
    pub service_name: Option<String>,
    pub span: Span,
}

impl Received {
    /// The string form of attribute `key` (strings as they are, integers in decimal).
    pub fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }

    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent's span id, empty for a root span.
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// OTLP's span kind: 2 server, 3 client.
    pub fn kind(&self) -> i32 {
        self.span.kind
    }
}

pub const KIND_SERVER: i32 = 2;
pub const KIND_CLIENT: i32 = 3;

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let value = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type Store = Arc<Mutex<Vec<Received>>>;

fn keep(store: &Store, via: Transport, req: ExportTraceServiceRequest) {
    let mut kept = store.lock().expect("otlp store");
    for rs in req.resource_spans {
        let service_name = rs.resource.as_ref().and_then(|r| attr(&r.attributes, "service.name"));
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            kept.push(Received { via, service_name: service_name.clone(), span });
        }
    }
}

struct Collector(Store);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, Transport::Grpc, req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The receiver (see the module docs); stops on drop.
pub struct OtlpReceiver {
    addr: SocketAddr,
    store: Store,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Listens on `addr` inside `netns` (port 0 picks one).
    pub fn start(netns: &NetNs, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = netns
            .run(move || std::net::TcpListener::bind(addr))
            .with_context(|| format!("otlp receiver: listen on {addr} in netns {}", netns.name()))?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let store = Store::default();
        let http_store = store.clone();
        let http = axum::routing::post(move |body: axum::body::Bytes| async move {
            match ExportTraceServiceRequest::decode(body) {
                Ok(req) => {
                    keep(&http_store, Transport::Http, req);
                    let ok = ExportTraceServiceResponse::default().encode_to_vec();
                    (http::StatusCode::OK, [(http::header::CONTENT_TYPE, "application/x-protobuf")], ok)
                }
                Err(_) => (http::StatusCode::BAD_REQUEST, [(http::header::CONTENT_TYPE, "text/plain")], Vec::new()),
            }
        });
        let routes = tonic::service::Routes::new(TraceServiceServer::new(Collector(store.clone())))
            .into_axum_router()
            .route("/v1/traces", http);
        let (stop, stopped) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new().name("otlp-receiver".into()).spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("otlp receiver: tokio listener");
                let served = tonic::transport::Server::builder()
                    .accept_http1(true)
                    .add_routes(routes.into())
                    .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(e) = served {
                    eprintln!("otlp receiver: {e}");
                }
            })
        })?;
        Ok(OtlpReceiver { addr, store, stop: Some(stop), thread: Some(thread) })
    }

    /// The address it listens on (inside its namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.store.lock().expect("otlp store").clone()
    }

    /// The spans of trace `trace_id` (hex), once `count` of them arrived; fails after `timeout` with what came.
    pub fn wait_trace(&self, trace_id: &str, count: usize, timeout: Duration) -> anyhow::Result<Vec<Received>> {
        let start = Instant::now();
        loop {
            let spans: Vec<Received> = self.spans().into_iter().filter(|s| s.trace_id() == trace_id).collect();
            if spans.len() >= count {
                return Ok(spans);
            }
            if start.elapsed() > timeout {
                anyhow::bail!(
                    "{} of {count} spans of trace {trace_id} within {timeout:?}; all: {:#?}",
                    spans.len(),
                    self.spans()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
