//! One HTTP request through the waypoint, in phases: route → authorize →
//! prepare (faults, filters, backend) → an injected delay → pick an endpoint
//! → forward (retries, timeouts) → respond (response filters), then metrics
//! and the access log.
//! The decisions are the library's pure functions; this module carries them
//! out with hyper.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_identity::Identity;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::access_log::{AccessEntry, AccessLog};
use crate::authz::{self, RequestInfo, Scope};
use crate::balance::{EndpointPicker, InFlight, Load};
use crate::circuit::{Admission, Breaker, ConnectionSettings, Limits, Overflow, RetryPermit};
use crate::config::{Endpoint, Protocol, Served, Snapshot, SnapshotHandle, Workload};
use crate::fault;
use crate::filters::RequestMirror;
use crate::hop::{ensure_request_id, strip_hop_by_hop};
use crate::lb::request_hash;
use crate::metrics::{
    Metrics, MirrorDropped, RefusedReason, RequestProtocol, RequestRecord, ServiceLabels, WorkloadLabels,
};
use crate::normalize::normalize;
use crate::outlier::Attempt;
use crate::plan::{prepare, Decision, Forward};
use crate::replay::ReplayBody;
use crate::reply::{Reply, ReplyReason};
use crate::retry::{self, Outcome, RetryBudget};
use crate::route::Route;
use crate::target::ServiceTarget;
use crate::upgrade;
use crate::upstream::{request_uri, ProxyBody, Upstream};

/// How long a mirror copy waits for its answer (which is dropped).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// What every request shares.
pub struct Shared {
    pub snapshots: SnapshotHandle,
    pub upstream: Upstream,
    pub metrics: Metrics,
    /// The waypoint Gateway's namespace and name (policies bind to it).
    pub gateway: (String, String),
    /// Proxies in front of the waypoint trusted to write `X-Forwarded-For` ([`Scope::xff_trusted_hops`]).
    pub xff_trusted_hops: u32,
    pub budget: Arc<RetryBudget>,
    pub access_log: AccessLog,
    /// Mirror copies that may be in flight at once ([`send_mirror`]).
    mirrors: Arc<Semaphore>,
    loads: Mutex<HashMap<SocketAddr, Arc<InFlight>>>,
    pickers: Mutex<HashMap<String, Arc<EndpointPicker>>>,
    /// Circuit breakers by upstream cluster: `namespace/hostname`, port, subset.
    breakers: Mutex<HashMap<ClusterKey, Arc<Breaker>>>,
    /// Endpoint workloads' metric labels by uid, with the workload they were
    /// made from: rebuilt only when the configuration replaced it.
    labels: Mutex<HashMap<String, (Arc<Workload>, WorkloadLabels)>>,
    /// The snapshot version the maps above were last pruned for.
    pruned_for: AtomicU64,
}

