// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* cgroup/getsockopt: answer SO_ORIGINAL_DST for connections that connect4 sent to the node
 * Envoy, so Envoy's original_dst listener filter sees the service the client asked for.
 */
#include "nodemesh.h"

struct nm_sockaddr_in {
	__u16 family;
	__be16 port;
	__be32 addr;
	__u8 zero[8];
};

SEC("cgroup/getsockopt")
int nm_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct nm_tuple key = {};
	struct nm_orig_dst *orig;
	struct nm_sockaddr_in *sa;

	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
		return 1;
	if (!sk || sk->family != AF_INET)
		return 1;
	/* This is the Envoy end; the map is keyed by the client end. */
	key.saddr = sk->dst_ip4;
	key.daddr = sk->src_ip4;
	key.sport = sk->dst_port;
	key.dport = bpf_htons((__u16)sk->src_port);
	orig = bpf_map_lookup_elem(&nm_orig_tuple, &key);
	if (!orig) {
		NM_COUNT(orig_dst_missing, 1);
		return 1;
	}
	sa = ctx->optval;
	/* The verifier wants the write proven inside [optval, optval_end). */
	if ((void *)(sa + 1) > ctx->optval_end)
		return 1;
	sa->family = AF_INET;
	sa->port = orig->port;
	sa->addr = orig->addr;
	__builtin_memset(sa->zero, 0, sizeof(sa->zero));
	ctx->optlen = sizeof(*sa);
	/* Without the barrier clang merges the two adjacent u32 stores into one u64 store,
	 * which the verifier rejects as an invalid context access.
	 */
	asm volatile("" ::: "memory");
	ctx->retval = 0;
	/* Asked once per connection (Envoy's original_dst filter, at accept): the entry goes, so
	 * a later connection on the same 4-tuple that was not sent here (one to the Envoy
	 * address itself, from a reused port) is not answered with this one's destination.
	 */
	bpf_map_delete_elem(&nm_orig_tuple, &key);
	NM_COUNT(orig_dst_answered, 1);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
