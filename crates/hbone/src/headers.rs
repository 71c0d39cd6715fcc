//! The headers Istio's ztunnel puts on HBONE `CONNECT` requests and their
//! responses: `forwarded` (the client's address and the service it
//! addressed), `baggage` (who the workload on each side is, for telemetry)
//! and `traceparent` (a W3C trace id per connection).
//!
//! They only label telemetry: identity comes from the peer's certificate,
//! never from a header. Malformed ones are ignored with a debug log.

use std::fmt::Write;
use std::net::SocketAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue, FORWARDED};
use tracing::debug;

/// Who a workload is, in the terms baggage uses; empty strings are unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BaggageWorkload<'a> {
    pub cluster_id: &'a str,
    pub namespace: &'a str,
    /// Istio's lower-case workload type (`deployment`, `cronjob`, `pod`,
    /// `job`): names the key `k8s.<type>.name`.
    pub workload_type: &'a str,
    /// The owning workload's name (e.g. the Deployment's).
    pub workload_name: &'a str,
    pub canonical_name: &'a str,
    pub canonical_revision: &'a str,
}

/// The `baggage` header (W3C Baggage, OpenTelemetry keys).
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// The `traceparent` header (W3C Trace Context).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

// A header longer than this is not one Istio's ztunnel writes; ignored.
const MAX_HEADER_LEN: usize = 4096;

/// What a `baggage` header says about a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster_id: Option<String>,
    pub namespace: Option<String>,
    /// `k8s.<type>.name`: the owning workload (Deployment, Job, …).
    pub workload_name: Option<String>,
    /// `service.name`: the canonical service.
    pub service_name: Option<String>,
    /// `service.version`: the canonical revision.
    pub revision: Option<String>,
}

// The workload-name keys Istio reads (one per workload type).
const WORKLOAD_NAME_KEYS: [&str; 4] = ["k8s.deployment.name", "k8s.cronjob.name", "k8s.pod.name", "k8s.job.name"];

/// The request's `baggage`, as Istio's ztunnel writes it for the source:
/// every key, empty when unknown (Ambit has no locality, so the cloud keys
/// are always empty).
pub fn request_baggage(w: &BaggageWorkload<'_>) -> Option<HeaderValue> {
    let value = format!(
        "k8s.cluster.name={},k8s.namespace.name={},k8s.{}.name={},service.name={},service.version={},\
         cloud.region=,cloud.availability_zone=",
        w.cluster_id, w.namespace, w.workload_type, w.workload_name, w.canonical_name, w.canonical_revision,
    );
    header_value(value, "baggage")
}

/// The response's `baggage` for the destination: only the keys with a value,
/// as Istio's ztunnel replies.
pub fn response_baggage(w: &BaggageWorkload<'_>) -> Option<HeaderValue> {
    let mut value = String::new();
    let workload_key = format!("k8s.{}.name", w.workload_type);
    let pairs = [
        ("k8s.cluster.name", w.cluster_id),
        ("k8s.namespace.name", w.namespace),
        (workload_key.as_str(), w.workload_name),
        ("service.name", w.canonical_name),
        ("service.version", w.canonical_revision),
    ];
    for (k, v) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        let sep = if value.is_empty() { "" } else { "," };
        let _ = write!(value, "{sep}{k}={v}");
    }
    header_value(value, "baggage")
}

/// Reads the `baggage` headers (several are concatenated). `None` when there
/// is none, or when one is malformed (logged at debug): a list entry without
/// `=`, or a value with characters no Kubernetes name has.
pub fn parse_baggage(headers: &HeaderMap) -> Option<Baggage> {
    let mut b = Baggage::default();
    let mut any = false;
    for hv in headers.get_all(BAGGAGE) {
        any = true;
        if let Err(why) = parse_baggage_into(hv, &mut b) {
            debug!(header = ?hv, why, "ignoring malformed baggage header");
            return None;
        }
    }
    any.then_some(b)
}

fn parse_baggage_into(hv: &HeaderValue, b: &mut Baggage) -> Result<(), &'static str> {
    if hv.len() > MAX_HEADER_LEN {
        return Err("too long");
    }
    let s = hv.to_str().map_err(|_| "not visible ascii")?;
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        // W3C baggage allows `;properties` after a value; Istio writes none.
        let member = entry.split(';').next().unwrap_or_default();
        let (k, v) = member.split_once('=').ok_or("entry without '='")?;
        let (k, v) = (k.trim(), v.trim());
        if !v.bytes().all(|c| c.is_ascii_alphanumeric() || b"-._/:+@~".contains(&c)) {
            return Err("value with characters outside a name");
        }
        let v = (!v.is_empty()).then(|| v.to_owned());
        match k {
            "k8s.cluster.name" => b.cluster_id = v,
            "k8s.namespace.name" => b.namespace = v,
            "service.name" => b.service_name = v,
            "service.version" => b.revision = v,
            k if WORKLOAD_NAME_KEYS.contains(&k) => b.workload_name = v,
            _ => {}
        }
    }
    Ok(())
}

