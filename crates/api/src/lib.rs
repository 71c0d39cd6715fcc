//! Ambit's protobuf API. Package and message names and field numbers follow
//! the published Istio and envoy interfaces, so that peers implementing them
//! interoperate with Ambit.

/// `istio.workload`: workloads and services (xDS type `istio.workload.Address`).
// Generated code: `Address` holds a workload or a service by value, as prost
// generates every oneof.
#[allow(clippy::large_enum_variant)]
pub mod workload {
    tonic::include_proto!("istio.workload");

    /// The ZDS node-local protocol (`istio.workload.zds`).
    pub mod zds {
        tonic::include_proto!("istio.workload.zds");
    }
}

/// `istio.security`: L4 authorization (xDS type `istio.security.Authorization`).
pub mod security {
    tonic::include_proto!("istio.security");
}

/// `envoy.service.discovery.v3`: the delta ADS transport.
pub mod discovery {
    tonic::include_proto!("envoy.service.discovery.v3");
}

/// `istio.v1.auth`: the certificate service.
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

/// `ambit.waypoint.v1`: the L7 configuration of a waypoint (routes and
/// authorization policies), Ambit's own package.
#[allow(clippy::large_enum_variant)]
pub mod waypoint {
    tonic::include_proto!("ambit.waypoint.v1");
}

/// xDS type URL of workloads and services.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// xDS type URL of L4 authorization policies.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

/// xDS type URL of a waypoint's per-service routes.
pub const SERVICE_ROUTES_TYPE_URL: &str = "type.googleapis.com/ambit.waypoint.v1.ServiceRoutes";
/// xDS type URL of a waypoint's L7 authorization policies.
pub const WAYPOINT_POLICY_TYPE_URL: &str = "type.googleapis.com/ambit.waypoint.v1.AuthorizationPolicy";

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn zds_add_workload_uses_published_field_numbers() {
        let req = workload::zds::WorkloadRequest {
            payload: Some(workload::zds::workload_request::Payload::Add(workload::zds::AddWorkload {
                uid: "u".into(),
                workload_info: None,
            })),
        };
        // field 1 (add), length-delimited; inside: field 1 (uid) "u".
        assert_eq!(req.encode_to_vec(), vec![0x0a, 0x03, 0x0a, 0x01, b'u']);
    }

    #[test]
    fn ca_request_validity_is_field_three() {
        let req = ca::IstioCertificateRequest { csr: String::new(), validity_duration: 1, metadata: None };
        assert_eq!(req.encode_to_vec(), vec![0x18, 0x01]);
    }

    #[test]
    fn ca_request_metadata_is_field_four_as_istios() {
        let metadata = prost_types::Struct::default();
        let req = ca::IstioCertificateRequest { csr: String::new(), validity_duration: 0, metadata: Some(metadata) };
        // field 4, wire type 2 -> tag (4 << 3) | 2 = 0x22, empty message.
        assert_eq!(req.encode_to_vec(), vec![0x22, 0x00]);
    }

    #[test]
    fn waypoint_types_have_their_documented_numbers_and_names() {
        use waypoint::{backend, Backend, ServiceRoutes};
        let r = ServiceRoutes { hostname: "h".into(), ..Default::default() };
        assert_eq!(r.encode_to_vec(), vec![0x0a, 0x01, b'h']);
        // Backend.invalid is field 2 of the oneof; weight field 3.
        let b = Backend { kind: Some(backend::Kind::Invalid("x".into())), weight: 1, filters: vec![] };
        assert_eq!(b.encode_to_vec(), vec![0x12, 0x01, b'x', 0x18, 0x01]);
        assert!(SERVICE_ROUTES_TYPE_URL.ends_with("ambit.waypoint.v1.ServiceRoutes"));
        assert!(WAYPOINT_POLICY_TYPE_URL.ends_with("ambit.waypoint.v1.AuthorizationPolicy"));
    }

    #[test]
    fn workload_uid_is_field_twenty() {
        let w = workload::Workload { uid: "x".into(), ..Default::default() };
        // field 20, wire type 2 -> tag (20 << 3) | 2 = 162 = 0xa2 0x01
        assert_eq!(w.encode_to_vec(), vec![0xa2, 0x01, 0x01, b'x']);
    }
}
