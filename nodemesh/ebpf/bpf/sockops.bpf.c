// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* sockops: put established connections whose both ends live on this node into nm_socks, with
 * their nm_backlog/nm_fallback/nm_rcv_seq entries (deleted again at TCP_CLOSE), and hand the
 * original destination of a connection sent to the node Envoy from its socket cookie to its
 * 4-tuple, where cgroup/getsockopt finds it.
 */
#include "nodemesh.h"

/* Just the field used, relocated against the running kernel's BTF (CO-RE). */
struct tcp_sock {
	__u32 copied_seq;
} __attribute__((preserve_access_index));

static __always_inline int nm_tuple_of(const struct bpf_sock_ops *skops, struct nm_tuple *t)
{
	if (skops->family == AF_INET) {
		t->saddr = skops->local_ip4;
		t->daddr = skops->remote_ip4;
	} else if (skops->family == AF_INET6) {
		__u32 l6[4] = { skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
				skops->local_ip6[3] };
		__u32 r6[4] = { skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2],
				skops->remote_ip6[3] };

		if (!nm_is_v4_mapped(l6) || !nm_is_v4_mapped(r6))
			return -1;
		t->saddr = l6[3];
		t->daddr = r6[3];
	} else {
		return -1;
	}
	t->sport = bpf_htons((__u16)skops->local_port);
	t->dport = nm_remote_port(skops->remote_port);
	return 0;
}

/* Returns how many of the socket's nm_backlog and nm_fallback entries were there. */
static __always_inline int nm_forget(const struct nm_tuple *t)
{
	int n = 0;

	n += bpf_map_delete_elem(&nm_backlog, t) == 0;
	n += bpf_map_delete_elem(&nm_fallback, t) == 0;
	bpf_map_delete_elem(&nm_rcv_seq, t);
	return n;
}

