/* Answers SO_ORIGINAL_DST (SOL_IP and SOL_IPV6) on ztunnel's accepted
 * outbound sockets for connections the connect programs redirected, so that
 * ztunnel reads the original destination exactly as with nftables capture.
 * Any other option, or a connection not redirected (or in a namespace no
 * longer enrolled, whose stale entries may linger), is left as the kernel
 * answered it. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#define AMBIT_NODE_MAPS
#include "capture.h"

SEC("cgroup/getsockopt")
int ambit_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->optname != AMBIT_SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct ambit_tuple_key key = {};
	key.netns_cookie = bpf_get_netns_cookie(ctx);
	if (!bpf_map_lookup_elem(&ambit_enrolled, &key.netns_cookie))
		return 1;
	key.family = sk->family;
	key.port = bpf_ntohs(sk->dst_port);
	if (sk->family == AF_INET) {
		key.addr[0] = sk->dst_ip4;
	} else {
		key.addr[0] = sk->dst_ip6[0];
		key.addr[1] = sk->dst_ip6[1];
		key.addr[2] = sk->dst_ip6[2];
		key.addr[3] = sk->dst_ip6[3];
	}
	struct ambit_orig_dst *orig = bpf_map_lookup_elem(&ambit_orig_by_tuple, &key);
	if (!orig)
		return 1;
	if (ctx->level == SOL_IP && orig->family == AF_INET) {
		struct sockaddr_in *sa = ctx->optval;
		if ((void *)(sa + 1) > ctx->optval_end)
			return 1;
		sa->sin_family = AF_INET;
		sa->sin_port = orig->port;
		sa->sin_addr.s_addr = orig->addr[0];
		ctx->optlen = sizeof(*sa);
		ctx->retval = 0;
	} else if (ctx->level == SOL_IPV6 && orig->family == AF_INET6) {
		struct sockaddr_in6 *sa = ctx->optval;
		if ((void *)(sa + 1) > ctx->optval_end)
			return 1;
		__builtin_memset(sa, 0, sizeof(*sa));
		sa->sin6_family = AF_INET6;
		sa->sin6_port = orig->port;
		sa->sin6_addr.in6_u.u6_addr32[0] = orig->addr[0];
		sa->sin6_addr.in6_u.u6_addr32[1] = orig->addr[1];
		sa->sin6_addr.in6_u.u6_addr32[2] = orig->addr[2];
		sa->sin6_addr.in6_u.u6_addr32[3] = orig->addr[3];
		ctx->optlen = sizeof(*sa);
		ctx->retval = 0;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
