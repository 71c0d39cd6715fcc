/* Outbound capture, IPv4: an enrolled pod's TCP connect() goes to ztunnel's
 * outbound listener at the pod's own address (so ztunnel sees the pod's IP
 * as the source); the original destination is kept for SO_ORIGINAL_DST.
 * Loopback and the pod's own address are left alone. */
#include "connect.h"

SEC("cgroup/connect4")
int ambit_connect4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	int bound = sk && sk->src_ip4 != 0;
	const struct ambit_netns_config *cfg = application_connect(ctx, bound);
	if (!cfg)
		return 1;
	__u32 dst = ctx->user_ip4;
	if ((bpf_ntohl(dst) >> 24) == 127 || dst == cfg->pod_ip4)
		return 1;
	struct ambit_orig_dst orig = { .addr = { dst }, .port = (__u16)ctx->user_port, .family = AF_INET };
	remember(ctx, &orig);
	ctx->user_ip4 = cfg->pod_ip4 ? cfg->pod_ip4 : bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(cfg->outbound_port);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
