// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* sk_msg: hand a message straight to the peer socket's receive queue when the peer is in
 * nm_socks (same node), skipping TCP/IP and the veth pair. Otherwise the message goes out
 * the normal way.
 */
#include "nodemesh.h"

SEC("sk_msg")
int nm_msg_redirect(struct sk_msg_md *msg)
{
	struct nm_tuple peer = {};
	__u32 size = msg->size;

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
	/* SK_PASS with a redirect set means "redirect"; without one it means "send normally",
	 * so a peer that left the map degrades to plain TCP instead of dropping data.
	 */
	if (bpf_msg_redirect_hash(msg, &nm_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		NM_COUNT(msg_redirected, 1);
		NM_COUNT(bytes_redirected, size);
	} else {
		NM_COUNT(msg_passed, 1);
	}
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
