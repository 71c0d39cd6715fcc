//! Where a request can be sent: a service of the mesh, by its address key, or a subset of its endpoints, and how
//! one of its endpoints is chosen (DestinationRule subsets and load balancer).

use std::fmt;
use std::sync::Arc;

use crate::circuit::ConnectionPool;
use crate::lb::LoadBalancer;
use crate::outlier::OutlierConfig;

/// A Service backend. `namespace/hostname` is the key of the service's
/// `istio.workload.Address`, through which the forwarding code finds its
/// endpoints; `port` is the service port to call.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceTarget {
    /// `<name>.<namespace>.svc.<domain suffix>`.
    pub hostname: String,
    pub namespace: String,
    pub port: u16,
    /// What a DestinationRule says of this backend; `None`: every endpoint, the default choice.
    pub policy: Option<Arc<TargetPolicy>>,
}

/// A DestinationRule's word on a backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TargetPolicy {
    /// Only these of the service's endpoints.
    pub subset: Option<Subset>,
    /// How an endpoint is chosen.
    pub lb: LoadBalancer,
    /// Ejection of failing endpoints.
    pub outlier: Option<OutlierConfig>,
    /// Circuit breakers and connection settings.
    pub pool: Option<ConnectionPool>,
}

/// A subset of a service's endpoints, as the controller resolved it from
/// the pods' labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Subset {
    pub name: String,
    /// Workload uids, sorted.
    workloads: Vec<String>,
}

impl Subset {
    pub fn new(name: String, mut workloads: Vec<String>) -> Self {
        workloads.sort_unstable();
        workloads.dedup();
        Subset { name, workloads }
    }

    /// Whether the workload `uid` is in the subset.
    pub fn contains(&self, uid: &str) -> bool {
        self.workloads.binary_search_by(|w| w.as_str().cmp(uid)).is_ok()
    }
}

impl ServiceTarget {
    /// Whether the endpoint of workload `uid` may take this target's requests.
    pub fn admits(&self, uid: &str) -> bool {
        self.policy.as_ref().and_then(|p| p.subset.as_ref()).is_none_or(|s| s.contains(uid))
    }

    /// The load balancer a DestinationRule sets, if any.
    pub fn lb(&self) -> Option<&LoadBalancer> {
        self.policy.as_ref().map(|p| &p.lb)
    }

    /// The outlier detection a DestinationRule sets, if any.
    pub fn outlier(&self) -> Option<&OutlierConfig> {
        self.policy.as_ref().and_then(|p| p.outlier.as_ref())
    }

    /// The connection pool a DestinationRule sets, if any.
    pub fn pool(&self) -> Option<&ConnectionPool> {
        self.policy.as_ref().and_then(|p| p.pool.as_ref())
    }
}

impl fmt::Display for ServiceTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.hostname, self.port)?;
        match self.policy.as_ref().and_then(|p| p.subset.as_ref()) {
            Some(s) => write!(f, " subset {}", s.name),
            None => Ok(()),
        }
    }
}
