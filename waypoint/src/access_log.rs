//! The access log: one line per request, at info level under the target
//! `access` (as ztunnel's), with the fields of Envoy's default access log
//! an operator needs: `method`, `path` (without its query: queries carry
//! tokens), `protocol`, `response_code`, `grpc_status`, `response_flags`,
//! `bytes_received`, `bytes_sent`, `duration`, `upstream_host` (the
//! endpoint), `route_name` (`namespace/name`), `authority`, `user_agent`,
//! `x_request_id`, and the peers (`src.identity`, `src.workload`,
//! `src.namespace`, `dst.service`, `dst.workload`). What is not known
//! shows `-`. Plain or JSON follows `--log-format`; `--access-log false`
//! turns it off ([`AccessLog`]), and so does the filter `access=warn`.
//!
//! A TCP connection relayed at L4 gets one line too ([`ConnectionEntry`]),
//! with the fields that apply to it and `upstream_cluster`, the service (and
//! subset) a VirtualService's `tcp[]` split sent it to.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, Version};
use tracing::info;

use crate::metrics::{RequestRecord, ServiceLabels, WorkloadLabels};
use crate::route::Route;
use crate::target::ServiceTarget;

/// What the access log says about one finished request, besides its
/// [`RequestRecord`] (the metrics' view of it).
#[derive(Clone, Copy, Debug)]
pub struct AccessEntry<'a> {
    pub record: &'a RequestRecord<'a>,
    pub method: &'a Method,
    /// The path the client sent, before any rewrite; a query is cut off
    /// here, so the request-target may be passed whole.
    pub path: &'a str,
    /// The client's HTTP version.
    pub version: Version,
    /// `:authority`, or `Host` in HTTP/1.1.
    pub authority: &'a str,
    /// The endpoint the request went to (the last attempt's).
    pub upstream: Option<SocketAddr>,
    /// The route that took the request.
    pub route: Option<&'a Route>,
    pub request_id: Option<&'a str>,
    pub user_agent: Option<&'a str>,
}

/// The `--access-log` switch.
#[derive(Clone, Copy, Debug)]
pub struct AccessLog {
    enabled: bool,
}

impl AccessLog {
    pub fn new(enabled: bool) -> Self {
        AccessLog { enabled }
    }

    /// Whether a line would be written: switched on and not filtered out.
    /// The request path may skip gathering an entry when not.
    pub fn is_enabled(&self) -> bool {
        self.enabled && tracing::enabled!(target: "access", tracing::Level::INFO)
    }

    /// Logs the request when switched on.
    pub fn log(&self, entry: &AccessEntry<'_>) {
        if self.enabled {
            log_request(entry);
        }
    }

    /// Logs the TCP connection when switched on.
    pub fn log_connection(&self, entry: &ConnectionEntry<'_>) {
        if self.enabled {
            log_connection(entry);
        }
    }
}

/// What the access log says about one finished TCP connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionEntry<'a> {
    pub source: &'a WorkloadLabels,
    /// The service the client called.
    pub service: &'a ServiceLabels,
    /// The service (and subset) the connection went to, once chosen.
    pub upstream_cluster: Option<&'a ServiceTarget>,
    /// The endpoint, and its workload's labels.
    pub upstream: Option<SocketAddr>,
    pub destination: Option<&'a WorkloadLabels>,
    /// `namespace/name` of the VirtualService whose `tcp[]` chose the upstream.
    pub route: Option<&'a str>,
    pub response_flags: &'static str,
    /// From the client, and to it.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
}

/// Writes the connection's access-log line, whatever the switch.
pub fn log_connection(e: &ConnectionEntry<'_>) {
    info!(
        target: "access",
        protocol = "TCP",
        response_flags = e.response_flags,
        bytes_received = e.bytes_received,
        bytes_sent = e.bytes_sent,
        duration = %Millis(e.duration),
        upstream_host = %OrDash(e.upstream),
        upstream_cluster = %UpstreamCluster(e.upstream_cluster),
        route_name = e.route.unwrap_or("-"),
        "src.identity" = e.source.principal.as_str(),
        "src.workload" = e.source.workload.as_str(),
        "src.namespace" = e.source.namespace.as_str(),
        "dst.service" = e.service.hostname.as_str(),
        "dst.workload" = e.destination.map_or("-", |d| d.workload.as_str()),
        "connection complete"
    );
}

