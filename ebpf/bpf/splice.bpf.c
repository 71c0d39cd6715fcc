/* Same-node acceleration: attached to the splice map, runs on each send of a
 * socket sockops filed there (an end of a pod-local leg) and hands the bytes
 * to the peer end's receive queue, skipping TCP/IP and loopback.
 *
 * Each send is spliced or goes through TCP, decided afresh, and the reader
 * takes spliced bytes before TCP ones, so:
 * - bytes are spliced only when the peer has read everything this end sent
 *   through TCP (its copied_seq is this end's write_seq), else they would be
 *   read before older ones still queued in TCP;
 * - the kernel does not bound what is spliced to a socket (nothing like a
 *   TCP window holds the sender back: a peer that does not read would let
 *   this end queue up to the node's TCP memory), so when the peer has
 *   AMBIT_SPLICE_MAX_QUEUED bytes unread, sends go through TCP, and with it
 *   TCP's flow control, until the peer has caught up. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#define AMBIT_NODE_MAPS
#include "capture.h"

#define AMBIT_SPLICE_MAX_QUEUED (4 << 20)

SEC("sk_msg")
int ambit_sk_msg(struct sk_msg_md *msg)
{
	/* The peer's own view: addresses and ports swapped. */
	struct ambit_splice_key key = {};
	key.netns_cookie = bpf_get_netns_cookie(msg);
	key.local_port = bpf_ntohl(msg->remote_port);
	key.remote_port = msg->local_port;
	AMBIT_COPY_ADDR(key.local, msg->family, msg->remote_ip4, msg->remote_ip6);
	AMBIT_COPY_ADDR(key.remote, msg->family, msg->local_ip4, msg->local_ip6);
	/* Filed only once the peer is in the splice map. */
	__u64 *filed = bpf_map_lookup_elem(&ambit_splice_psock, &key);
	struct bpf_sock *sk = msg->sk;
	if (!filed || !*filed || !sk)
		return SK_PASS;
	struct sk_psock___ambit *peer = (struct sk_psock___ambit *)*filed;
	if (BPF_CORE_READ(peer, msg_tot_len) >= AMBIT_SPLICE_MAX_QUEUED)
		return SK_PASS;
	struct tcp_sock___ambit *self = (struct tcp_sock___ambit *)bpf_skc_to_tcp_sock(sk);
	struct tcp_sock___ambit *peer_tcp = (struct tcp_sock___ambit *)BPF_CORE_READ(peer, sk);
	if (!self || BPF_CORE_READ(self, write_seq) != BPF_CORE_READ(peer_tcp, copied_seq))
		return SK_PASS;
	/* Not found (the peer just closed), the helper says drop and sets
	 * nothing: the bytes go through TCP. */
	bpf_msg_redirect_hash(msg, &ambit_splice, &key, BPF_F_INGRESS);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
