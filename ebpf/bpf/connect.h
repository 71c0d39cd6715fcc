/* Outbound capture, shared by connect4 and connect6: decides whether an
 * application's connect() is redirected to ztunnel's in-pod listener. */
#ifndef AMBIT_CONNECT_H
#define AMBIT_CONNECT_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#define AMBIT_NODE_MAPS
#include "capture.h"

/* The enrolled namespace's config when this TCP connect() is the
 * application's, else NULL. ztunnel's own sockets carry its mark; one bound
 * to a (spoofed) client address before connecting is ztunnel reaching the
 * application as that client: it gets the return mark instead, which the
 * accepted socket inherits (net.ipv4.tcp_fwmark_accept) so that the
 * application's replies route back to ztunnel. */
static __always_inline const struct ambit_netns_config *application_connect(struct bpf_sock_addr *ctx, int bound)
{
	if (ctx->type != SOCK_STREAM)
		return 0;
	__u64 netns = bpf_get_netns_cookie(ctx);
	const struct ambit_netns_config *cfg = bpf_map_lookup_elem(&ambit_enrolled, &netns);
	if (!cfg)
		return 0;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	if (sk->mark & cfg->ztunnel_mark) {
		if (bound) {
			int mark = cfg->return_mark;
			bpf_setsockopt(ctx, SOL_SOCKET, SO_MARK, &mark, sizeof(mark));
		}
		return 0;
	}
	return cfg;
}

/* Remembers the destination of this socket until it is established. */
static __always_inline void remember(struct bpf_sock_addr *ctx, const struct ambit_orig_dst *dst)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	bpf_map_update_elem(&ambit_orig_by_cookie, &cookie, dst, BPF_ANY);
}

#endif