impl Shared {
    pub fn new(
        snapshots: SnapshotHandle,
        upstream: Upstream,
        metrics: Metrics,
        gateway: (String, String),
        xff_trusted_hops: u32,
        access_log: AccessLog,
        max_mirrors: usize,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            snapshots,
            upstream,
            metrics,
            gateway,
            xff_trusted_hops,
            budget: Arc::new(RetryBudget::default()),
            access_log,
            mirrors: Arc::new(Semaphore::new(max_mirrors)),
            loads: Mutex::default(),
            pickers: Mutex::default(),
            breakers: Mutex::default(),
            labels: Mutex::default(),
            pruned_for: AtomicU64::new(0),
        })
    }

    /// What authorization needs to know about this waypoint.
    pub fn authz_scope(&self) -> Scope<'_> {
        Scope {
            gateway_namespace: &self.gateway.0,
            gateway_name: &self.gateway.1,
            xff_trusted_hops: self.xff_trusted_hops,
        }
    }

    pub(crate) fn load(&self, endpoint: SocketAddr) -> Arc<InFlight> {
        self.loads.lock().expect("bug: poisoned").entry(endpoint).or_default().clone()
    }

    /// After a configuration change, forgets the endpoints, services and
    /// workloads it no longer names, so churn does not grow these maps.
    fn prune(&self, snapshot: &Snapshot) {
        if self.pruned_for.swap(snapshot.version(), Ordering::Relaxed) == snapshot.version() {
            return;
        }
        let workloads = snapshot.workloads();
        self.labels.lock().expect("bug: poisoned").retain(|uid, _| workloads.contains_key(uid));
        self.pickers.lock().expect("bug: poisoned").retain(|key, _| snapshot.service(key).is_some());
        self.breakers.lock().expect("bug: poisoned").retain(|(key, ..), _| snapshot.service(key).is_some());
        let ips: HashSet<IpAddr> = workloads.values().flat_map(|w| w.addresses.iter().copied()).collect();
        self.loads.lock().expect("bug: poisoned").retain(|addr, load| load.get() > 0 || ips.contains(&addr.ip()));
        self.upstream.prune(|ip| ips.contains(&ip));
    }

    /// `w`'s metric labels, made once per version of the workload.
    fn labels(&self, w: &Arc<Workload>) -> WorkloadLabels {
        let mut labels = self.labels.lock().expect("bug: poisoned");
        match labels.get(&w.uid) {
            Some((seen, l)) if Arc::ptr_eq(seen, w) => l.clone(),
            _ => {
                let l = WorkloadLabels::from_workload(w);
                labels.insert(w.uid.clone(), (w.clone(), l.clone()));
                l
            }
        }
    }

    /// The endpoints outlier detection has ejected now, by service (the admin dump).
    pub fn ejections(&self) -> Vec<(String, Vec<crate::outlier::Ejection>, u64)> {
        let now = Instant::now();
        let pickers = self.pickers.lock().expect("bug: poisoned");
        let mut out: Vec<_> = pickers
            .iter()
            .map(|(service, p)| {
                let (ejected, total) = p.ejections(now);
                (service.clone(), ejected, total)
            })
            .filter(|(_, ejected, total)| !ejected.is_empty() || *total > 0)
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The circuit breakers of `target`'s cluster, new when its limits changed.
    pub(crate) fn breaker(&self, service_key: &str, target: &ServiceTarget, limits: Limits) -> Arc<Breaker> {
        let subset = target.policy.as_ref().and_then(|p| p.subset.as_ref()).map(|s| s.name.clone());
        let key = (service_key.to_owned(), target.port, subset);
        let mut breakers = self.breakers.lock().expect("bug: poisoned");
        match breakers.get(&key) {
            Some(b) if b.limits() == limits => b.clone(),
            _ => breakers.entry(key).insert_entry(Breaker::new(limits)).get().clone(),
        }
    }

    pub(crate) fn picker(&self, service: &str) -> Arc<EndpointPicker> {
        let mut pickers = self.pickers.lock().expect("bug: poisoned");
        if let Some(p) = pickers.get(service) {
            return p.clone();
        }
        pickers.entry(service.to_owned()).or_default().clone()
    }
}

/// An upstream cluster: the service (`namespace/hostname`), its port, the subset.
type ClusterKey = (String, u16, Option<String>);

/// The client side of one HBONE stream, for every request on it.
pub struct Downstream {
    /// The HBONE peer: the client pod's address (its ztunnel dials from the pod).
    pub peer: SocketAddr,
    pub identity: Arc<Identity>,
    /// The service VIP:port the client called (the CONNECT `:authority`).
    pub target: SocketAddr,
    /// The client's labels for metrics, looked up once per stream.
    pub labels: WorkloadLabels,
    /// The called service's labels, made once per stream.
    pub service: ServiceLabels,
}

/// Responses the waypoint makes itself.
fn reply_response(reply: Reply) -> Response<ProxyBody> {
    let mut r = Response::new(full(reply.body));
    *r.status_mut() = reply.status;
    *r.headers_mut() = reply.headers;
    r
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// One endpoint considered for a request (or a TCP connection), with its
/// requests (connections) in flight.
pub(crate) struct Candidate<'a> {
    pub endpoint: &'a Endpoint,
    /// The endpoint's address for the target port.
    pub addr: SocketAddr,
    pub load: Arc<InFlight>,
    /// Out of balancing by outlier detection.
    pub ejected: bool,
}

impl Load for Candidate<'_> {
    fn in_flight(&self) -> u64 {
        self.load.get()
    }

    fn healthy(&self) -> bool {
        !self.ejected
    }
}

