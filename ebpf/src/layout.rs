//! The structs of `bpf/capture.h`, as Rust sees them; a test checks every
//! size and offset against what the C compiler makes of the header.

use std::net::{Ipv4Addr, Ipv6Addr};

/// `struct ambit_netns_config`: an enrolled pod namespace, in the enrolled
/// map keyed by its cookie. Addresses are in network order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetnsConfig {
    /// ztunnel's socket mark: such sockets are never redirected.
    pub ztunnel_mark: u32,
    /// The mark ztunnel's spoofed-source sockets get, so the application's
    /// replies route back to ztunnel.
    pub return_mark: u32,
    /// The pod's IPv4 address (0: none).
    pub pod_ip4: u32,
    /// The pod's IPv6 address (zero: none).
    pub pod_ip6: [u32; 4],
    /// ztunnel's outbound listener port, host order.
    pub outbound_port: u16,
    /// [`SPLICE`] or zero.
    pub flags: u16,
}

/// [`NetnsConfig::flags`]: splice the pod's pod-local legs (`AMBIT_SPLICE`).
pub const SPLICE: u16 = 1;

/// `struct ambit_orig_dst`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network order; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    /// Network order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
}

/// `struct ambit_tuple_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TupleKey {
    /// The network namespace's cookie.
    pub netns_cookie: u64,
    /// Network order; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    /// Host order.
    pub port: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
}

/// `struct ambit_splice_key`: one end of a spliced pod-local connection, as
/// its own socket sees it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpliceKey {
    /// The network namespace's cookie.
    pub netns_cookie: u64,
    /// Network order; IPv4 in `[0]`.
    pub local: [u32; 4],
    /// Network order; IPv4 in `[0]`.
    pub remote: [u32; 4],
    /// Host order.
    pub local_port: u32,
    /// Host order.
    pub remote_port: u32,
}

/// `struct ambit_flow_key`: a connection ztunnel opens to an application as
/// a client.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowKey {
    /// Network order; IPv4 in `[0]`.
    pub client: [u32; 4],
    /// Network order; IPv4 in `[0]`.
    pub server: [u32; 4],
    /// Host order.
    pub client_port: u32,
    /// Host order.
    pub server_port: u32,
}

/// Ports the inbound program leaves to the application (`bpf/capture.h`).
pub const MAX_EXCLUDED_PORTS: usize = 16;

/// `struct ambit_inbound_config`: the inbound program's settings for one pod.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboundConfig {
    /// Network order; 0: none.
    pub probe_source4: u32,
    /// Network order; zero: none.
    pub probe_source6: [u32; 4],
    /// Host order.
    pub hbone_port: u16,
    /// How many of `excluded_ports` are used.
    pub excluded_count: u16,
    /// Host order.
    pub excluded_ports: [u16; MAX_EXCLUDED_PORTS],
}

// SAFETY: plain `repr(C)` data of integers, with explicit padding fields
// where C has padding, so every bit pattern is valid.
unsafe impl aya::Pod for NetnsConfig {}
// SAFETY: as above.
unsafe impl aya::Pod for OrigDst {}
// SAFETY: as above.
unsafe impl aya::Pod for TupleKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for SpliceKey {}
// SAFETY: as above.
unsafe impl aya::Pod for InboundConfig {}

