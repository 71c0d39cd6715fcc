/* Two jobs at two moments of a TCP connection's life:
 * - ztunnel connecting to an application as a client (its socket carries
 *   the return mark, see connect.h): the flow is filed before the SYN
 *   leaves, so the inbound program lets it through to the application;
 * - a redirected connection established: its original destination is filed
 *   under the application's address, which is what ztunnel's accepted socket
 *   sees as its peer (see getsockopt.bpf.c). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#define AMBIT_NODE_MAPS
#include "capture.h"

static __always_inline void file_ztunnel_flow(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	const struct ambit_netns_config *cfg = bpf_map_lookup_elem(&ambit_enrolled, &netns);
	if (!cfg)
		return;
	struct bpf_sock *sk = skops->sk;
	if (!sk || sk->mark != cfg->return_mark)
		return;
	struct ambit_flow_key key = {};
	key.client_port = skops->local_port;
	key.server_port = bpf_ntohl(skops->remote_port); /* the port sits in the upper half */
	if (skops->family == AF_INET) {
		key.client[0] = skops->local_ip4;
		key.server[0] = skops->remote_ip4;
	} else {
		/* Context fields are read at constant offsets only. */
		key.client[0] = skops->local_ip6[0];
		key.client[1] = skops->local_ip6[1];
		key.client[2] = skops->local_ip6[2];
		key.client[3] = skops->local_ip6[3];
		key.server[0] = skops->remote_ip6[0];
		key.server[1] = skops->remote_ip6[1];
		key.server[2] = skops->remote_ip6[2];
		key.server[3] = skops->remote_ip6[3];
	}
	__u32 one = 1;
	bpf_map_update_elem(&ambit_ztunnel_flows, &key, &one, BPF_ANY);
}

SEC("sockops")
int ambit_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		file_ztunnel_flow(skops);
		return 1;
	}
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct ambit_orig_dst *orig = bpf_map_lookup_elem(&ambit_orig_by_cookie, &cookie);
	if (!orig)
		return 1;
	struct ambit_tuple_key key = {};
	key.netns_cookie = bpf_get_netns_cookie(skops);
	key.family = skops->family;
	key.port = skops->local_port;
	if (skops->family == AF_INET) {
		key.addr[0] = skops->local_ip4;
	} else {
		key.addr[0] = skops->local_ip6[0];
		key.addr[1] = skops->local_ip6[1];
		key.addr[2] = skops->local_ip6[2];
		key.addr[3] = skops->local_ip6[3];
	}
	struct ambit_orig_dst value = *orig;
	bpf_map_update_elem(&ambit_orig_by_tuple, &key, &value, BPF_ANY);
	bpf_map_delete_elem(&ambit_orig_by_cookie, &cookie);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
