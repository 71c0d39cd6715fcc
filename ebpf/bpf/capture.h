/* Maps and their key/value layouts, shared by Ambit's capture programs and,
 * through src/layout.rs (checked against this file by a test), by Rust.
 *
 * Every program filters by the network namespace's cookie: only namespaces
 * the node agent put in `ambit_enrolled` are captured, whatever cgroup their
 * processes sit in. */
#ifndef AMBIT_CAPTURE_H
#define AMBIT_CAPTURE_H

#include <linux/types.h>

/* What capture needs to know of an enrolled pod's namespace. */
struct ambit_netns_config {
	__u32 ztunnel_mark;  /* SO_MARK on ztunnel's sockets: never redirected */
	__u32 return_mark;   /* put on ztunnel's spoofed-source sockets: the app's
	                        replies (tcp_fwmark_accept) route back to ztunnel */
	__u32 pod_ip4;       /* network order; 0: none. Outbound goes to
	                        pod_ip4:outbound_port, so ztunnel sees the pod's IP */
	__u32 pod_ip6[4];    /* network order; all zero: none */
	__u16 outbound_port; /* ztunnel's in-pod outbound listener (15001) */
	__u16 pad;
};

/* A destination before redirection. */
struct ambit_orig_dst {
	__u32 addr[4]; /* network order; IPv4 in addr[0] */
	__u16 port;    /* network order */
	__u16 family;  /* AF_INET or AF_INET6 */
};

/* The application's end of a redirected connection, as ztunnel's accepted
 * socket sees its peer. */
struct ambit_tuple_key {
	__u64 netns_cookie;
	__u32 addr[4]; /* network order; IPv4 in addr[0] */
	__u32 port;    /* host order */
	__u32 family;
};

/* A connection ztunnel opens to the application from a client's address
 * (spoofed, so the application sees the real client): the inbound program
 * must let it reach the application, not steer it back to ztunnel. */
struct ambit_flow_key {
	__u32 client[4];   /* network order; IPv4 in [0] */
	__u32 server[4];   /* network order; IPv4 in [0] */
	__u32 client_port; /* host order */
	__u32 server_port; /* host order */
};

/* The inbound (sk_lookup) program's settings, one per pod namespace. */
#define AMBIT_MAX_EXCLUDED_PORTS 16
struct ambit_inbound_config {
	__u32 probe_source4;    /* network order; 0: none */
	__u32 probe_source6[4]; /* network order; all zero: none */
	__u16 hbone_port;       /* left to the kernel's own lookup (ztunnel listens on it) */
	__u16 excluded_count;
	__u16 excluded_ports[AMBIT_MAX_EXCLUDED_PORTS]; /* host order */
};

#ifdef __BPF__
/* The few libc constants the programs use (libc's headers are not for the
 * BPF target). */
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOL_SOCKET 1
#define SO_MARK 36
#define SOL_IP 0
#define SOL_IPV6 41
#define AMBIT_SO_ORIGINAL_DST 80 /* SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST */
#endif

#ifdef AMBIT_NODE_MAPS
#include <bpf/bpf_helpers.h>

/* Shared by the objects through their pins (by name, under the loader's map
 * directory): each object that includes them with AMBIT_NODE_MAPS defined
 * opens the same maps. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64); /* network namespace cookie */
	__type(value, struct ambit_netns_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ambit_enrolled SEC(".maps");

/* Redirected connections not yet established, by socket cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct ambit_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ambit_orig_by_cookie SEC(".maps");

/* Established redirected connections, by the application's address. An entry
 * is overwritten when its address is reused, always before ztunnel can ask. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ambit_tuple_key);
	__type(value, struct ambit_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ambit_orig_by_tuple SEC(".maps");

/* ztunnel's connections to applications, filed by sockops before their SYN
 * is sent, read by the inbound program. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ambit_flow_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ambit_ztunnel_flows SEC(".maps");
#endif

#endif