/// Writes the request's access-log line, whatever the switch.
pub fn log_request(e: &AccessEntry<'_>) {
    let r = e.record;
    info!(
        target: "access",
        method = e.method.as_str(),
        path = without_query(e.path),
        protocol = version(e.version),
        response_code = r.response_code,
        grpc_status = %OrDash(r.grpc_status),
        response_flags = r.response_flags,
        bytes_received = r.request_bytes,
        bytes_sent = r.response_bytes,
        duration = %Millis(r.duration),
        upstream_host = %OrDash(e.upstream),
        route_name = %RouteName(e.route),
        authority = e.authority,
        user_agent = e.user_agent.unwrap_or("-"),
        x_request_id = e.request_id.unwrap_or("-"),
        "src.identity" = r.source.principal.as_str(),
        "src.workload" = r.source.workload.as_str(),
        "src.namespace" = r.source.namespace.as_str(),
        "dst.service" = r.service.hostname.as_str(),
        "dst.workload" = r.destination.map_or("-", |d| d.workload.as_str()),
        "request complete"
    );
}

fn without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// Envoy's `%PROTOCOL%`.
fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

/// A value, or `-` when there is none (Envoy's convention).
struct OrDash<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// `namespace/name` of a route, or `-`.
struct RouteName<'a>(Option<&'a Route>);

impl fmt::Display for RouteName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(r) => write!(f, "{}/{}", r.namespace, r.name),
            None => f.write_str("-"),
        }
    }
}

/// Istio's name of an upstream cluster, `outbound|<port>|<subset>|<hostname>`, or `-`.
struct UpstreamCluster<'a>(Option<&'a ServiceTarget>);

impl fmt::Display for UpstreamCluster<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(t) = self.0 else { return f.write_str("-") };
        let subset = t.policy.as_ref().and_then(|p| p.subset.as_ref()).map_or("", |s| s.name.as_str());
        write!(f, "outbound|{}|{subset}|{}", t.port, t.hostname)
    }
}