/// `forwarded: for="<ip:port>"[;host=<service hostname>]`, as Istio's
/// ztunnel sends it: the client's address, and the service it addressed.
pub fn forwarded(client: SocketAddr, service_host: Option<&str>) -> Option<HeaderValue> {
    let value = match service_host {
        Some(host) => format!("for=\"{client}\";host={host}"),
        None => format!("for=\"{client}\""),
    };
    header_value(value, "forwarded")
}

/// The `host` parameter of the first `forwarded` element: the service the
/// client addressed. `None` when absent or malformed (logged at debug).
pub fn forwarded_host(headers: &HeaderMap) -> Option<String> {
    let hv = headers.get(FORWARDED)?;
    let host = hv.to_str().ok().filter(|_| hv.len() <= MAX_HEADER_LEN).and_then(|s| {
        let first = s.split(',').next()?;
        let mut host = None;
        for pair in first.split(';') {
            let (k, v) = pair.trim().split_once('=')?;
            if k.trim().eq_ignore_ascii_case("host") {
                host = Some(v.trim().trim_matches('"'));
            }
        }
        Some(host)
    });
    match host {
        Some(Some(h)) if is_hostname(h) => Some(h.to_owned()),
        Some(None) => None,
        _ => {
            debug!(header = ?hv, "ignoring malformed forwarded header");
            None
        }
    }
}

fn is_hostname(h: &str) -> bool {
    !h.is_empty() && h.len() <= 253 && h.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
}

/// A W3C `traceparent`: version 00, a random trace and parent id, no flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_id: u64,
}

impl TraceParent {
    /// A fresh trace id for a new connection.
    pub fn new() -> Self {
        // W3C: all-zero ids are invalid.
        TraceParent { trace_id: rand::random::<u128>().max(1), parent_id: rand::random::<u64>().max(1) }
    }

    pub fn header(&self) -> HeaderValue {
        let v = format!("00-{:032x}-{:016x}-00", self.trace_id, self.parent_id);
        HeaderValue::try_from(v).expect("bug: hex is a valid header value")
    }

    /// The request's trace, if it carries a well-formed one (else logged at debug).
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let hv = headers.get(TRACEPARENT)?;
        let parsed = hv.to_str().ok().and_then(|s| {
            let mut parts = s.split('-');
            let (v, t, p, f) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
            if parts.next().is_some() || !(hex(v, 2) && hex(t, 32) && hex(p, 16) && hex(f, 2)) || v == "ff" {
                return None;
            }
            let tp = TraceParent {
                trace_id: u128::from_str_radix(t, 16).ok()?,
                parent_id: u64::from_str_radix(p, 16).ok()?,
            };
            (tp.trace_id != 0 && tp.parent_id != 0).then_some(tp)
        });
        if parsed.is_none() {
            debug!(header = ?hv, "ignoring malformed traceparent header");
        }
        parsed
    }
}

impl Default for TraceParent {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.trace_id)
    }
}

fn header_value(value: String, what: &str) -> Option<HeaderValue> {
    match HeaderValue::try_from(value) {
        Ok(v) => Some(v),
        Err(_) => {
            debug!(what, "state values do not make a valid header; not sent");
            None
        }
    }
}

