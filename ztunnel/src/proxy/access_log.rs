//! Access logs, as Istio's ztunnel writes them under the target `access`:
//! one line when a connection closes at info level (warn when it failed),
//! and one when it opens at debug level, with the fields Istio's ztunnel
//! logs (`src.addr`, `src.workload`, `src.namespace`, `src.identity`,
//! `dst.addr`, `dst.hbone_addr` (through a waypoint: `dst.addr` is the
//! waypoint's, this the original destination), `dst.service`,
//! `dst.workload`, `dst.namespace`, `dst.identity`, `direction`,
//! `bytes_sent`, `bytes_recv`, `duration`, `error`). Plain or JSON follows `--log-format`; `--access-log false` turns
//! them off, and so does the filter `access=warn`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::metrics::{ConnectionLabels, FailureReason, Reporter};

/// Where a connection goes, as an access log names it.
#[derive(Clone, Copy, Debug)]
pub struct Ends {
    /// The client's address.
    pub src: SocketAddr,
    /// The address the client wanted (the original destination or HBONE target),
    /// or the waypoint's HBONE address when the connection goes through one.
    pub dst: SocketAddr,
    /// Through a waypoint: the CONNECT authority sent to it (the original destination).
    pub hbone_addr: Option<SocketAddr>,
}

impl Ends {
    /// These ends, with the CONNECT authority sent to a waypoint at `dst`.
    pub fn with_hbone_addr(self, hbone_addr: SocketAddr) -> Self {
        Ends { hbone_addr: Some(hbone_addr), ..self }
    }
}

/// The access log of one connection.
pub(super) struct AccessLog {
    ends: Ends,
    start: Instant,
}

impl AccessLog {
    /// Logs the opening (debug, as Istio's ztunnel: at info a connection
    /// costs one line), returning what the closing line needs.
    pub(super) fn open(ends: Ends, labels: &ConnectionLabels) -> Self {
        let l = labels;
        debug!(
            target: "access",
            direction = direction(l.reporter), "src.addr" = %ends.src, "src.workload" = l.source_workload.as_str(), "src.namespace" = l.source_workload_namespace.as_str(),
            "src.identity" = l.source_principal.as_str(), "dst.addr" = %ends.dst, "dst.hbone_addr" = ends.hbone_addr.map(tracing::field::display), "dst.service" = l.destination_service.as_str(),
            "dst.workload" = l.destination_workload.as_str(), "dst.namespace" = l.destination_workload_namespace.as_str(),
            "dst.identity" = l.destination_principal.as_str(),
            "connection opened"
        );
        AccessLog { ends, start: Instant::now() }
    }

    /// Logs the close: bytes each way (`sent` toward the destination), how
    /// long it lasted, and why it failed, if it did (then at warn level).
    pub(super) fn close(&self, labels: &ConnectionLabels, sent: u64, received: u64, error: Option<FailureReason>) {
        let (l, ends) = (labels, self.ends);
        let duration = Millis(self.start.elapsed());
        macro_rules! complete {
            ($level:ident, $($error:tt)*) => {
                $level!(
                    target: "access",
                    direction = direction(l.reporter), "src.addr" = %ends.src, "src.workload" = l.source_workload.as_str(),
                    "src.namespace" = l.source_workload_namespace.as_str(), "src.identity" = l.source_principal.as_str(),
                    "dst.addr" = %ends.dst, "dst.hbone_addr" = ends.hbone_addr.map(tracing::field::display), "dst.service" = l.destination_service.as_str(),
                    "dst.workload" = l.destination_workload.as_str(),
                    "dst.namespace" = l.destination_workload_namespace.as_str(),
                    "dst.identity" = l.destination_principal.as_str(),
                    bytes_sent = sent, bytes_recv = received, duration = %duration, $($error)*
                    "connection complete"
                )
            };
        }
        match error {
            None => complete!(info,),
            Some(e) => complete!(warn, error = ?e,),
        }
    }
}

fn direction(r: Reporter) -> &'static str {
    match r {
        Reporter::source => "outbound",
        Reporter::destination => "inbound",
    }
}

/// A duration as Istio's ztunnel prints it: whole milliseconds, `12ms`.
struct Millis(Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}
