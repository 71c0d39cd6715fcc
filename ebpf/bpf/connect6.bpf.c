/* Outbound capture, IPv6: as connect4, for AF_INET6 sockets. An IPv4-mapped
 * destination is a dual-stack socket reaching IPv4, which connect4 does not
 * see: it is redirected to the pod's IPv4 address, mapped. */
#include "connect.h"

static __always_inline int is_zero6(const __u32 a[4])
{
	return !(a[0] | a[1] | a[2] | a[3]);
}

SEC("cgroup/connect6")
int ambit_connect6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	int bound = sk && !(sk->src_ip6[0] == 0 && sk->src_ip6[1] == 0 && sk->src_ip6[2] == 0 && sk->src_ip6[3] == 0);
	const struct ambit_netns_config *cfg = application_connect(ctx, bound);
	if (!cfg)
		return 1;
	__u32 d[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	int mapped = d[0] == 0 && d[1] == 0 && d[2] == bpf_htonl(0xffff);
	if (mapped) {
		if ((bpf_ntohl(d[3]) >> 24) == 127 || d[3] == cfg->pod_ip4)
			return 1;
	} else if ((d[0] == 0 && d[1] == 0 && d[2] == 0 && d[3] == bpf_htonl(1)) ||
		   (d[0] == cfg->pod_ip6[0] && d[1] == cfg->pod_ip6[1] && d[2] == cfg->pod_ip6[2] &&
		    d[3] == cfg->pod_ip6[3])) {
		return 1;
	}
	struct ambit_orig_dst orig = { .addr = { d[0], d[1], d[2], d[3] }, .port = (__u16)ctx->user_port, .family = AF_INET6 };
	remember(ctx, &orig);
	if (mapped) {
		ctx->user_ip6[3] = cfg->pod_ip4 ? cfg->pod_ip4 : bpf_htonl(0x7f000001);
	} else if (!is_zero6(cfg->pod_ip6)) {
		ctx->user_ip6[0] = cfg->pod_ip6[0];
		ctx->user_ip6[1] = cfg->pod_ip6[1];
		ctx->user_ip6[2] = cfg->pod_ip6[2];
		ctx->user_ip6[3] = cfg->pod_ip6[3];
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(cfg->outbound_port);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