/// The request headers of one outbound tunnel (built once per connection).
pub fn connect_headers(
    source: Option<BaggageWorkload<'_>>,
    client: SocketAddr,
    service_host: Option<&str>,
    trace: TraceParent,
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(3);
    if let Some(v) = source.as_ref().and_then(request_baggage) {
        h.insert(BAGGAGE, v);
    }
    if let Some(v) = forwarded(client, service_host) {
        h.insert(FORWARDED, v);
    }
    h.insert(TRACEPARENT, trace.header());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> BaggageWorkload<'static> {
        BaggageWorkload {
            namespace: "shop",
            workload_name: "web",
            workload_type: "deployment",
            canonical_name: "web-app",
            canonical_revision: "v2",
            cluster_id: "Kubernetes",
        }
    }

    fn headers(name: HeaderName, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn request_baggage_is_istios_form_and_reads_back() {
        let v = request_baggage(&web()).unwrap();
        assert_eq!(
            v,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=web,service.name=web-app,\
             service.version=v2,cloud.region=,cloud.availability_zone="
        );
        let b = parse_baggage(&headers(BAGGAGE, &[v.to_str().unwrap()])).unwrap();
        let want = Baggage {
            cluster_id: Some("Kubernetes".into()),
            namespace: Some("shop".into()),
            workload_name: Some("web".into()),
            service_name: Some("web-app".into()),
            revision: Some("v2".into()),
        };
        assert_eq!(b, want);
    }

    #[test]
    fn response_baggage_carries_only_known_keys() {
        let w = BaggageWorkload { canonical_revision: "", cluster_id: "", ..web() };
        assert_eq!(
            response_baggage(&w).unwrap(),
            "k8s.namespace.name=shop,k8s.deployment.name=web,service.name=web-app"
        );
        let pod = BaggageWorkload { workload_type: "pod", ..web() };
        assert!(response_baggage(&pod).unwrap().to_str().unwrap().contains("k8s.pod.name=web"));
    }

    #[test]
    fn baggage_across_several_headers_with_empty_values_and_unknown_keys() {
        let h = headers(BAGGAGE, &["k8s.cluster.name=", "k8s.job.name=batch;prop=1", "other.key=x,service.name=b"]);
        let b = parse_baggage(&h).unwrap();
        assert_eq!(b.cluster_id, None);
        assert_eq!(b.workload_name.as_deref(), Some("batch"));
        assert_eq!(b.service_name.as_deref(), Some("b"));
        assert_eq!(parse_baggage(&HeaderMap::new()), None);
    }

    #[test]
    fn malformed_baggage_is_ignored_whole() {
        for bad in ["k8s.namespace.name", "service.name=a b", "service.name=\"x\"", "service.name=a{b}"] {
            assert_eq!(parse_baggage(&headers(BAGGAGE, &["k8s.namespace.name=ok", bad])), None, "{bad}");
        }
        let mut h = HeaderMap::new();
        h.insert(BAGGAGE, HeaderValue::from_bytes(b"service.name=\xff").unwrap());
        assert_eq!(parse_baggage(&h), None);
        let long = format!("service.name={}", "a".repeat(MAX_HEADER_LEN));
        assert_eq!(parse_baggage(&headers(BAGGAGE, &[&long])), None);
    }

    #[test]
    fn forwarded_is_istios_form_and_its_host_reads_back() {
        let client: SocketAddr = "10.1.0.2:40000".parse().unwrap();
        let with = forwarded(client, Some("echo.default.svc.cluster.local")).unwrap();
        assert_eq!(with, "for=\"10.1.0.2:40000\";host=echo.default.svc.cluster.local");
        let h = headers(FORWARDED, &[with.to_str().unwrap()]);
        assert_eq!(forwarded_host(&h).as_deref(), Some("echo.default.svc.cluster.local"));
        let without = forwarded("[fd00::2]:1".parse().unwrap(), None).unwrap();
        assert_eq!(without, "for=\"[fd00::2]:1\"");
        assert_eq!(forwarded_host(&headers(FORWARDED, &[without.to_str().unwrap()])), None);
        // Only the first element counts, and a quoted host is accepted.
        let h = headers(FORWARDED, &["for=a;host=\"x.y\", for=b;host=z"]);
        assert_eq!(forwarded_host(&h).as_deref(), Some("x.y"));
    }

    #[test]
    fn malformed_forwarded_is_ignored() {
        for bad in ["for", "host=", "host=a/b", "for=x;host=a b", "host=a_b"] {
            assert_eq!(forwarded_host(&headers(FORWARDED, &[bad])), None, "{bad}");
        }
    }

    #[test]
    fn traceparent_round_trips_and_rejects_malformed() {
        let t = TraceParent::new();
        assert_ne!(t, TraceParent::new(), "fresh per connection");
        let v = t.header();
        assert_eq!(v.len(), 55);
        assert!(v.to_str().unwrap().starts_with("00-") && v.to_str().unwrap().ends_with("-00"));
        assert_eq!(TraceParent::from_headers(&headers(TRACEPARENT, &[v.to_str().unwrap()])), Some(t));
        for bad in [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
        ] {
            assert_eq!(TraceParent::from_headers(&headers(TRACEPARENT, &[bad])), None, "{bad}");
        }
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(TraceParent::from_headers(&headers(TRACEPARENT, &[good])).unwrap().to_string().len(), 32);
    }

    #[test]
    fn connect_headers_carry_all_three() {
        let client: SocketAddr = "10.1.0.2:40000".parse().unwrap();
        let h = connect_headers(Some(web()), client, Some("echo.default.svc.cluster.local"), TraceParent::new());
        assert!(h.contains_key(BAGGAGE) && h.contains_key(FORWARDED) && h.contains_key(TRACEPARENT));
        let h = connect_headers(None, client, None, TraceParent::new());
        assert!(!h.contains_key(BAGGAGE) && h.contains_key(FORWARDED));
    }
}