static __always_inline void nm_established(struct bpf_sock_ops *skops, int active)
{
	struct nm_tuple t = {};
	struct nm_config *cfg;
	__u32 *local, *peer, mine = 0, theirs = 0, flags, seq;
	int read = 0, from_envoy = 0;
	struct bpf_sock *sk;
	struct tcp_sock *tp;
	__s64 zero64 = 0;
	__u32 zero32 = 0;

	if (nm_tuple_of(skops, &t))
		return;
	if (active) {
		__u64 cookie = bpf_get_socket_cookie(skops);
		struct nm_orig_dst *orig = bpf_map_lookup_elem(&nm_orig_cookie, &cookie);

		if (orig) {
			struct nm_orig_dst copy = *orig;

			if (copy.flags & NM_ORIG_FROM_ENVOY)
				from_envoy = 1; /* a mark, not an original destination */
			else
				bpf_map_update_elem(&nm_orig_tuple, &t, &copy, BPF_ANY);
			bpf_map_delete_elem(&nm_orig_cookie, &cookie);
		} else {
			/* Not sent to the node Envoy: what an earlier connection on this 4-tuple
			 * left (an Envoy that never read it) must not answer for this one.
			 */
			bpf_map_delete_elem(&nm_orig_tuple, &t);
		}
	}
	/* The agent's switch (--socket-redirect): without it no socket enters nm_socks, so no
	 * payload skips the stack; connect-time balancing and the L7 redirect stay.
	 */
	cfg = nm_get_config();
	if (!cfg || !(cfg->flags & (NM_CFG_SOCKET_REDIRECT | NM_CFG_REDIRECT_OPTED_IN)))
		return;
	/* The node Envoy's address is the node's, and host-network pods have it too. An end there
	 * is the Envoy's only as its listener's (a connection to the Envoy port) or as a
	 * connection connect4/6 saw it make; any other socket with that address is a host-network
	 * process's, which no Pod choice covers (and which may block on recv() or splice()): it
	 * stays on TCP, in every mode. Its peer's sends then find no peer and go to TCP too.
	 */
	if ((cfg->flags & NM_CFG_ENVOY_SET) && t.saddr == cfg->envoy_addr &&
	    !(active ? from_envoy : t.sport == cfg->envoy_port))
		return;
	if ((cfg->flags & NM_CFG_ENVOY_SET) && active && t.daddr == cfg->envoy_addr &&
	    t.dport != cfg->envoy_port)
		return; /* to a host-network server (above): it will not be in nm_socks */
	/* Read, then looked up again (as connect.bpf.c does): the same elements mean the agent
	 * replaced neither meanwhile, so neither value is a reused element's (another pod's).
	 */
	for (int i = 0; i < NM_READ_TRIES; i++) {
		local = bpf_map_lookup_elem(&nm_local, &t.saddr);
		peer = bpf_map_lookup_elem(&nm_local, &t.daddr);
		if (!local || !peer)
			return; /* the peer is elsewhere: the normal TCP path is the only path */
		mine = *local;
		theirs = *peer;
		if (bpf_map_lookup_elem(&nm_local, &t.saddr) == local &&
		    bpf_map_lookup_elem(&nm_local, &t.daddr) == peer) {
			read = 1;
			break;
		}
		NM_COUNT(lookup_races, 1);
	}
	if (!read)
		return; /* still changing: plain TCP, the safe side */
	/* Both ends decide alike: each sees the same two nm_local values. A Pod that says off
	 * keeps its connections on TCP; with only NM_CFG_REDIRECT_OPTED_IN (a kernel whose
	 * sockmap reads are broken, docs/ebpf.md) both ends must have said on.
	 */
	flags = mine | theirs;
	if (flags & NM_LOCAL_REDIRECT_OFF)
		return;
	if (!(cfg->flags & NM_CFG_SOCKET_REDIRECT) && !(mine & theirs & NM_LOCAL_REDIRECT_ON))
		return;
	/* Where the application's reads of the TCP queue start: the read counter takes only
	 * redirected bytes off nm_backlog. Without it the socket cannot be counted: it stays out.
	 */
	sk = skops->sk;
	if (!sk)
		return;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return;
	seq = tp->copied_seq;
	/* Ask for BPF_SOCK_OPS_STATE_CB first, so whatever is created below goes at close, and
	 * for BPF_SOCK_OPS_HDR_OPT_LEN_CB (every packet the socket sends) for nm_detach().
	 */
	if (bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						     BPF_SOCK_OPS_STATE_CB_FLAG |
						     BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG))
		return;
	/* The three per-socket entries exist before the socket is in nm_socks, so sk_msg and the
	 * read counter only ever change them in place, which cannot fail on a full map. BPF_ANY
	 * resets them for a reused 4-tuple; nothing can redirect to this socket before it is in
	 * nm_socks, so no add is lost. If the maps are full the socket stays out of nm_socks:
	 * plain TCP for its whole life, and its peer's sends fall back (no peer).
	 */
	if (bpf_map_update_elem(&nm_backlog, &t, &zero64, BPF_ANY) ||
	    bpf_map_update_elem(&nm_fallback, &t, &zero32, BPF_ANY) ||
	    bpf_map_update_elem(&nm_rcv_seq, &t, &seq, BPF_ANY)) {
		nm_forget(&t);
		NM_COUNT(untracked_full, 1);
		return;
	}
	if (bpf_sock_hash_update(skops, &nm_socks, &t, BPF_ANY) == 0)
		NM_COUNT(sockhash_inserts, 1);
	else
		nm_forget(&t);
}

/* The socket reached TCP_CLOSE: drop its entries. tcp_set_state() calls this before it
 * unhashes the socket and releases the port (inet_put_port() zeroes skc_num afterwards), so
 * local_port (skc_num), remote_port and both addresses still hold the ESTABLISHED values and
 * nm_tuple_of() builds the same key as at insert; the socket leaves nm_socks right after.
 */
static __always_inline void nm_closed(struct bpf_sock_ops *skops)
{
	struct nm_tuple t = {};

	if (nm_tuple_of(skops, &t))
		return;
	if (nm_forget(&t))
		NM_COUNT(entries_freed, 1);
}

