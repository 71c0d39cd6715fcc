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
	__u16 flags;         /* AMBIT_SPLICE */
};

/* ambit_netns_config.flags: splice the pod-local legs (the application and
 * ztunnel in one pod) with the sockmap, so their bytes skip TCP/IP. */
#define AMBIT_SPLICE 1

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

/* One end of a pod-local connection, as its own socket sees it: the two
 * ends' keys mirror each other, so each finds its peer. */
struct ambit_splice_key {
	__u64 netns_cookie;
	__u32 local[4];    /* network order; IPv4 in [0] */
	__u32 remote[4];   /* network order; IPv4 in [0] */
	__u32 local_port;  /* host order */
	__u32 remote_port; /* host order */
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

/* Copies an address out of a program's context into `dst` (four words,
 * IPv4 in [0]). Context fields must be read at constant offsets: the reads
 * are volatile and unconditional (every family's field reads safely), so
 * the compiler cannot merge them into one load from a computed offset. */
#define AMBIT_CTX_READ(field) (*(volatile __u32 *)&(field))
#define AMBIT_COPY_ADDR(dst, family, ip4, ip6)                      \
	do {                                                        \
		int v4_ = (family) == AF_INET;                      \
		__u32 a4_ = AMBIT_CTX_READ(ip4);                    \
		__u32 a0_ = AMBIT_CTX_READ((ip6)[0]);               \
		__u32 a1_ = AMBIT_CTX_READ((ip6)[1]);               \
		__u32 a2_ = AMBIT_CTX_READ((ip6)[2]);               \
		__u32 a3_ = AMBIT_CTX_READ((ip6)[3]);               \
		(dst)[0] = v4_ ? a4_ : a0_;                         \
		(dst)[1] = v4_ ? 0 : a1_;                           \
		(dst)[2] = v4_ ? 0 : a2_;                           \
		(dst)[3] = v4_ ? 0 : a3_;                           \
	} while (0)

static __always_inline int ambit_same_addr(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}
#endif

#ifdef AMBIT_NODE_MAPS
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

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
 * is sent and removed when the connect() ends, read by the inbound program. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ambit_flow_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ambit_ztunnel_flows SEC(".maps");

/* Both ends of each spliced pod-local connection, filed by sockops once
 * established; the splice (sk_msg) program, attached to this map, hands
 * what one end sends straight to the other's receive queue. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct ambit_splice_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ambit_splice SEC(".maps");

/* The kernel's psock (a kernel address) of each socket in ambit_splice, by
 * the same key, filed by sockops and removed when the socket closes: the
 * splice program reads from it how much the peer has read and has queued. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ambit_splice_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ambit_splice_psock SEC(".maps");

/* The kernel's structs, as far as the splice programs read them; field
 * offsets are relocated against the running kernel's BTF at load (CO-RE). */
struct sock___ambit {
	void *sk_user_data; /* the psock, its low bits flags (SK_USER_DATA_PTRMASK) */
} __attribute__((preserve_access_index));
#define AMBIT_USER_DATA_FLAGS 7UL

struct sk_psock___ambit {
	struct sock___ambit *sk;
	__u32 msg_tot_len; /* bytes spliced to the socket, not yet read */
} __attribute__((preserve_access_index));

struct tcp_sock___ambit {
	__u32 write_seq;  /* what the application has written through TCP */
	__u32 copied_seq; /* what the application has read from TCP */
} __attribute__((preserve_access_index));

#endif

#endif
