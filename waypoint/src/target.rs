//! Where a request can be sent: a service of the mesh, by its address key.

use std::fmt;

/// A Service backend. `namespace/hostname` is the key of the service's
/// `istio.workload.Address`, through which the forwarding code finds its
/// endpoints; `port` is the service port to call.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceTarget {
    /// `<name>.<namespace>.svc.<domain suffix>`.
    pub hostname: String,
    pub namespace: String,
    pub port: u16,
}

impl fmt::Display for ServiceTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.hostname, self.port)
    }
}