/// An IPv4 address as the programs hold it (network order in memory).
pub fn ip4(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// An IPv6 address as the programs hold it.
pub fn ip6(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[allow(non_upper_case_globals)]
    mod c {
        include!(concat!(env!("OUT_DIR"), "/c_layout.rs"));
    }

    #[test]
    fn rust_structs_match_the_c_header() {
        assert_eq!(size_of::<NetnsConfig>(), c::SIZE_ambit_netns_config);
        assert_eq!(offset_of!(NetnsConfig, ztunnel_mark), c::OFF_ambit_netns_config_ztunnel_mark);
        assert_eq!(offset_of!(NetnsConfig, return_mark), c::OFF_ambit_netns_config_return_mark);
        assert_eq!(offset_of!(NetnsConfig, pod_ip4), c::OFF_ambit_netns_config_pod_ip4);
        assert_eq!(offset_of!(NetnsConfig, pod_ip6), c::OFF_ambit_netns_config_pod_ip6);
        assert_eq!(offset_of!(NetnsConfig, outbound_port), c::OFF_ambit_netns_config_outbound_port);
        assert_eq!(offset_of!(NetnsConfig, flags), c::OFF_ambit_netns_config_flags);
        assert_eq!(SPLICE, c::AMBIT_SPLICE);

        assert_eq!(size_of::<OrigDst>(), c::SIZE_ambit_orig_dst);
        assert_eq!(offset_of!(OrigDst, addr), c::OFF_ambit_orig_dst_addr);
        assert_eq!(offset_of!(OrigDst, port), c::OFF_ambit_orig_dst_port);
        assert_eq!(offset_of!(OrigDst, family), c::OFF_ambit_orig_dst_family);

        assert_eq!(size_of::<TupleKey>(), c::SIZE_ambit_tuple_key);
        assert_eq!(offset_of!(TupleKey, netns_cookie), c::OFF_ambit_tuple_key_netns_cookie);
        assert_eq!(offset_of!(TupleKey, addr), c::OFF_ambit_tuple_key_addr);
        assert_eq!(offset_of!(TupleKey, port), c::OFF_ambit_tuple_key_port);
        assert_eq!(offset_of!(TupleKey, family), c::OFF_ambit_tuple_key_family);

        assert_eq!(size_of::<FlowKey>(), c::SIZE_ambit_flow_key);
        assert_eq!(offset_of!(FlowKey, client), c::OFF_ambit_flow_key_client);
        assert_eq!(offset_of!(FlowKey, server), c::OFF_ambit_flow_key_server);
        assert_eq!(offset_of!(FlowKey, client_port), c::OFF_ambit_flow_key_client_port);
        assert_eq!(offset_of!(FlowKey, server_port), c::OFF_ambit_flow_key_server_port);

        assert_eq!(size_of::<SpliceKey>(), c::SIZE_ambit_splice_key);
        assert_eq!(offset_of!(SpliceKey, netns_cookie), c::OFF_ambit_splice_key_netns_cookie);
        assert_eq!(offset_of!(SpliceKey, local), c::OFF_ambit_splice_key_local);
        assert_eq!(offset_of!(SpliceKey, remote), c::OFF_ambit_splice_key_remote);
        assert_eq!(offset_of!(SpliceKey, local_port), c::OFF_ambit_splice_key_local_port);
        assert_eq!(offset_of!(SpliceKey, remote_port), c::OFF_ambit_splice_key_remote_port);

        assert_eq!(size_of::<InboundConfig>(), c::SIZE_ambit_inbound_config);
        assert_eq!(offset_of!(InboundConfig, probe_source4), c::OFF_ambit_inbound_config_probe_source4);
        assert_eq!(offset_of!(InboundConfig, probe_source6), c::OFF_ambit_inbound_config_probe_source6);
        assert_eq!(offset_of!(InboundConfig, hbone_port), c::OFF_ambit_inbound_config_hbone_port);
        assert_eq!(offset_of!(InboundConfig, excluded_count), c::OFF_ambit_inbound_config_excluded_count);
        assert_eq!(offset_of!(InboundConfig, excluded_ports), c::OFF_ambit_inbound_config_excluded_ports);
        assert_eq!(MAX_EXCLUDED_PORTS, c::MAX_EXCLUDED_PORTS);
    }

    #[test]
    fn addresses_are_held_in_network_order() {
        assert_eq!(ip4(Ipv4Addr::new(10, 0, 0, 1)).to_ne_bytes(), [10, 0, 0, 1]);
        let words = ip6("fd00::1:2".parse().unwrap());
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2]);
    }
}
