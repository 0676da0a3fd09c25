// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The kernel probe's sk_msg program (nodemesh.ebpf.probe, not the data plane): every message
 * a socket in nm_probe_socks sends is redirected into the receive queue of the socket at key
 * 0, as the data plane's nm_msg_redirect does between two local pods, so that the probe can
 * check how the receiving socket's readers see such data. Its map is not pinned: it goes with
 * the probe's process.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} nm_probe_socks SEC(".maps");

SEC("sk_msg")
int nm_probe_redirect(struct sk_msg_md *msg)
{
	return bpf_msg_redirect_map(msg, &nm_probe_socks, 0, BPF_F_INGRESS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