/// What became of a request, for metrics and the log.
struct Done<'a> {
    status: StatusCode,
    flags: &'static str,
    upstream: Option<SocketAddr>,
    destination: Option<WorkloadLabels>,
    route: Option<&'a Route>,
}

/// Answers with the waypoint's own reply, noted in `done`.
fn answer(reply: Reply, done: &mut Done) -> Response<ProxyBody> {
    done.status = reply.status;
    done.flags = reply.reason.response_flag();
    reply_response(reply)
}

/// Handles one request.
pub async fn handle(shared: Arc<Shared>, down: Arc<Downstream>, req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    let snapshot = shared.snapshots.current();
    shared.prune(&snapshot);
    let (mut parts, body) = req.into_parts();
    // Checked on the headers as the client sent them, before the waypoint adds any.
    let over_limits = crate::limits::over_limits(&parts.headers);
    let request_bytes = body.size_hint().exact().unwrap_or(0);
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let request_id = ensure_request_id(&mut parts.headers, &mut rng);
    let method = parts.method.clone();
    let version = parts.version;
    let path = parts.uri.path().to_owned();
    let authority = crate::authority::request_host(&parts).map(str::to_owned);
    let user_agent = parts.headers.get(http::header::USER_AGENT).cloned();
    let Some(served) = snapshot.served(down.target) else {
        // The configuration changed under an open connection.
        return reply_response(Reply::no_healthy_upstream());
    };
    let span = crate::trace::server(&mut parts, &served.service.service.hostname, served.port.port, &request_id);
    let protocol = if served.port.protocol == Protocol::Grpc {
        RequestProtocol::Grpc
    } else {
        RequestProtocol::of(&parts.headers)
    };
    let (response, done) = if over_limits {
        debug!(peer = %down.identity, fields = parts.headers.len(), "request headers over the limits");
        shared.metrics.refused(RefusedReason::head_too_large);
        let reply = Reply::headers_too_large();
        let flags = reply.reason.response_flag();
        let done = Done { status: reply.status, flags, upstream: None, destination: None, route: None };
        (reply_response(reply), done)
    } else {
        route_and_forward(&shared, &down, &snapshot, served, parts, body, &mut rng, start).await
    };
    let duration = start.elapsed();
    let record = RequestRecord {
        source: &down.labels,
        destination: done.destination.as_ref(),
        service: &down.service,
        protocol,
        response_code: done.status.as_u16(),
        grpc_status: grpc_status(&response),
        response_flags: done.flags,
        duration,
        request_bytes,
        response_bytes: response.body().size_hint().exact().unwrap_or(0),
    };
    shared.metrics.request(&record);
    shared.access_log.log(&AccessEntry {
        record: &record,
        method: &method,
        path: &path,
        version,
        authority: authority.as_deref().unwrap_or("-"),
        upstream: done.upstream,
        route: done.route,
        request_id: request_id.to_str().ok(),
        user_agent: user_agent.as_ref().and_then(|v| v.to_str().ok()),
    });
    crate::trace::server_end(span, &record);
    response
}