/* Take the socket out of nm_socks for the rest of its life, once that cannot lose data.
 *
 * Why: on a socket in a sockhash, tcp_bpf_recvmsg() waits once for data and returns -EAGAIN
 * if anything else woke it, even to a blocking reader (docs/ebpf.md, Known limitations).
 * Such wakeups come from the socket's own TCP traffic: the ACK of its FIN after
 * shutdown(SHUT_WR) (a state change) and, once it sends over TCP, freed send buffer (write
 * space). Out of nm_socks its psock goes and its reads are plain tcp_recvmsg(). So a socket
 * leaves when it half-closes or closes (FIN_WAIT1), when its own sends went to TCP
 * (nm_fallback set), and when its peer left (the peer's count is NM_DETACHED).
 *
 * When: only with nothing redirected to it unread. The swap of an exact 0 for NM_DETACHED
 * makes that atomic with the peer's sk_msg, which reserves (adds to this count) before it
 * redirects and falls back to TCP when it finds NM_DETACHED; a redirect that reached a
 * socket after its psock went would be dropped by the kernel. With data unread the socket
 * stays; it tries again at each packet it sends (HDR_OPT_LEN_CB) and, after a half-close,
 * when its FIN is acknowledged (FIN_WAIT2). A socket that sends nothing more is not retried.
 */
static __always_inline void nm_detach(struct bpf_sock_ops *skops, const struct nm_tuple *self)
{
	__s64 *backlog = bpf_map_lookup_elem(&nm_backlog, self);

	if (!backlog || __sync_val_compare_and_swap(backlog, 0, NM_DETACHED) != 0)
		return;
	if (bpf_map_delete_elem(&nm_socks, self) == 0)
		NM_COUNT(sockhash_detached, 1);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags &
						 ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
}

/* A packet is about to be sent: leave nm_socks if this socket's sends went to TCP, its peer
 * already left, or it half-closed with data still unread then (a retry).
 */
static __always_inline void nm_sending(struct bpf_sock_ops *skops)
{
	struct nm_tuple self = {};
	struct nm_tuple peer;
	__u32 *fallback;
	__s64 *peer_backlog;

	if (nm_tuple_of(skops, &self))
		return;
	fallback = bpf_map_lookup_elem(&nm_fallback, &self);
	if (!fallback)
		return; /* not a socket nm_established() tracks */
	peer.saddr = self.daddr;
	peer.daddr = self.saddr;
	peer.sport = self.dport;
	peer.dport = self.sport;
	peer_backlog = bpf_map_lookup_elem(&nm_backlog, &peer);
	if (*fallback || (peer_backlog && *(volatile __s64 *)peer_backlog < 0) ||
	    skops->state == BPF_TCP_FIN_WAIT1 || skops->state == BPF_TCP_FIN_WAIT2)
		nm_detach(skops, &self);
}

static __always_inline void nm_half_closed(struct bpf_sock_ops *skops)
{
	struct nm_tuple self = {};

	if (nm_tuple_of(skops, &self) == 0)
		nm_detach(skops, &self);
}

/* A connection is about to send its SYN (source address and port are chosen): one connect4/6
 * sent to the node Envoy gets its nm_orig_tuple entry now, before the SYN reaches the node's
 * network namespace, where the Envoy port's guard (guard.bpf.c) admits only connections that
 * have one. Established, it is written again (nm_established), as by a version without this.
 */
static __always_inline void nm_connecting(struct bpf_sock_ops *skops)
{
	struct nm_tuple t = {};
	__u64 cookie;
	struct nm_orig_dst *orig;

	if (nm_tuple_of(skops, &t))
		return;
	cookie = bpf_get_socket_cookie(skops);
	orig = bpf_map_lookup_elem(&nm_orig_cookie, &cookie);
	if (!orig) {
		bpf_map_delete_elem(&nm_orig_tuple, &t); /* an earlier connection's, never read */
		return;
	}
	if (!(orig->flags & NM_ORIG_FROM_ENVOY)) {
		struct nm_orig_dst copy = *orig;

		bpf_map_update_elem(&nm_orig_tuple, &t, &copy, BPF_ANY);
	}
}

SEC("sockops")
int nm_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		nm_connecting(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		nm_established(skops, 1);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		nm_established(skops, 0);
		break;
	case BPF_SOCK_OPS_STATE_CB: /* only sockets nm_established() tracks ask for it */
		if (skops->args[1] == BPF_TCP_CLOSE)
			nm_closed(skops);
		else if (skops->args[1] == BPF_TCP_FIN_WAIT1 || skops->args[1] == BPF_TCP_FIN_WAIT2)
			nm_half_closed(skops); /* FIN_WAIT2: again, if data was unread at FIN_WAIT1 */
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB: /* the same sockets, until nm_detach() */
		nm_sending(skops);
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
