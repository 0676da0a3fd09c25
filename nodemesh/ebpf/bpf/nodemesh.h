/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Shared structs, maps and helpers of the nodemesh node data plane.
 *
 * User space mirrors every key and value struct in nodemesh/ebpf/_maps.py; a test compares
 * sizes and offsets with this object's BTF. Addresses and ports are in network byte order
 * everywhere in the maps, so user space never has to guess.
 */
#ifndef NODEMESH_H
#define NODEMESH_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOL_IP 0
#define SO_ORIGINAL_DST 80
#define ECONNREFUSED 111

#define NM_MAX_BACKENDS 32

/* Deepest level of the cgroup tree (the root is 0) at which connect4/6 look for the node
 * Envoy's cgroup among the caller's ancestors; the agent refuses a deeper --envoy-cgroup. */
#define NM_MAX_CGROUP_LEVEL 64

/* nm_services flags */
#define NM_SVC_L7 (1U << 0) /* connections go to the node Envoy */
/* sessionAffinity ClientIP (L4): a client pod's connections all go to one backend */
#define NM_SVC_AFFINITY (1U << 1)

/* nm_services6 flags */
#define NM_SVC6_L7 (1U << 0) /* the Service needs L7: refuse when the target is unset */

/* nm_config flags */
#define NM_CFG_ENVOY_SET (1U << 0) /* envoy_addr/envoy_port are valid */
#define NM_CFG_SOCKET_REDIRECT (1U << 1) /* sockops may put any local pair into nm_socks */
#define NM_CFG_REDIRECT_OPTED_IN (1U << 2) /* ... or only pairs whose both ends opted in */

/* nm_local values: flags, never 0 */
#define NM_LOCAL (1U << 0) /* a pod IP on this node, or the node Envoy */
#define NM_LOCAL_REDIRECT_ON (1U << 1) /* its Pod says its sockets may be short-circuited */
#define NM_LOCAL_REDIRECT_OFF (1U << 2) /* its Pod says never (wins over everything) */

