// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* sk_lookup, on the node's network namespace: the node Envoy's port takes only the connections
 * connect4/6 sent there (their nm_orig_tuple entry, written by sockops before the SYN left) and
 * the node's own (host processes, host-network pods: see nm_own4). Any other SYN to
 * that port, on any of the node's addresses, is refused: the outbound listener routes by Host
 * to every Service the mesh carries, and must not serve other hosts and networks. Other ports
 * and protocols pass untouched, and so does everything while no node Envoy is known.
 */
#include "nodemesh.h"

#define IPPROTO_TCP 6
/* The node's own connections: from a loopback address, or from the address they dial (what
 * the kernel picks to reach one of its own). From another machine neither can arrive: the
 * kernel drops packets whose source is one of its addresses ("martian source") on any
 * interface but loopback, unless accept_local is set (docs/ebpf.md).
 */
static __always_inline int nm_own4(const struct bpf_sk_lookup *ctx)
{
	return ctx->remote_ip4 == ctx->local_ip4 || (bpf_ntohl(ctx->remote_ip4) >> 24) == 127;
}

static __always_inline int nm_own6(const struct bpf_sk_lookup *ctx)
{
	__u32 r0 = ctx->remote_ip6[0], r1 = ctx->remote_ip6[1], r2 = ctx->remote_ip6[2],
	      r3 = ctx->remote_ip6[3];

	if (r0 == ctx->local_ip6[0] && r1 == ctx->local_ip6[1] && r2 == ctx->local_ip6[2] &&
	    r3 == ctx->local_ip6[3])
		return 1;
	return r0 == 0 && r1 == 0 && r2 == 0 && r3 == bpf_htonl(1); /* ::1 */
}

SEC("sk_lookup")
int nm_envoy_guard(struct bpf_sk_lookup *ctx)
{
	struct nm_config *cfg;
	struct nm_tuple t = {};

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	cfg = nm_get_config();
	if (!cfg || !(cfg->flags & NM_CFG_ENVOY_SET) ||
	    ctx->local_port != bpf_ntohs(cfg->envoy_port))
		return SK_PASS;
	if (ctx->family == AF_INET) {
		if (nm_own4(ctx))
			return SK_PASS;
		/* A pod's connection that connect4/6 sent here: the client's view, as sockops
		 * wrote it before the SYN.
		 */
		t.saddr = ctx->remote_ip4;
		t.daddr = ctx->local_ip4;
		t.sport = ctx->remote_port;
		t.dport = bpf_htons((__u16)ctx->local_port);
		if (bpf_map_lookup_elem(&nm_orig_tuple, &t))
			return SK_PASS;
	} else if (ctx->family == AF_INET6 && nm_own6(ctx)) {
		return SK_PASS;
	}
	NM_COUNT(envoy_refused, 1);
	return SK_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
