/* Inbound capture: attached to one pod's network namespace, steers each new
 * TCP connection to the pod's addresses onto ztunnel's in-pod plaintext
 * listener, so the original destination is simply the accepted socket's
 * local address. These take the kernel's usual lookup instead: connections
 * from the pod to itself (the source is a local address: the application's
 * own, or its redirected outbound connections reaching ztunnel), ztunnel's
 * connections to the application (filed by sockops), the HBONE port, the
 * probe source and excluded ports. (The ingress interface cannot tell local
 * traffic: the kernel reports the device owning the address, not lo.) */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#define AMBIT_NODE_MAPS
#include "capture.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ambit_inbound_config);
} ambit_inbound_config SEC(".maps");

/* Slot 0: ztunnel's plaintext listener in this namespace (ztunnel fills it). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32); /* a socket's fd, on update */
} ambit_listeners SEC(".maps");

static __always_inline int from_probe_source(struct bpf_sk_lookup *ctx, const struct ambit_inbound_config *cfg)
{
	if (ctx->family == AF_INET)
		return cfg->probe_source4 && ctx->remote_ip4 == cfg->probe_source4;
	if (!(cfg->probe_source6[0] | cfg->probe_source6[1] | cfg->probe_source6[2] | cfg->probe_source6[3]))
		return 0;
	return ctx->remote_ip6[0] == cfg->probe_source6[0] && ctx->remote_ip6[1] == cfg->probe_source6[1] &&
	       ctx->remote_ip6[2] == cfg->probe_source6[2] && ctx->remote_ip6[3] == cfg->probe_source6[3];
}

/* From the pod itself, or ztunnel reaching the application as a client. */
static __always_inline int local_or_ztunnel(struct bpf_sk_lookup *ctx)
{
	struct ambit_flow_key key = {};
	key.client_port = bpf_ntohs(ctx->remote_port);
	key.server_port = ctx->local_port;
	AMBIT_COPY_ADDR(key.client, ctx->family, ctx->remote_ip4, ctx->remote_ip6);
	AMBIT_COPY_ADDR(key.server, ctx->family, ctx->local_ip4, ctx->local_ip6);
	if (ambit_same_addr(key.client, key.server))
		return 1;
	/* Filed while ztunnel's connect() is under way (sockops forgets it once
	 * established or failed: a SYN sent again still passes, a later
	 * connection with the same addresses and ports does not). */
	return bpf_map_lookup_elem(&ambit_ztunnel_flows, &key) != 0;
}

SEC("sk_lookup")
int ambit_sk_lookup(struct bpf_sk_lookup *ctx)
{
	__u32 zero = 0;
	if (ctx->protocol != IPPROTO_TCP || local_or_ztunnel(ctx))
		return SK_PASS;
	const struct ambit_inbound_config *cfg = bpf_map_lookup_elem(&ambit_inbound_config, &zero);
	if (!cfg)
		return SK_PASS;
	__u16 port = ctx->local_port;
	if (port == cfg->hbone_port || from_probe_source(ctx, cfg))
		return SK_PASS;
	for (int i = 0; i < AMBIT_MAX_EXCLUDED_PORTS; i++) {
		if (i >= cfg->excluded_count)
			break;
		if (cfg->excluded_ports[i] == port)
			return SK_PASS;
	}
	/* No listener yet (ztunnel not serving this pod): refuse, as the
	 * nftables rules drop, so nothing reaches the application around it. */
	struct bpf_sock *sk = bpf_map_lookup_elem(&ambit_listeners, &zero);
	if (!sk)
		return SK_DROP;
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
