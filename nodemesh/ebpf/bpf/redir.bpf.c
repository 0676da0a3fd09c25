// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* sk_msg: hand a message straight to the peer socket's receive queue when the peer is in
 * nm_socks (same node), skipping TCP/IP and the veth pair. Otherwise the message goes out
 * the normal way.
 *
 * Backpressure: an ingress redirect never waits for the reader, so the data plane keeps its own
 * count of redirected bytes the peer has not read yet (nm_backlog, decremented by
 * backlog.bpf.c). Past nm_backlog_limit, or when the peer is not in nm_socks, the sending side
 * of the connection goes to plain TCP for good (its nm_fallback entry set), where the TCP window and the send
 * buffer block the writer. Never back: the peer reads its redirected queue before its TCP
 * queue, so order holds only while every redirected byte was written before any TCP byte.
 */
#include "nodemesh.h"

/* Set by the loader before load (Dataplane(backlog_limit=...)). */
const volatile __s64 nm_backlog_limit = 4 << 20;

/* Mark this connection direction as on TCP for good. sockops created the socket's nm_fallback
 * entry before it let the socket into nm_socks, so this is an in-place write that cannot fail.
 * Should an entry be missing all the same (none known), it is created here, which fails only
 * on a full map. Returns 0 when nothing was marked.
 */
static __always_inline int nm_mark(__u32 *fallback, struct nm_tuple *self, __u32 reason)
{
	if (fallback) {
		*fallback = reason;
		return 1;
	}
	return bpf_map_update_elem(&nm_fallback, self, &reason, BPF_NOEXIST) == 0;
}

static __always_inline int nm_to_tcp(__u32 reason)
{
	if (reason == NM_FALLBACK_BACKLOG)
		NM_COUNT(fallback_backlog, 1);
	else
		NM_COUNT(fallback_nopeer, 1);
	NM_COUNT(msg_passed, 1);
	return SK_PASS; /* no redirect set: the message goes out over TCP */
}

/* Take back a reservation whose message was not redirected, never below 0 and never on a
 * detached entry (see backlog.bpf.c for why the count must not dip below 0).
 */
static __always_inline void nm_unreserve(__s64 *backlog, __u32 size)
{
	for (int i = 0; i < NM_CAS_TRIES; i++) {
		__s64 old = *(volatile __s64 *)backlog;
		__s64 left = old > (__s64)size ? old - (__s64)size : 0;

		if (old < 0 || __sync_val_compare_and_swap(backlog, old, left) == old)
			return;
	}
	NM_COUNT(cas_exhausted, 1);
}

SEC("sk_msg")
int nm_msg_redirect(struct sk_msg_md *msg)
{
	struct nm_tuple peer = {};
	struct nm_tuple self = {};
	__u32 size = msg->size;
	__u32 *fallback;
	__s64 *backlog;

	if (msg->family == AF_INET) {
		peer.saddr = msg->remote_ip4;
		peer.daddr = msg->local_ip4;
	} else if (msg->family == AF_INET6) {
		__u32 l6[4] = { msg->local_ip6[0], msg->local_ip6[1], msg->local_ip6[2],
				msg->local_ip6[3] };
		__u32 r6[4] = { msg->remote_ip6[0], msg->remote_ip6[1], msg->remote_ip6[2],
				msg->remote_ip6[3] };

		if (!nm_is_v4_mapped(l6) || !nm_is_v4_mapped(r6))
			return SK_PASS;
		peer.saddr = r6[3];
		peer.daddr = l6[3];
	} else {
		return SK_PASS;
	}
	peer.sport = nm_remote_port(msg->remote_port);
	peer.dport = bpf_htons((__u16)msg->local_port);
	self.saddr = peer.daddr;
	self.daddr = peer.saddr;
	self.sport = peer.dport;
	self.dport = peer.sport;

	fallback = bpf_map_lookup_elem(&nm_fallback, &self);
	if (fallback && *fallback) {
		NM_COUNT(msg_passed, 1);
		return SK_PASS; /* sticky: this connection already went to TCP */
	}
	backlog = bpf_map_lookup_elem(&nm_backlog, &peer);
	if (backlog && *(volatile __s64 *)backlog > nm_backlog_limit) {
		if (nm_mark(fallback, &self, NM_FALLBACK_BACKLOG))
			return nm_to_tcp(NM_FALLBACK_BACKLOG);
		/* Fail safe when the mark cannot be recorded: keep redirecting. Sending this
		 * message over TCP unmarked would let the next one redirect again, and the peer
		 * reads redirected data before TCP data: reordering. Staying redirected only
		 * loses the limit for this connection, never the byte order.
		 */
		NM_COUNT(fallback_unrecorded, 1);
	}
	/* Reserve before redirecting: counted before the kernel queues the data (after this
	 * program returns), so the reader's decrement never comes before this increment, and a
	 * count above 0 keeps nm_detach() (sockops) from taking the peer out of nm_socks while
	 * this message is on its way: it swaps only an exact 0 for NM_DETACHED. If the peer was
	 * detached first, nothing may be redirected to it any more (the kernel would drop the
	 * data once its psock is gone): undo and use TCP, which is then the only way for good.
	 * The peer's entry is never created here: sockops made it when the peer joined nm_socks,
	 * and a missing one means the peer is closing (its entry went at TCP_CLOSE, it leaves
	 * nm_socks next), where a new entry would outlive the socket. Those bytes go uncounted
	 * (no limit, order intact).
	 */
	if (backlog && __sync_fetch_and_add(backlog, (__s64)size) < 0) {
		__sync_fetch_and_add(backlog, -(__s64)size);
		if (!nm_mark(fallback, &self, NM_FALLBACK_NOPEER))
			NM_COUNT(fallback_unrecorded, 1);
		return nm_to_tcp(NM_FALLBACK_NOPEER);
	}
	/* SK_PASS with a redirect set means "redirect"; without one it means "send normally",
	 * so a peer that left the map degrades to plain TCP instead of dropping data.
	 */
	if (bpf_msg_redirect_hash(msg, &nm_socks, &peer, BPF_F_INGRESS) != SK_PASS) {
		if (backlog)
			nm_unreserve(backlog, size);
		/* No peer to redirect to: TCP is the only way. If it cannot be marked (no entry
		 * and a full map: sockops admits no socket without one), a later message could
		 * redirect ahead of this one should the peer join nm_socks.
		 */
		if (!nm_mark(fallback, &self, NM_FALLBACK_NOPEER))
			NM_COUNT(fallback_unrecorded, 1);
		return nm_to_tcp(NM_FALLBACK_NOPEER);
	}
	NM_COUNT(msg_redirected, 1);
	NM_COUNT(bytes_redirected, size);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
