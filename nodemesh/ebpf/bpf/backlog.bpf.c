// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* tp_btf/sock_recv_length: the application of a socket read `ret` bytes; take them off that
 * socket's nm_backlog (bytes redirected to it and not read yet).
 *
 * The tracepoint fires in sock_recvmsg_nosec() for every recvmsg/read/recv on a socket with
 * the total the call returned, whichever queue the bytes came from. That is exact for this
 * data plane: a connection direction first redirects, then (after a fallback) only uses TCP,
 * never back, and tcp_bpf_recvmsg() drains the psock ingress queue before the TCP receive
 * queue, so the first `redirected` bytes a socket reads are the redirected ones and the clamp
 * at 0 below discards the rest. fexit/sk_msg_recvmsg would count only the ingress queue, but
 * this kernel refuses to load fentry/fexit/fmod_ret/lsm programs (EPERM, docs/ebpf.md) and has
 * no kprobes (CONFIG_KPROBES unset).
 */
#include "nodemesh.h"
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define MSG_PEEK 2

/* Just the fields used, relocated against the running kernel's BTF (CO-RE). */
struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	unsigned short skc_family;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct inet_sock {
	struct sock sk;
	__be16 inet_sport;
} __attribute__((preserve_access_index));

SEC("tp_btf/sock_recv_length")
int BPF_PROG(nm_msg_consumed, struct sock *sk, int ret, int flags)
{
	struct nm_tuple t = {};
	unsigned short family;
	__s64 *backlog;

	if (ret <= 0 || (flags & MSG_PEEK))
		return 0;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
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
	/* Clamp at 0: TCP bytes read after the redirected ones are gone, and bytes redirected
	 * while the entry was missing (the socket closing) were never added. A compare-and-swap
	 * so the count never dips below 0 even for an instant: nm_detach() in sockops takes a
	 * socket out of nm_socks only by swapping an exact 0 for NM_DETACHED, and a detached
	 * (negative) entry is left as it is. Retried while the writer adds at the same moment.
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
