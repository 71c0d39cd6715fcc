//! Certificates from the controller's CA service: the client is shared with
//! the waypoint (`ambit-xds-client`); ztunnel names its node in every request
//! ([`CaClient::with_node`]) besides proving it with its token.

pub use ambit_xds_client::ca::{connect_channel, tls_endpoint, CaClient, CaClientError, NODE_METADATA_KEY};
