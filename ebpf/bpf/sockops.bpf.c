/* Three jobs at three moments of a TCP connection's life in an enrolled pod:
 * - ztunnel connecting to an application as a client (its socket carries
 *   the return mark, see connect.h): the flow is filed before the SYN
 *   leaves, so the inbound program lets it through to the application, and
 *   forgotten when the connect() ends, established or failed;
 * - a redirected connection established: its original destination is filed
 *   under the application's address, which is what ztunnel's accepted socket
 *   sees as its peer (see getsockopt.bpf.c);
 * - either end of a pod-local leg established (the application and ztunnel
 *   in one pod, both ways), in a pod that splices: the socket goes into the
 *   splice map, keyed by its own view of the connection (see splice.bpf.c). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#define AMBIT_NODE_MAPS
#include "capture.h"

static __always_inline const struct ambit_netns_config *enrolled(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	return bpf_map_lookup_elem(&ambit_enrolled, &netns);
}

/* The connection as this socket sees it (the port sits in the upper half of
 * remote_port). */
static __always_inline void splice_key(struct bpf_sock_ops *skops, struct ambit_splice_key *key)
{
	key->netns_cookie = bpf_get_netns_cookie(skops);
	key->local_port = skops->local_port;
	key->remote_port = bpf_ntohl(skops->remote_port);
	AMBIT_COPY_ADDR(key->local, skops->family, skops->local_ip4, skops->local_ip6);
	AMBIT_COPY_ADDR(key->remote, skops->family, skops->remote_ip4, skops->remote_ip6);
}

/* The flow of ztunnel's connection to an application, as the inbound
 * program sees it. */
static __always_inline void ztunnel_flow_key(struct bpf_sock_ops *skops, struct ambit_flow_key *key)
{
	struct ambit_splice_key conn = {};
	splice_key(skops, &conn);
	__builtin_memcpy(key->client, conn.local, sizeof(key->client));
	__builtin_memcpy(key->server, conn.remote, sizeof(key->server));
	key->client_port = conn.local_port;
	key->server_port = conn.remote_port;
}

static __always_inline void file_ztunnel_flow(struct bpf_sock_ops *skops)
{
	const struct ambit_netns_config *cfg = enrolled(skops);
	struct bpf_sock *sk = skops->sk;
	if (!cfg || !sk || sk->mark != cfg->return_mark)
		return;
	struct ambit_flow_key key = {};
	ztunnel_flow_key(skops, &key);
	__u32 one = 1;
	if (bpf_map_update_elem(&ambit_ztunnel_flows, &key, &one, BPF_ANY))
		return;
	/* Told when the connect() ends (see on_state_change). */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void file_orig_dst(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct ambit_orig_dst *orig = bpf_map_lookup_elem(&ambit_orig_by_cookie, &cookie);
	if (!orig)
		return;
	struct ambit_tuple_key key = {};
	key.netns_cookie = bpf_get_netns_cookie(skops);
	key.family = skops->family;
	key.port = skops->local_port;
	AMBIT_COPY_ADDR(key.addr, skops->family, skops->local_ip4, skops->local_ip6);
	struct ambit_orig_dst value = *orig;
	bpf_map_update_elem(&ambit_orig_by_tuple, &key, &value, BPF_ANY);
	bpf_map_delete_elem(&ambit_orig_by_cookie, &cookie);
}

/* A pod-local leg: the application and ztunnel's outbound listener (both
 * ends at the pod's own address, one at the listener's port), or ztunnel
 * reaching the application as a client (its socket, and the application's
 * accepted one, carry the return mark). */
static __always_inline void file_splice(struct bpf_sock_ops *skops)
{
	const struct ambit_netns_config *cfg = enrolled(skops);
	struct bpf_sock *sk = skops->sk;
	if (!cfg || !(cfg->flags & AMBIT_SPLICE) || !sk)
		return;
	struct ambit_splice_key key = {};
	splice_key(skops, &key);
	int outbound_leg = ambit_same_addr(key.local, key.remote) &&
			   (key.local_port == cfg->outbound_port || key.remote_port == cfg->outbound_port);
	if (!outbound_leg && !(cfg->return_mark && sk->mark == cfg->return_mark))
		return;
	if (bpf_sock_hash_update(skops, &ambit_splice, &key, BPF_ANY))
		return;
	/* Spliced only with its psock filed, so that its peer can see how much
	 * it has not read (see splice.bpf.c); forgotten when it closes. */
	struct sock___ambit *s = (struct sock___ambit *)bpf_skc_to_tcp_sock(sk);
	__u64 psock = s ? (unsigned long)BPF_CORE_READ(s, sk_user_data) & ~AMBIT_USER_DATA_FLAGS : 0;
	if (!psock || bpf_map_update_elem(&ambit_splice_psock, &key, &psock, BPF_ANY)) {
		bpf_map_delete_elem(&ambit_splice, &key);
		return;
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* A socket that asked to be told: ztunnel's connect() to an application
 * ended (leaving SYN_SENT), or a spliced socket closed. */
static __always_inline void on_state_change(struct bpf_sock_ops *skops)
{
	if (skops->args[0] == BPF_TCP_SYN_SENT) {
		struct ambit_flow_key flow = {};
		ztunnel_flow_key(skops, &flow);
		bpf_map_delete_elem(&ambit_ztunnel_flows, &flow);
	}
	if (skops->args[1] == BPF_TCP_CLOSE) {
		struct ambit_splice_key key = {};
		splice_key(skops, &key);
		bpf_map_delete_elem(&ambit_splice_psock, &key);
	}
}

SEC("sockops")
int ambit_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		file_ztunnel_flow(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		file_orig_dst(skops);
		file_splice(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		file_splice(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		on_state_change(skops);
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
