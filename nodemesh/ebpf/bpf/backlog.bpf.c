// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* tp_btf/sock_recv_length: the application of a socket read `ret` bytes; take the redirected
 * ones off that socket's nm_backlog (bytes redirected to it and not read yet).
 *
 * The tracepoint fires in sock_recvmsg_nosec() for every recvmsg/read/recv on a socket with
 * the total the call returned, whichever queue the bytes came from: the psock's ingress queue
 * (redirected) or the TCP receive queue. tcp_sock.copied_seq moves only for the second (6.18:
 * 4 MiB redirected and read, copied_seq unchanged), so the TCP bytes of a read are how far
 * copied_seq moved since the last read (nm_rcv_seq, set by sockops at insert), and the rest
 * are redirected ones. Not every byte read: a socket does not always read its redirected
 * bytes before its TCP ones (two writer threads: a message reserved but not queued yet while
 * the other thread's went over TCP and was read first), and the count could reach 0 with a
 * redirect still coming, so nm_detach() could drop it. fexit/sk_msg_recvmsg would count only
 * the ingress queue, but
 * this kernel refuses to load fentry/fexit/fmod_ret/lsm programs (EPERM, docs/ebpf.md) and has
 * no kprobes (CONFIG_KPROBES unset).
 */
#include "nodemesh.h"
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define MSG_PEEK 2
#define IPPROTO_TCP 6

/* Just the fields used, relocated against the running kernel's BTF (CO-RE). */
struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	unsigned short skc_family;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

struct inet_sock {
	struct sock sk;
	__be16 inet_sport;
} __attribute__((preserve_access_index));

struct tcp_sock {
	__u32 copied_seq;
} __attribute__((preserve_access_index));

/* Bytes of this read (`ret` of them) that came from the TCP receive queue: how far
 * copied_seq moved since nm_rcv_seq, but at most `ret`, by which nm_rcv_seq moves forward
 * (compare-and-swap). The tracepoint runs after the read released the socket lock, so with
 * two readers at once one may see the other's TCP bytes too: taking at most its own `ret`
 * leaves the rest in place for the other, so every TCP byte is claimed once. The first to
 * report may claim TCP bytes that were the other's while its own were redirected: its
 * decrement is then too small and the other's too big by the same amount, so the count is
 * above the truth in between, never below. Without an entry (a socket inserted by an earlier
 * version): 0, every byte counts as redirected, as that version did.
 */
static __always_inline __s64 nm_tcp_bytes(struct sock *sk, const struct nm_tuple *t, int ret)
{
	__u32 *last = bpf_map_lookup_elem(&nm_rcv_seq, t);

	if (!last)
		return 0;
	for (int i = 0; i < NM_CAS_TRIES; i++) {
		/* nm_rcv_seq first, then copied_seq: nm_rcv_seq never passes what copied_seq was
		 * when it was written, so `now` is never behind `old` (read the other way round, a
		 * reader whose `now` went stale while another moved nm_rcv_seq past it would see
		 * nothing moved and take its TCP bytes off the count).
		 */
		__u32 old = *(volatile __u32 *)last;
		__u32 now = BPF_CORE_READ((struct tcp_sock *)sk, copied_seq);
		__s32 moved = (__s32)(now - old);

		if (moved <= 0)
			return 0;
		if (moved > ret)
			moved = ret;
		if (__sync_val_compare_and_swap(last, old, old + (__u32)moved) == old)
			return moved;
	}
	/* Given up: the whole read counts as TCP bytes, so the count stays above the truth (a
	 * later read claims those TCP bytes again, up to its own size): never below.
	 */
	NM_COUNT(cas_exhausted, 1);
	return ret;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(nm_msg_consumed, struct sock *sk, int ret, int flags)
{
	struct nm_tuple t = {};
	unsigned short family;
	__s64 *backlog, tcp;

	if (ret <= 0 || (flags & MSG_PEEK))
		return 0;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	/* TCP only: a connected UDP socket could have the same 4-tuple as a counted one. */
	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	/* The key sockops built for this socket: for a v4-mapped IPv6 socket the kernel keeps
	 * the IPv4 addresses in skc_rcv_saddr/skc_daddr too.
	 */
	t.saddr = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
	t.daddr = BPF_CORE_READ(sk, __sk_common.skc_daddr);
	/* Not skc_num: TCP releases the port (skc_num = 0) when the connection reaches CLOSE,
	 * and the application may still read redirected data after that (the FIN travels over
	 * TCP, the data did not). inet_sport keeps the port until the socket is freed.
	 */
	t.sport = BPF_CORE_READ((struct inet_sock *)sk, inet_sport);
	t.dport = BPF_CORE_READ(sk, __sk_common.skc_dport);
	backlog = bpf_map_lookup_elem(&nm_backlog, &t);
	if (!backlog)
		return 0;
	if (*(volatile __s64 *)backlog < 0)
		return 0; /* detached: nothing is redirected to it any more, not counted */
	tcp = nm_tcp_bytes(sk, &t, ret);
	if (tcp > 0) {
		NM_COUNT(bytes_tcp_read, tcp);
		ret -= tcp;
		if (ret <= 0)
			return 0;
	}
	/* Clamp at 0 (bytes_clamped counts what the clamp discards, 0 in every test): bytes
	 * redirected while the entry was missing (the socket closing) were never added. A
	 * compare-and-swap so the count never dips below 0 even for an instant: nm_detach() in
	 * sockops takes a socket out of nm_socks only by swapping an exact 0 for NM_DETACHED, and
	 * a detached (negative) entry is left as it is. Retried while the writer adds at the same
	 * moment.
	 */
	for (int i = 0; i < NM_CAS_TRIES; i++) {
		__s64 old = *(volatile __s64 *)backlog;
		__s64 left = old > ret ? old - ret : 0;

		if (old < 0)
			return 0; /* detached: nothing is redirected to it any more, not counted */
		if (__sync_val_compare_and_swap(backlog, old, left) == old) {
			NM_COUNT(bytes_consumed, ret);
			if (old < ret)
				NM_COUNT(bytes_clamped, ret - old);
			return 0;
		}
	}
	NM_COUNT(cas_exhausted, 1);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