#[allow(clippy::too_many_arguments)]
async fn route_and_forward<'s>(
    shared: &Shared,
    down: &Downstream,
    snapshot: &'s Snapshot,
    served: Served<'s>,
    mut parts: Parts,
    body: Incoming,
    rng: &mut SmallRng,
    start: Instant,
) -> (Response<ProxyBody>, Done<'s>) {
    let mut done = Done { status: StatusCode::OK, flags: "-", upstream: None, destination: None, route: None };
    // Normalize the path, so that routing, policy and the application all see the same one.
    if normalize(&mut parts.uri).is_err() {
        return (answer(Reply::bad_path(), &mut done), done);
    }
    // Route.
    let (table, default_route) = served.port.table_for(&down.identity.namespace);
    let matched = match table.find(&parts) {
        Ok(m) => m,
        Err(no) => return (answer(no.reply(), &mut done), done),
    };
    if !default_route {
        done.route = Some(matched.route);
    }
    // Authorize, on the request as the client sent it.
    let svc = &served.service.service;
    let info = RequestInfo {
        peer: Some(&down.identity),
        peer_ip: down.peer.ip(),
        destination_ip: Some(down.target.ip()),
        service_namespace: &svc.namespace,
        service_hostname: &svc.hostname,
        port: served.port.port,
        parts: Some(&parts),
    };
    let scope = shared.authz_scope();
    let verdict = authz::authorize(snapshot.policies().values(), &scope, &info);
    for (policy, would_allow) in &verdict.dry_run {
        info!(%policy, would_allow, allowed = verdict.allowed, peer = %down.identity, path = parts.uri.path(), "dry-run policy would decide otherwise");
    }
    if !verdict.allowed {
        debug!(policy = ?verdict.policy, peer = %down.identity, "request denied");
        done.status = StatusCode::FORBIDDEN;
        done.flags = "-"; // Envoy has no flag for an RBAC denial either
        let mut r = Response::new(full(Bytes::from_static(authz::DENIED_BODY.as_bytes())));
        *r.status_mut() = StatusCode::FORBIDDEN;
        r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return (r, done);
    }
    let http2 = match served.port.protocol {
        Protocol::Http2 | Protocol::Grpc => true,
        Protocol::Http1 => false,
        Protocol::Detect | Protocol::Tcp => parts.version == http::Version::HTTP_2,
    };
    let client_upgrade = upgrade::take(&mut parts, http2);
    strip_hop_by_hop(&mut parts.headers, client_upgrade.is_some());
    // Faults, filters and the backend.
    let decision = prepare(matched, &mut parts, served.port.port, rng);
    // An injected delay, before the answer or the forwarding; as in Envoy
    // (its fault filter runs before the router) the timeouts start after it.
    let (delayed, start) = match decision.delay() {
        Some(d) => (true, fault::delay(d, start).await),
        None => (false, start),
    };
    let response = match decision {
        Decision::Reply { mut reply, effects, .. } => {
            effects.apply_response(&mut reply.headers);
            answer(reply, &mut done)
        }
        Decision::Forward(forward) => {
            let client = ClientSide { upgrade: client_upgrade, http2, peer: down.peer.ip() };
            forward_and_respond(shared, snapshot, &forward, parts, body, client, rng, start, &mut done).await
        }
    };
    if delayed {
        done.flags = fault::with_delay_flag(done.flags);
    }
    (response, done)
}

/// What the client side of a request asks of its forwarding.
struct ClientSide {
    /// The client's HTTP/1.1 upgrade, taken off the request.
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    http2: bool,
    /// The HBONE peer's address (consistent hashing by source IP).
    peer: IpAddr,
}

/// Forwards a prepared request and makes the client's response of what
/// comes back (an upgrade spliced through, response filters).
#[allow(clippy::too_many_arguments)]
async fn forward_and_respond(
    shared: &Shared,
    snapshot: &Snapshot,
    forward: &Forward<'_>,
    parts: Parts,
    body: Incoming,
    client: ClientSide,
    rng: &mut SmallRng,
    start: Instant,
    done: &mut Done<'_>,
) -> Response<ProxyBody> {
    let lb = forward.backend.target.lb();
    let mut hash = lb.and_then(|lb| lb.hash.as_ref()).and_then(|key| request_hash(key, &parts, client.peer));
    // A hash cookie the request lacks is made for it, when the DestinationRule gives it a TTL (Envoy).
    let mut set_cookie = None;
    if hash.is_none() {
        if let Some((made, header)) = lb.and_then(|lb| lb.make_cookie.as_ref()).and_then(|m| m.make(rng)) {
            (hash, set_cookie) = (Some(made), Some(header));
        }
    }
    let response = forward_request(shared, snapshot, forward, parts, body, client.http2, hash, rng, start, done).await;
    let mut response = match response {
        Ok(r) => r,
        Err(reply) => return answer(reply, done),
    };
    let switched = client.upgrade.is_some_and(|client| upgrade::splice(client, &mut response));
    if !switched && response.status() == StatusCode::SWITCHING_PROTOCOLS {
        warn!(upstream = ?done.upstream, "the endpoint switched protocols without an upgrade to carry it");
        return answer(failure_reply(Outcome::Reset), done);
    }
    strip_hop_by_hop(response.headers_mut(), switched);
    forward.effects.apply_response(response.headers_mut());
    if let Some(cookie) = set_cookie {
        response.headers_mut().append(http::header::SET_COOKIE, cookie);
    }
    done.status = response.status();
    response
}