/// A duration as ztunnel's access log prints it: whole milliseconds, `12ms`.
struct Millis(Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use ambit_identity::Identity;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    use super::*;
    use crate::metrics::{response_flags, RequestProtocol, ServiceLabels, WorkloadLabels};
    use crate::route::RouteKind;

    type Fields = BTreeMap<String, String>;

    /// Captures events' fields (plus `target` and `level`); with `quiet`,
    /// filters out the `access` target as `access=warn` would.
    #[derive(Clone, Default)]
    struct Capture {
        events: Arc<Mutex<Vec<Fields>>>,
        quiet: bool,
    }

    struct Visitor<'a>(&'a mut Fields);

    impl Visit for Visitor<'_> {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.insert(field.name().into(), value.into());
        }
        fn record_u64(&mut self, field: &Field, value: u64) {
            self.0.insert(field.name().into(), value.to_string());
        }
        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            self.0.insert(field.name().into(), format!("{value:?}"));
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, meta: &Metadata<'_>) -> bool {
            !(self.quiet && meta.target() == "access")
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut fields = Fields::new();
            fields.insert("target".into(), event.metadata().target().into());
            fields.insert("level".into(), event.metadata().level().to_string());
            event.record(&mut Visitor(&mut fields));
            self.events.lock().unwrap().push(fields);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    /// The events `f` logs.
    fn captured(quiet: bool, f: impl FnOnce()) -> Vec<Fields> {
        let capture = Capture { quiet, ..Default::default() };
        tracing::subscriber::with_default(capture.clone(), f);
        let events = capture.events.lock().unwrap().clone();
        events
    }

    fn route() -> Route {
        Route {
            kind: RouteKind::Http,
            namespace: "apps".into(),
            name: "echo-split".into(),
            created: 0,
            hostnames: Vec::new(),
            rules: Vec::new(),
        }
    }

    struct Fixture {
        source: WorkloadLabels,
        destination: WorkloadLabels,
        service: ServiceLabels,
        route: Route,
    }

    impl Fixture {
        fn new() -> Self {
            let mut destination = WorkloadLabels::from_identity(&Identity::new("cluster.local", "apps", "echo"));
            destination.workload = crate::metrics::Value::new("echo-v1");
            Fixture {
                source: WorkloadLabels::from_identity(&Identity::new("cluster.local", "client-ns", "client")),
                destination,
                service: ServiceLabels::new("echo.apps.svc.cluster.local", "echo", "apps"),
                route: route(),
            }
        }

        fn record(&self) -> RequestRecord<'_> {
            RequestRecord {
                source: &self.source,
                destination: Some(&self.destination),
                service: &self.service,
                protocol: RequestProtocol::Http,
                response_code: 200,
                grpc_status: None,
                response_flags: response_flags::NONE,
                duration: Duration::from_micros(12_700),
                request_bytes: 5,
                response_bytes: 1234,
            }
        }

        fn entry<'a>(&'a self, record: &'a RequestRecord<'a>) -> AccessEntry<'a> {
            AccessEntry {
                record,
                method: &Method::POST,
                path: "/api/items?token=secret",
                version: Version::HTTP_2,
                authority: "echo.apps.svc.cluster.local:8080",
                upstream: Some("10.1.2.3:8080".parse().unwrap()),
                route: Some(&self.route),
                request_id: Some("7f9c0a52-3a4e-4d1b-9a51-7c0e3b2f1a10"),
                user_agent: Some("curl/8.5.0"),
            }
        }
    }

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_request_logs_one_line_with_envoys_fields() {
        let fx = Fixture::new();
        let record = fx.record();
        let events = captured(false, || log_request(&fx.entry(&record)));
        let want = fields(&[
            ("target", "access"),
            ("level", "INFO"),
            ("message", "request complete"),
            ("method", "POST"),
            ("path", "/api/items"),
            ("protocol", "HTTP/2"),
            ("response_code", "200"),
            ("grpc_status", "-"),
            ("response_flags", "-"),
            ("bytes_received", "5"),
            ("bytes_sent", "1234"),
            ("duration", "12ms"),
            ("upstream_host", "10.1.2.3:8080"),
            ("route_name", "apps/echo-split"),
            ("authority", "echo.apps.svc.cluster.local:8080"),
            ("user_agent", "curl/8.5.0"),
            ("x_request_id", "7f9c0a52-3a4e-4d1b-9a51-7c0e3b2f1a10"),
            ("src.identity", "spiffe://cluster.local/ns/client-ns/sa/client"),
            ("src.workload", "unknown"),
            ("src.namespace", "client-ns"),
            ("dst.service", "echo.apps.svc.cluster.local"),
            ("dst.workload", "echo-v1"),
        ]);
        assert_eq!(events, [want]);
        assert!(!format!("{events:?}").contains("secret"), "the query stays out of the log");
    }

    #[test]
    fn what_is_not_known_shows_a_dash() {
        let fx = Fixture::new();
        let record = RequestRecord {
            destination: None,
            protocol: RequestProtocol::Grpc,
            grpc_status: Some(14),
            response_code: 503,
            response_flags: response_flags::NO_HEALTHY_UPSTREAM,
            ..fx.record()
        };
        let entry = AccessEntry {
            upstream: None,
            route: None,
            request_id: None,
            user_agent: None,
            version: Version::HTTP_11,
            path: "/",
            ..fx.entry(&record)
        };
        let events = captured(false, || log_request(&entry));
        assert_eq!(events.len(), 1);
        let e = &events[0];
        for (k, v) in [
            ("upstream_host", "-"),
            ("route_name", "-"),
            ("x_request_id", "-"),
            ("user_agent", "-"),
            ("dst.workload", "-"),
            ("grpc_status", "14"),
            ("response_code", "503"),
            ("response_flags", "UH"),
            ("protocol", "HTTP/1.1"),
            ("path", "/"),
        ] {
            assert_eq!(e.get(k).map(String::as_str), Some(v), "{k} in {e:?}");
        }
    }

    #[test]
    fn a_tcp_connection_logs_the_upstream_its_route_chose() {
        let fx = Fixture::new();
        let target = ServiceTarget {
            hostname: "echo-v2.apps.svc.cluster.local".into(),
            namespace: "apps".into(),
            port: 9000,
            policy: None,
        };
        let entry = ConnectionEntry {
            source: &fx.source,
            service: &fx.service,
            upstream_cluster: Some(&target),
            upstream: Some("10.1.2.4:8080".parse().unwrap()),
            destination: Some(&fx.destination),
            route: Some("apps/echo-tcp"),
            response_flags: response_flags::NONE,
            bytes_received: 40,
            bytes_sent: 300,
            duration: Duration::from_millis(3),
        };
        let events = captured(false, || AccessLog::new(true).log_connection(&entry));
        assert_eq!(events.len(), 1);
        let e = &events[0];
        for (k, v) in [
            ("target", "access"),
            ("message", "connection complete"),
            ("protocol", "TCP"),
            ("upstream_host", "10.1.2.4:8080"),
            ("upstream_cluster", "outbound|9000||echo-v2.apps.svc.cluster.local"),
            ("route_name", "apps/echo-tcp"),
            ("dst.service", "echo.apps.svc.cluster.local"),
            ("dst.workload", "echo-v1"),
            ("bytes_received", "40"),
            ("bytes_sent", "300"),
        ] {
            assert_eq!(e.get(k).map(String::as_str), Some(v), "{k} in {e:?}");
        }
    }

    #[test]
    fn the_switch_and_the_filter_turn_it_off() {
        let fx = Fixture::new();
        let record = fx.record();
        let entry = fx.entry(&record);
        assert!(captured(false, || AccessLog::new(false).log(&entry)).is_empty());
        assert_eq!(captured(false, || AccessLog::new(true).log(&entry)).len(), 1);
        assert!(captured(true, || AccessLog::new(true).log(&entry)).is_empty(), "access=warn");
        let mut enabled = Vec::new();
        for (quiet, on) in [(false, true), (false, false), (true, true)] {
            captured(quiet, || enabled.push(AccessLog::new(on).is_enabled()));
        }
        assert_eq!(enabled, [true, false, false]);
    }
}