/* One destination a pod may connect to: a ClusterIP or a pod IP, and a TCP port. */
struct nm_svc_key {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

/* An IPv6 ClusterIP and TCP port (connect6 only). */
struct nm_svc6_key {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
};

/* What an IPv6 ClusterIP stands for: its Service's IPv4 ClusterIP (same port), looked up in
 * nm_services as if the client had connected to it; addr 0 means the Service has none. */
struct nm_svc6 {
	__be32 addr;
	__u32 flags;
};

struct nm_backend {
	__be32 addr;
	__be16 port;
	__u16 weight;
};

/* The whole service in one value, so one map update switches atomically between versions. */
struct nm_service {
	__u32 flags;
	__u32 n_backends;
	__u32 total_weight;
	__u32 pad;
	struct nm_backend backends[NM_MAX_BACKENDS];
};

/* A TCP connection as seen from one end: s = this socket, d = its peer. */
struct nm_tuple {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

struct nm_orig_dst {
	__be32 addr;
	__be16 port;
	__u16 flags; /* NM_ORIG_FROM_ENVOY; 0 in an original destination */
};

/* In nm_orig_cookie: not an original destination but a mark, that the socket is one the node
 * Envoy made (connect4/6 knows by the caller's cgroup). sockops needs it: the Envoy address
 * is the node's, which host-network pods share, so the address alone does not tell them apart.
 */
#define NM_ORIG_FROM_ENVOY (1U << 0)

struct nm_config {
	__u64 envoy_cgroup_id; /* connections made in it or below it are never rewritten */
	__be32 envoy_addr;
	__be16 envoy_port;
	__u16 flags;
};

struct nm_stats {
	__u64 msg_redirected;
	__u64 bytes_redirected;
	__u64 msg_passed;
	__u64 l7_redirects;
	__u64 l4_picks;
	__u64 misses;
	__u64 refused;
	__u64 sockhash_inserts;
	__u64 orig_dst_answered;
	__u64 orig_dst_missing;
	__u64 fallback_backlog; /* connections sent to TCP: the peer had too much unread */
	__u64 fallback_nopeer;  /* connections sent to TCP: the peer was not in nm_socks */
	__u64 bytes_consumed;   /* redirected bytes read by applications (sockets with an entry) */
	__u64 bytes_clamped;    /* of those, read beyond the count: should stay 0 (see backlog) */
	__u64 untracked_full;   /* sockets left on TCP: nm_backlog/nm_fallback were full */
	__u64 fallback_unrecorded; /* a fallback with no nm_fallback entry to mark (see redir) */
	__u64 entries_freed;    /* sockets whose nm_backlog/nm_fallback entries went at close */
	__u64 sockhash_detached; /* sockets taken out of nm_socks before close (sockops) */
	__u64 cas_exhausted;     /* nm_backlog updates given up after NM_CAS_TRIES races */
	__u64 bytes_tcp_read;    /* bytes read from TCP by sockets with an entry (not counted) */
	__u64 lookup_races;      /* entries read again: the agent replaced them meanwhile */
	__u64 envoy_refused;     /* connections to the node Envoy's port refused (guard.bpf.c) */
};

/* Reads of an nm_services/nm_services6/nm_local entry before giving up (fail closed): an
 * entry is read, then looked up again, and read again if the element changed.
 */
#define NM_READ_TRIES 4

/* Compare-and-swap attempts on one nm_backlog entry before giving up (only the writer, the
 * reader and nm_detach() ever race on an entry, so a retry almost always succeeds).
 */
#define NM_CAS_TRIES 16

/* nm_backlog value of a socket sockops took out of nm_socks (nm_detach()): no redirect may
 * reach it any more. Negative, so it is never above the limit and never counted down.
 */
#define NM_DETACHED (-((__s64)1 << 62))

/* Maps shared by every object: pinned by name under the loader's pin root, so the five
 * objects see one set and the maps outlive the agent.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct nm_svc_key);
	__type(value, struct nm_service);
	/* No preallocation: memory follows the Services. An update replaces the element, and
	 * since Linux 6.1 the freed one can be reused at once, with or without preallocation,
	 * so a reader racing the agent can in rare cases read another entry (docs/ebpf.md,
	 * Known limits).
	 */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct nm_svc6_key);
	__type(value, struct nm_svc6);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_services6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nm_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* socket cookie */
	__type(value, struct nm_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_orig_cookie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct nm_tuple); /* the client's view of its connection to the node Envoy */
	__type(value, struct nm_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_orig_tuple SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct nm_tuple);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_socks SEC(".maps");

/* Per-socket state of the backpressure rule (redir.bpf.c), one entry per socket in nm_socks
 * in each map (nm_backlog, nm_rcv_seq, nm_fallback), keyed by that socket's own nm_socks key.
 * sockops creates the three entries before it inserts the socket into nm_socks (a socket
 * whose entries cannot be created stays out of nm_socks, on TCP) and deletes them when the
 * socket reaches TCP_CLOSE. Plain hashes, not LRU:
 * a live entry must never be evicted (a lost nm_fallback mark would let a connection redirect
 * again while its peer holds unread TCP bytes). Entries exist only for sockets in nm_socks
 * (65536) and for the instant before an insert into it, so twice that never fills; the
 * programs still fail safe if it does (sockops, redir). No preallocation: memory follows the
 * live connections, not max_entries.
 */
#define NM_SOCK_STATE_ENTRIES 131072

/* Bytes redirected to the socket and not yet read by its application. sk_msg adds,
 * tp_btf/sock_recv_length subtracts, both in place.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_SOCK_STATE_ENTRIES);
	__type(key, struct nm_tuple);
	__type(value, __s64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_backlog SEC(".maps");

/* The socket's tcp_sock.copied_seq as the read counter (backlog.bpf.c) last saw it: how far
 * the application has read the TCP receive queue. copied_seq moves only for bytes read from
 * that queue, never for bytes an sk_msg redirect queued on the psock, so the difference at
 * each read is what came over TCP and is not taken off nm_backlog.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_SOCK_STATE_ENTRIES);
	__type(key, struct nm_tuple);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_rcv_seq SEC(".maps");

/* The socket's sending direction: 0 = redirecting, NM_FALLBACK_* = on plain TCP for good. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NM_SOCK_STATE_ENTRIES);
	__type(key, struct nm_tuple);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_fallback SEC(".maps");

#define NM_FALLBACK_BACKLOG 1
#define NM_FALLBACK_NOPEER 2

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __be32); /* pod IPs on this node and the node Envoy address */
	__type(value, __u32); /* NM_LOCAL | NM_LOCAL_REDIRECT_* */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_local SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nm_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nm_stats SEC(".maps");

#define NM_COUNT(field, n)                                              \
	do {                                                            \
		__u32 __zero = 0;                                       \
		struct nm_stats *__s = bpf_map_lookup_elem(&nm_stats, &__zero); \
		if (__s)                                                \
			__s->field += (n);                              \
	} while (0)

static __always_inline struct nm_config *nm_get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&nm_config, &zero);
}

/* The kernel hands remote_port to sock_ops and sk_msg as a __be16 shifted into the upper
 * half of a u32 on little endian; this yields the plain __be16 on either endianness.
 */
static __always_inline __be16 nm_remote_port(__u32 remote_port)
{
	return bpf_htons((__u16)bpf_ntohl(remote_port));
}

static __always_inline int nm_is_v4_mapped(const __u32 *ip6)
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0x0000ffff);
}

#endif