/// Why no answer came back from the backend.
fn failure_reply(outcome: Outcome) -> Reply {
    let (status, flag) = match outcome {
        Outcome::Timeout => (StatusCode::GATEWAY_TIMEOUT, ReplyReason::UpstreamTimeout),
        Outcome::ConnectFailure => (StatusCode::SERVICE_UNAVAILABLE, ReplyReason::UpstreamConnectFailure),
        _ => (StatusCode::SERVICE_UNAVAILABLE, ReplyReason::UpstreamReset),
    };
    Reply { status, headers: Default::default(), body: Bytes::new(), reason: flag }
}

#[allow(clippy::too_many_arguments)]
async fn forward_request(
    shared: &Shared,
    snapshot: &Snapshot,
    forward: &Forward<'_>,
    mut parts: Parts,
    body: Incoming,
    http2: bool,
    hash: Option<u64>,
    rng: &mut SmallRng,
    start: Instant,
    done: &mut Done<'_>,
) -> Result<Response<ProxyBody>, Reply> {
    // An HTTP/2 client names the host in the URI only; an HTTP/1.1
    // endpoint needs it as `Host`, not the endpoint address the URI gets.
    if !parts.headers.contains_key(http::header::HOST) {
        if let Some(v) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            parts.headers.insert(http::header::HOST, v);
        }
    }
    let target = forward.backend.target;
    let endpoints = snapshot.endpoints(target);
    let service_key = format!("{}/{}", target.namespace, target.hostname);
    let picker = shared.picker(&service_key);
    let outlier = target.outlier();
    let now = Instant::now();
    let candidates: Vec<Candidate> = endpoints
        .iter()
        .filter(|e| target.admits(&e.workload.uid))
        .filter_map(|e| {
            let addr = e.target(target.port)?;
            let ejected = outlier.is_some() && picker.is_ejected(addr, now);
            Some(Candidate { endpoint: e, addr, load: shared.load(addr), ejected })
        })
        .collect();
    if candidates.is_empty() {
        return Err(Reply::no_healthy_upstream());
    }
    let deadlines = forward.timeouts.deadlines(start);
    // A body small enough is kept, so that a retry or a mirror can send it again.
    let buffered = match buffer_small_body(&parts, body).await {
        Ok(b) => b,
        Err(reply) => return Err(reply),
    };
    for mirror in &forward.mirrors {
        if let RequestBody::Buffered(bytes) = &buffered {
            send_mirror(shared, snapshot, mirror, &parts, bytes.clone(), http2, rng);
        }
    }
    let breaker = target.pool().map(|pool| shared.breaker(&service_key, target, pool.limits));
    let admission = match &breaker {
        Some(b) => Some(admit(shared, b, &service_key, http2, deadlines.overall()).await?),
        None => None,
    };
    let conn = target.pool().map(|p| p.connection).unwrap_or_default();
    let _active = shared.budget.request();
    let mut body = Some(buffered);
    let mut tried: Vec<usize> = Vec::new();
    let mut attempt = 0u32;
    // Held through the retried attempt: the budget (and the cluster) count retries in flight.
    let mut retry_permit = None;
    let mut cluster_retry = None;
    loop {
        attempt += 1;
        let hashed = hash.and_then(|h| picker.pick_hashed(&candidates, |c| c.endpoint.workload.uid.as_str(), h));
        let policy = target.lb().map_or(picker.policy(), |lb| lb.simple);
        let Some(i) = hashed.or_else(|| picker.pick_with(policy, &candidates, &tried, rng)) else {
            return Err(Reply::no_healthy_upstream());
        };
        tried.push(i);
        let candidate = &candidates[i];
        let addr = candidate.addr;
        done.upstream = Some(addr);
        done.destination = Some(shared.labels(&candidate.endpoint.workload));
        let (this_body, next) = body.take().expect("bug: body consumed").attempt();
        body = next;
        let mut req = Request::from_parts(parts.clone(), this_body);
        *req.uri_mut() = request_uri(&parts.uri, &parts.headers, addr);
        let _in_flight = candidate.load.start();
        let now = Instant::now();
        let span = crate::trace::client(&mut req, target, addr);
        let send = shared.upstream.send(req, addr, http2, conn);
        let result = match deadlines.attempt(now) {
            Some(at) => match tokio::time::timeout_at(at.into(), send).await {
                Ok(r) => r.map_err(|e| classify_error(&e)),
                Err(_) => Err(Outcome::Timeout),
            },
            None => send.await.map_err(|e| classify_error(&e)),
        };
        crate::trace::client_end(span, &result);
        let outcome = match &result {
            Ok(resp) => match grpc_status(resp) {
                Some(code) if code != 0 => Outcome::GrpcStatus(code),
                _ => Outcome::Status(resp.status()),
            },
            Err(o) => *o,
        };
        if let Some(cfg) = outlier {
            let seen = match &result {
                Ok(resp) => Attempt::Status(resp.status().as_u16()),
                Err(_) => Attempt::LocalFailure,
            };
            if picker.record(cfg, addr, seen, candidates.len(), Instant::now()) {
                warn!(%addr, service = %service_key, "outlier detection: endpoint ejected");
                shared.metrics.outlier_ejected(&service_key);
            }
        }
        let replayable = body.as_ref().is_some_and(RequestBody::is_replayable);
        let overall_passed = deadlines.overall().is_some_and(|end| Instant::now() >= end);
        if !overall_passed && forward.retry.should_retry(attempt, outcome, false, replayable) {
            let backoff = forward.retry.backoff(attempt, rng);
            if deadlines.retry_fits(Instant::now(), backoff)
                && shared.budget.next_retry(&mut retry_permit)
                && retry_within_limit(shared, breaker.as_ref(), &mut cluster_retry, &service_key)
            {
                debug!(%addr, ?outcome, attempt, "retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
        }
        return match result {
            // The request keeps its place in the cluster's limits until its response body ends.
            Ok(resp) => Ok(resp.map(|b| match admission {
                Some(held) => Held { body: b.map_err(Into::into).boxed(), _held: held }.boxed(),
                None => b.map_err(Into::into).boxed(),
            })),
            Err(outcome) => {
                warn!(%addr, ?outcome, "no response from the endpoint");
                Err(failure_reply(outcome))
            }
        };
    }
}

/// Admits a request past its cluster's circuit breakers; an HTTP/1.1 one may
/// wait as pending for a connection, until `deadline` (then 504, as Envoy).
async fn admit(
    shared: &Shared,
    breaker: &Arc<Breaker>,
    service_key: &str,
    http2: bool,
    deadline: Option<Instant>,
) -> Result<Admission, Reply> {
    let admitted = match deadline {
        Some(end) => tokio::time::timeout_at(end.into(), breaker.admit(http2))
            .await
            .map_err(|_| failure_reply(Outcome::Timeout))?,
        None => breaker.admit(http2).await,
    };
    admitted.map_err(|limit| {
        debug!(service = %service_key, limit = limit.as_str(), "connection pool overflow");
        shared.metrics.overflowed(service_key, limit);
        Reply::overflow()
    })
}

/// Whether a retry stays within the cluster's `maxRetries`; its permit is
/// held in `permit` through the retried attempt (the previous one given back).
fn retry_within_limit(
    shared: &Shared,
    breaker: Option<&Arc<Breaker>>,
    permit: &mut Option<RetryPermit>,
    service_key: &str,
) -> bool {
    let Some(b) = breaker else { return true };
    // The previous retry is over: given back before this one counts.
    *permit = None;
    *permit = b.retry();
    if permit.is_none() {
        shared.metrics.overflowed(service_key, Overflow::Retries);
    }
    permit.is_some()
}

/// A response body that holds something (a circuit breaker's admission) until it ends.
struct Held<T> {
    body: ProxyBody,
    _held: T,
}

impl<T: Unpin> Body for Held<T> {
    type Data = Bytes;
    type Error = ambit_hbone::pool::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

fn grpc_status<B>(resp: &Response<B>) -> Option<u32> {
    resp.headers().get("grpc-status")?.to_str().ok()?.parse().ok()
}

fn classify_error(e: &hyper_util::client::legacy::Error) -> Outcome {
    if e.is_connect() {
        Outcome::ConnectFailure
    } else {
        Outcome::Reset
    }
}

/// A request body as forwarded: kept whole (it can be sent again, and
/// mirrored), streamed with a record for replay, or streamed once.
enum RequestBody {
    Buffered(Bytes),
    Replayable(ReplayBody),
    Streamed(ProxyBody),
}

impl RequestBody {
    /// This attempt's body, keeping what the next attempt needs (`None`: there is none).
    fn attempt(self) -> (ProxyBody, Option<RequestBody>) {
        match self {
            RequestBody::Buffered(b) => (full(b.clone()), Some(RequestBody::Buffered(b))),
            RequestBody::Replayable(handle) => (handle.next_attempt(), Some(RequestBody::Replayable(handle))),
            RequestBody::Streamed(s) => (s, None),
        }
    }

    /// Whether a next attempt can send it again.
    fn is_replayable(&self) -> bool {
        match self {
            RequestBody::Buffered(_) => true,
            RequestBody::Replayable(r) => r.is_replayable(),
            RequestBody::Streamed(_) => false,
        }
    }
}

/// A request body known to fit the replay limit is read whole (so it can be
/// sent again and mirrored); one of unknown length streams with a record for
/// replay up to the limit ([`ReplayBody`]); a larger one streams through (no
/// retry).
async fn buffer_small_body(parts: &Parts, body: Incoming) -> Result<RequestBody, Reply> {
    if body.is_end_stream() {
        return Ok(RequestBody::Buffered(Bytes::new()));
    }
    match body.size_hint().exact() {
        None => return Ok(RequestBody::Replayable(ReplayBody::new(body.map_err(Into::into).boxed()))),
        Some(n) if !retry::replayable(n as usize) => {
            return Ok(RequestBody::Streamed(body.map_err(Into::into).boxed()))
        }
        Some(_) => {}
    }
    match Limited::new(body, retry::REPLAY_LIMIT).collect().await {
        Ok(collected) => Ok(RequestBody::Buffered(collected.to_bytes())),
        Err(e) => {
            debug!(uri = %parts.uri, error = %e, "client request body failed");
            Err(Reply {
                status: StatusCode::BAD_REQUEST,
                headers: Default::default(),
                body: Bytes::new(),
                reason: ReplyReason::DownstreamReset,
            })
        }
    }
}

/// Sends a copy of the request to one endpoint of the mirror's service and
/// ignores the answer (Envoy's shadowing: the Host gets `-shadow`). Copies in
/// flight are bounded, as Envoy's circuit breakers bound its shadows: a mirror
/// that hangs holds each copy for up to [`MIRROR_TIMEOUT`], and one over the
/// bound is not sent (counted).
fn send_mirror(
    shared: &Shared,
    snapshot: &Snapshot,
    mirror: &RequestMirror,
    parts: &Parts,
    body: Bytes,
    http2: bool,
    rng: &mut SmallRng,
) {
    let endpoints = snapshot.endpoints(&mirror.target);
    let usable: Vec<SocketAddr> = endpoints
        .iter()
        .filter(|e| mirror.target.admits(&e.workload.uid))
        .filter_map(|e| e.target(mirror.target.port))
        .collect();
    if usable.is_empty() {
        debug!(target = %mirror.target, "mirror has no endpoint");
        shared.metrics.mirror_dropped(&mirror.target.hostname, MirrorDropped::no_endpoint);
        return;
    }
    let Ok(slot) = shared.mirrors.clone().try_acquire_owned() else {
        debug!(target = %mirror.target, "mirror copies in flight at their bound: copy not sent");
        shared.metrics.mirror_dropped(&mirror.target.hostname, MirrorDropped::in_flight);
        return;
    };
    let addr = usable[rand::Rng::random_range(rng, 0..usable.len())];
    let mut req = Request::from_parts(parts.clone(), full(body));
    *req.uri_mut() = request_uri(&parts.uri, &parts.headers, addr);
    if let Some(host) = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()) {
        if let Ok(v) = HeaderValue::try_from(format!("{host}-shadow")) {
            req.headers_mut().insert(http::header::HOST, v);
        }
    }
    let upstream = shared.upstream.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let send = upstream.send(req, addr, http2, ConnectionSettings::default());
        match tokio::time::timeout(MIRROR_TIMEOUT, send).await {
            Ok(Ok(resp)) => {
                let _ = resp.into_body().collect().await;
            }
            Ok(Err(e)) => debug!(%addr, error = %e, "mirror request failed"),
            Err(_) => debug!(%addr, "mirror request timed out"),
        }
    });
}
