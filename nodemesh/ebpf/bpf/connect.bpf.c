// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* cgroup/connect4 and connect6: send a connection to the node Envoy (L7 services) or to one
 * backend picked here (L4 services). The rewrite happens once, at connect(): no NAT afterwards.
 */
#include "nodemesh.h"

#define IPPROTO_TCP 6

enum nm_verdict {
	NM_PASS,    /* not ours: leave the connection alone */
	NM_REWRITE, /* destination replaced by *out */
	NM_REFUSE,  /* fail closed: ECONNREFUSED */
};

/* A 64-bit finalizer (MurmurHash3's fmix64): every input bit moves every output bit. */
static __always_inline __u64 nm_mix64(__u64 x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

/* sessionAffinity ClientIP: the backend that scores highest for this client (rendezvous
 * hashing), the client being the caller's network namespace: a pod, whose one IP kube-proxy
 * keys its affinity by (host-network pods share the node's, as they share its IP). No state:
 * a client keeps its backend while that backend stays, and a backend added takes over about
 * 1/n of the clients (kube-proxy keeps each for timeoutSeconds instead). Weights are not
 * looked at (the control plane sends 1 for every backend). */
static __always_inline int nm_pick_affine(void *ctx, const struct nm_service *svc,
					  struct nm_orig_dst *out)
{
	__u64 client = nm_mix64(bpf_get_netns_cookie(ctx));
	__u64 best = 0;
	int found = -1;

	for (__u32 i = 0; i < NM_MAX_BACKENDS; i++) {
		if (i >= svc->n_backends)
			break;
		__u64 b = ((__u64)svc->backends[i].addr << 16) | svc->backends[i].port;
		__u64 score = nm_mix64(client ^ nm_mix64(b));

		if (found < 0 || score > best) {
			best = score;
			out->addr = svc->backends[i].addr;
			out->port = svc->backends[i].port;
			found = 0;
		}
	}
	return found;
}

static __always_inline int nm_pick_backend(void *ctx, const struct nm_service *svc,
					   struct nm_orig_dst *out)
{
	__u32 n = svc->n_backends;
	__u32 total = svc->total_weight;

	if (n == 0 || total == 0)
		return -1;
	if (svc->flags & NM_SVC_AFFINITY)
		return nm_pick_affine(ctx, svc, out);
	__u32 r = bpf_get_prandom_u32() % total;
	/* A constant bound keeps the loop provable for the verifier; n ends it early. */
	for (__u32 i = 0; i < NM_MAX_BACKENDS; i++) {
		if (i >= n)
			break;
		__u32 w = svc->backends[i].weight;
		if (r < w) {
			out->addr = svc->backends[i].addr;
			out->port = svc->backends[i].port;
			return 0;
		}
		r -= w;
	}
	return -1;
}

/* The node Envoy's own upstream connections go where Envoy says: no loops. Its cgroup is the
 * one the agent wrote and every cgroup below it, so Envoy stays exempt when its container
 * restarts into a new cgroup under the same pod cgroup. An ancestor's id is found by its
 * level, which user space cannot know for certain (a cgroup namespace hides the levels
 * above its root), so each level is tried, down to the caller's own.
 */
static __always_inline int nm_from_envoy(const struct nm_config *cfg)
{
	__u64 envoy = cfg->envoy_cgroup_id;

	if (!envoy)
		return 0;
	/* From level 1: the root (0) holds every pod. A constant bound keeps the loop provable
	 * for the verifier; a level deeper than the caller's cgroup returns 0 and ends it. */
	for (int level = 1; level <= NM_MAX_CGROUP_LEVEL; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);

		if (id == envoy)
			return 1;
		if (!id)
			return 0;
	}
	return 0;
}

/* Mark a socket of the node Envoy's for sockops (see NM_ORIG_FROM_ENVOY), where sockets may be
 * short-circuited at all: by its cookie, which sockops reads and deletes once it is connected.
 */
static __always_inline void nm_mark_envoy(void *ctx, const struct nm_config *cfg)
{
	struct nm_orig_dst mark = { .flags = NM_ORIG_FROM_ENVOY };
	__u64 cookie;

	if (!(cfg->flags & (NM_CFG_SOCKET_REDIRECT | NM_CFG_REDIRECT_OPTED_IN)))
		return;
	cookie = bpf_get_socket_cookie(ctx);
	bpf_map_update_elem(&nm_orig_cookie, &cookie, &mark, BPF_ANY);
}

static __always_inline enum nm_verdict nm_connect(void *ctx, __be32 addr, __be16 port,
						  struct nm_orig_dst *out)
{
	struct nm_config *cfg = nm_get_config();
	struct nm_svc_key key = { .addr = addr, .port = port };
	struct nm_orig_dst pick = {};
	struct nm_service *svc;
	int picked = -1, read = 0;
	__u32 flags = 0;

