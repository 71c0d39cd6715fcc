/* Prints the C layout of capture.h's structs as Rust constants, so that a
 * test can check src/layout.rs against the header the programs use. */
#include <stddef.h>
#include <stdio.h>
#include "capture.h"

#define SIZE(t) printf("pub const %s: usize = %zu;\n", "SIZE_" #t, sizeof(struct t))
#define OFF(t, f) printf("pub const %s: usize = %zu;\n", "OFF_" #t "_" #f, offsetof(struct t, f))

int main(void)
{
	SIZE(ambit_netns_config);
	OFF(ambit_netns_config, ztunnel_mark);
	OFF(ambit_netns_config, return_mark);
	OFF(ambit_netns_config, pod_ip4);
	OFF(ambit_netns_config, pod_ip6);
	OFF(ambit_netns_config, outbound_port);
	OFF(ambit_netns_config, flags);
	printf("pub const AMBIT_SPLICE: u16 = %d;\n", AMBIT_SPLICE);
	SIZE(ambit_orig_dst);
	OFF(ambit_orig_dst, addr);
	OFF(ambit_orig_dst, port);
	OFF(ambit_orig_dst, family);
	SIZE(ambit_tuple_key);
	OFF(ambit_tuple_key, netns_cookie);
	OFF(ambit_tuple_key, addr);
	OFF(ambit_tuple_key, port);
	OFF(ambit_tuple_key, family);
	SIZE(ambit_flow_key);
	OFF(ambit_flow_key, client);
	OFF(ambit_flow_key, server);
	OFF(ambit_flow_key, client_port);
	OFF(ambit_flow_key, server_port);
	SIZE(ambit_splice_key);
	OFF(ambit_splice_key, netns_cookie);
	OFF(ambit_splice_key, local);
	OFF(ambit_splice_key, remote);
	OFF(ambit_splice_key, local_port);
	OFF(ambit_splice_key, remote_port);
	SIZE(ambit_inbound_config);
	OFF(ambit_inbound_config, probe_source4);
	OFF(ambit_inbound_config, probe_source6);
	OFF(ambit_inbound_config, hbone_port);
	OFF(ambit_inbound_config, excluded_count);
	OFF(ambit_inbound_config, excluded_ports);
	printf("pub const MAX_EXCLUDED_PORTS: usize = %d;\n", AMBIT_MAX_EXCLUDED_PORTS);
	return 0;
}