	if (!cfg)
		return NM_PASS;
	if (nm_from_envoy(cfg)) {
		nm_mark_envoy(ctx, cfg);
		return NM_PASS;
	}
	/* The entry is read, then looked up again: the same element means nothing replaced it
	 * meanwhile. An agent update or delete frees the old element, which the kernel may hand
	 * out at once for another entry (hash maps since Linux 6.1, preallocated or not), so a
	 * read racing it could see another Service's values: for an L7 Service those of an L4
	 * one, which would bypass the node Envoy. Read again on a change; still changing after
	 * NM_READ_TRIES: refused (fail closed).
	 */
	for (int i = 0; i < NM_READ_TRIES; i++) {
		svc = bpf_map_lookup_elem(&nm_services, &key);
		if (!svc) {
			NM_COUNT(misses, 1);
			return NM_PASS;
		}
		flags = svc->flags;
		if (!(flags & NM_SVC_L7))
			picked = nm_pick_backend(ctx, svc, &pick);
		if (bpf_map_lookup_elem(&nm_services, &key) == svc) {
			read = 1;
			break;
		}
		NM_COUNT(lookup_races, 1);
	}
	if (!read) {
		NM_COUNT(refused, 1);
		return NM_REFUSE;
	}
	if (flags & NM_SVC_L7) {
		if (!(cfg->flags & NM_CFG_ENVOY_SET)) {
			NM_COUNT(refused, 1);
			return NM_REFUSE; /* never bypass Envoy for a flow that needs L7 */
		}
		struct nm_orig_dst orig = { .addr = addr, .port = port };
		__u64 cookie = bpf_get_socket_cookie(ctx);

		if (bpf_map_update_elem(&nm_orig_cookie, &cookie, &orig, BPF_ANY)) {
			NM_COUNT(refused, 1);
			return NM_REFUSE; /* Envoy could not learn the destination */
		}
		out->addr = cfg->envoy_addr;
		out->port = cfg->envoy_port;
		NM_COUNT(l7_redirects, 1);
		return NM_REWRITE;
	}
	if (picked) {
		NM_COUNT(refused, 1);
		return NM_REFUSE; /* a service without backends refuses, like kube-proxy */
	}
	*out = pick;
	NM_COUNT(l4_picks, 1);
	return NM_REWRITE;
}

SEC("cgroup/connect4")
int nm_sock4_connect(struct bpf_sock_addr *ctx)
{
	struct nm_orig_dst out = {};

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	switch (nm_connect(ctx, ctx->user_ip4, (__be16)ctx->user_port, &out)) {
	case NM_REWRITE:
		ctx->user_ip4 = out.addr;
		ctx->user_port = out.port;
		return 1;
	case NM_REFUSE:
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	default:
		return 1;
	}
}

/* IPv6 sockets reach IPv4 services through v4-mapped addresses (::ffff:a.b.c.d). An IPv6
 * ClusterIP in nm_services6 is handled as its Service's IPv4 ClusterIP and the socket is sent
 * to the v4-mapped result (a socket with IPV6_V6ONLY then fails to connect: an error, never a
 * bypass); an L7 Service without an IPv4 ClusterIP is refused, so L7 is never skipped. */
SEC("cgroup/connect6")
int nm_sock6_connect(struct bpf_sock_addr *ctx)
{
	struct nm_orig_dst out = {};
	__u32 ip6[4];
	__be32 addr;

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	ip6[0] = ctx->user_ip6[0];
	ip6[1] = ctx->user_ip6[1];
	ip6[2] = ctx->user_ip6[2];
	ip6[3] = ctx->user_ip6[3];
	if (nm_is_v4_mapped(ip6)) {
		addr = ip6[3];
	} else {
		struct nm_config *cfg = nm_get_config();
		struct nm_svc6_key key6 = { .port = (__be16)ctx->user_port };
		struct nm_svc6 *svc6;

		if (!cfg || nm_from_envoy(cfg))
			return 1;
		key6.addr[0] = ip6[0];
		key6.addr[1] = ip6[1];
		key6.addr[2] = ip6[2];
		key6.addr[3] = ip6[3];
		__u32 flags6 = 0;
		int read = 0;

		/* Read, then looked up again, as in nm_connect(). */
		for (int i = 0; i < NM_READ_TRIES; i++) {
			svc6 = bpf_map_lookup_elem(&nm_services6, &key6);
			if (!svc6)
				return 1; /* not a mesh Service: the cluster's own path */
			addr = svc6->addr;
			flags6 = svc6->flags;
			if (bpf_map_lookup_elem(&nm_services6, &key6) == svc6) {
				read = 1;
				break;
			}
			NM_COUNT(lookup_races, 1);
		}
		if (!read || !addr ||
		    ((flags6 & NM_SVC6_L7) &&
		     !bpf_map_lookup_elem(&nm_services,
					  &(struct nm_svc_key){ .addr = addr, .port = key6.port }))) {
			NM_COUNT(refused, 1);
			bpf_set_retval(-ECONNREFUSED);
			return 0; /* an L7 Service with nothing to stand in for it: fail closed */
		}
	}
	switch (nm_connect(ctx, addr, (__be16)ctx->user_port, &out)) {
	case NM_REWRITE:
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = out.addr;
		ctx->user_port = out.port;
		return 1;
	case NM_REFUSE:
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	default:
		return 1;
	}
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
