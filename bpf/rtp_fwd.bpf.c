// SPDX-License-Identifier: MIT OR Apache-2.0
//
// callvault's kernel fast path for anchored RTP (docs/ARCHITECTURE.md, "Media: two gears";
// src/media/kernel/mod.rs is the user-space half and owns the contract).
//
// A tc (SCHED_CLS, direct action) program on the ingress of the interfaces the RTP ports are
// on. `fwd` is keyed by the relay's own (address, port) a party sends to; its value says which
// source is taken (the latched party), how the datagram is rewritten (new source = the relay's
// port facing the other party, new destination = that party) and where it goes. A datagram
// that matches is rewritten (IP/UDP addresses and ports, IPv4 header and UDP checksums; the
// RTP header and payload are not touched), counted in `counters[slot]` and forwarded; every
// other datagram continues to the next tc program / the stack untouched (TC_ACT_UNSPEC, which
// is TCX_NEXT: several callvault instances, or other tc users, share an interface).
//
// Telephone-event packets of the payload types in `punt_pt` are not forwarded here: they reach
// the relay's socket so the DTMF feature-code gate sees them (user space holds back `*7 PIN #`).
//
// Recorded directions (`rec_id` != 0) are forwarded the same way, and each forwarded datagram's
// RTP bytes (header + payload, as sent) are also copied with the arrival time and `rec_id` into
// the `rec_ring` ring buffer, which callvault's log writer thread drains in batches into the
// direction's store log (src/storage/log_thread.rs): no syscall and no wake-up per packet
// (BPF_RB_NO_WAKEUP; the thread drains on its own tick). A copy that finds the ring full, or a
// datagram too big to copy, is still forwarded and counted in `counters[slot].rec_drops`.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// How a matching datagram leaves (must equal src/media/kernel/maps.rs `Mode`).
#define MODE_PASS 0           // rewritten, then up the local stack (destination is this host)
#define MODE_REDIRECT 1       // bpf_redirect to `ifindex` egress
#define MODE_REDIRECT_INGRESS 2 // bpf_redirect to `ifindex` ingress
#define MODE_NEIGH 3          // bpf_redirect_neigh to `ifindex` (L2 from the neighbour table)

#define COUNTER_SLOTS 65536
// Bytes of ring for recorded datagrams: ~80k records of G.711 (172 RTP bytes + 24), 400 ms of
// 2,000 recorded calls, while the writer thread drains every 20 ms. Must equal RING_BYTES in
// src/media/kernel/mod.rs (documentation only: user space maps what the kernel made).
#define REC_RING_BYTES (16 << 20)
// Largest RTP datagram recorded (a whole Ethernet MTU's UDP payload).
#define REC_MAX 1472

struct fwd_key {
	__u8 addr[16]; // IPv4: the first 4 bytes, the rest zero
	__u16 port;    // network order
	__u8 family;   // 4 or 6
	__u8 pad;
};

struct fwd_val {
	__u8 peer[16];    // the only source taken: the latched party
	__u8 new_src[16]; // the relay's address facing the other party
	__u8 new_dst[16]; // the other party
	__u16 peer_port;  // network order, as are the two below
	__u16 new_sport;
	__u16 new_dport;
	__u8 mode;
	__u8 flags;
	__u8 punt_pt[2]; // telephone-event payload types for user space (0xff: none)
	__u8 pad[2];
	__u32 ifindex;
	__u32 slot;   // index into `counters` (the relay's local port)
	__u32 rec_id; // the direction's store log at the writer thread; 0: not recorded
};

struct counter {
	__u64 packets;
	__u64 bytes;     // UDP payload bytes (what the user-space relay counts)
	__u64 rec_drops; // forwarded but not recorded: ring full, or bigger than REC_MAX
};

// One record of `rec_ring` (must equal src/media/kernel/ring.rs `RecHeader`), followed by
// `len` bytes of RTP.
struct rec_hdr {
	__u64 arrival_ns; // bpf_ktime_get_ns(): CLOCK_MONOTONIC
	__u32 rec_id;
	__u16 len;
	__u16 pad;
};

struct rec_buf {
	struct rec_hdr h;
	__u8 data[REC_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct fwd_key);
	__type(value, struct fwd_val);
} fwd SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, struct counter);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, REC_RING_BYTES);
} rec_ring SEC(".maps");

// Where a record is put together before it goes into the ring in one copy (the ring's
// reservations are of constant size; `bpf_ringbuf_output` takes a variable one).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rec_buf);
} rec_scratch SEC(".maps");

#define ETH_LEN 14
#define IP4_CSUM_OFF (ETH_LEN + offsetof(struct iphdr, check))
#define IP4_SRC_OFF (ETH_LEN + offsetof(struct iphdr, saddr))
#define IP4_DST_OFF (ETH_LEN + offsetof(struct iphdr, daddr))
#define IP6_SRC_OFF (ETH_LEN + offsetof(struct ipv6hdr, saddr))
#define UDP4_OFF (ETH_LEN + sizeof(struct iphdr))
#define UDP6_OFF (ETH_LEN + sizeof(struct ipv6hdr))

static __always_inline int same6(const __u8 *a, const void *b)
{
	const __u32 *x = (const __u32 *)a, *y = b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int punted(const struct fwd_val *v, __u8 rtp_byte1)
{
	__u8 pt = rtp_byte1 & 0x7f;
	return pt == v->punt_pt[0] || pt == v->punt_pt[1];
}

static __always_inline void count(const struct fwd_val *v, __u16 udp_len)
{
	__u32 slot = v->slot;
	struct counter *c = bpf_map_lookup_elem(&counters, &slot);
	if (c) {
		__sync_fetch_and_add(&c->packets, 1);
		__sync_fetch_and_add(&c->bytes, (__u64)(udp_len - sizeof(struct udphdr)));
	}
}

// Copies the datagram's RTP bytes (at `rtp_off`, `rtp_len` long) into the ring for the
// direction's log; a copy that cannot be made is counted, never silent.
static __always_inline void record(struct __sk_buff *skb, const struct fwd_val *v,
				   __u32 rtp_off, __u32 rtp_len)
{
	__u32 zero = 0;
	struct rec_buf *b = bpf_map_lookup_elem(&rec_scratch, &zero);
	if (b && rtp_len >= 12 && rtp_len <= REC_MAX) {
		b->h.arrival_ns = bpf_ktime_get_ns();
		b->h.rec_id = v->rec_id;
		b->h.len = rtp_len;
		b->h.pad = 0;
		if (bpf_skb_load_bytes(skb, rtp_off, b->data, rtp_len) == 0 &&
		    bpf_ringbuf_output(&rec_ring, b, sizeof(b->h) + rtp_len, BPF_RB_NO_WAKEUP) == 0)
			return;
	}
	__u32 slot = v->slot;
	struct counter *c = bpf_map_lookup_elem(&counters, &slot);
	if (c)
		__sync_fetch_and_add(&c->rec_drops, 1);
}

static __always_inline int forward(const struct fwd_val *v)
{
	switch (v->mode) {
	case MODE_PASS:
		return TC_ACT_OK;
	case MODE_REDIRECT:
		return bpf_redirect(v->ifindex, 0);
	case MODE_REDIRECT_INGRESS:
		return bpf_redirect(v->ifindex, BPF_F_INGRESS);
	default:
		return bpf_redirect_neigh(v->ifindex, NULL, 0, 0);
	}
}

// The UDP ports, then the checksum (ports are not in the pseudo-header).
static __always_inline int rewrite_ports(struct __sk_buff *skb, __u32 udp_off,
					 const struct udphdr *old, const struct fwd_val *v)
{
	__u32 csum_off = udp_off + offsetof(struct udphdr, check);
	__u16 ports[2] = { v->new_sport, v->new_dport };
	if (bpf_l4_csum_replace(skb, csum_off, old->source, v->new_sport,
				BPF_F_MARK_MANGLED_0 | sizeof(__u16)) ||
	    bpf_l4_csum_replace(skb, csum_off, old->dest, v->new_dport,
				BPF_F_MARK_MANGLED_0 | sizeof(__u16)))
		return -1;
	return bpf_skb_store_bytes(skb, udp_off, ports, sizeof(ports), 0);
}

static __always_inline int on_ipv4(struct __sk_buff *skb, void *data, void *data_end)
{
	struct iphdr *ip = data + ETH_LEN;
	if ((void *)(ip + 1) > data_end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
		return TC_ACT_UNSPEC;
	// Fragments (offset or more-fragments set) go to the stack, which reassembles them.
	if (ip->frag_off & bpf_htons(0x3fff))
		return TC_ACT_UNSPEC;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > data_end)
		return TC_ACT_UNSPEC;

	struct fwd_key key;
	__builtin_memset(&key, 0, sizeof(key));
	__builtin_memcpy(key.addr, &ip->daddr, 4);
	key.port = udp->dest;
	key.family = 4;
	struct fwd_val *v = bpf_map_lookup_elem(&fwd, &key);
	if (!v)
		return TC_ACT_UNSPEC;
	__u32 peer4;
	__builtin_memcpy(&peer4, v->peer, 4);
	if (peer4 != ip->saddr || v->peer_port != udp->source)
		return TC_ACT_UNSPEC;
	__u16 udp_len = bpf_ntohs(udp->len);
	__u8 *rtp = (void *)(udp + 1);
	if (udp_len < sizeof(*udp) + 12 || (void *)(rtp + 2) > data_end)
		return TC_ACT_UNSPEC;
	if (punted(v, rtp[1]))
		return TC_ACT_UNSPEC;

	// Read what the helpers below need before they invalidate the packet pointers.
	__u32 old_src = ip->saddr, old_dst = ip->daddr, new_src, new_dst;
	struct udphdr old_udp = *udp;
	__builtin_memcpy(&new_src, v->new_src, 4);
	__builtin_memcpy(&new_dst, v->new_dst, 4);
	__u32 csum_off = UDP4_OFF + offsetof(struct udphdr, check);
	__u32 flags = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(__u32);
	if (bpf_l4_csum_replace(skb, csum_off, old_src, new_src, flags) ||
	    bpf_l4_csum_replace(skb, csum_off, old_dst, new_dst, flags) ||
	    bpf_l3_csum_replace(skb, IP4_CSUM_OFF, old_src, new_src, sizeof(__u32)) ||
	    bpf_l3_csum_replace(skb, IP4_CSUM_OFF, old_dst, new_dst, sizeof(__u32)))
		return TC_ACT_SHOT;
	__u32 addrs[2] = { new_src, new_dst };
	if (bpf_skb_store_bytes(skb, IP4_SRC_OFF, addrs, sizeof(addrs), 0))
		return TC_ACT_SHOT;
	if (rewrite_ports(skb, UDP4_OFF, &old_udp, v))
		return TC_ACT_SHOT;
	count(v, udp_len);
	if (v->rec_id)
		record(skb, v, UDP4_OFF + sizeof(struct udphdr), udp_len - sizeof(struct udphdr));
	return forward(v);
}

static __always_inline int on_ipv6(struct __sk_buff *skb, void *data, void *data_end)
{
	struct ipv6hdr *ip = data + ETH_LEN;
	// Only UDP right after the fixed header: extension headers go to user space.
	if ((void *)(ip + 1) > data_end || ip->nexthdr != IPPROTO_UDP)
		return TC_ACT_UNSPEC;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > data_end)
		return TC_ACT_UNSPEC;

	struct fwd_key key;
	__builtin_memset(&key, 0, sizeof(key));
	__builtin_memcpy(key.addr, &ip->daddr, 16);
	key.port = udp->dest;
	key.family = 6;
	struct fwd_val *v = bpf_map_lookup_elem(&fwd, &key);
	if (!v)
		return TC_ACT_UNSPEC;
	if (!same6(v->peer, &ip->saddr) || v->peer_port != udp->source)
		return TC_ACT_UNSPEC;
	__u16 udp_len = bpf_ntohs(udp->len);
	__u8 *rtp = (void *)(udp + 1);
	if (udp_len < sizeof(*udp) + 12 || (void *)(rtp + 2) > data_end)
		return TC_ACT_UNSPEC;
	if (punted(v, rtp[1]))
		return TC_ACT_UNSPEC;

	__u8 old_addrs[32], new_addrs[32];
	__builtin_memcpy(old_addrs, &ip->saddr, 32);
	__builtin_memcpy(new_addrs, v->new_src, 16);
	__builtin_memcpy(new_addrs + 16, v->new_dst, 16);
	struct udphdr old_udp = *udp;
	__s64 diff = bpf_csum_diff((__be32 *)old_addrs, 32, (__be32 *)new_addrs, 32, 0);
	if (diff < 0)
		return TC_ACT_SHOT;
	__u32 csum_off = UDP6_OFF + offsetof(struct udphdr, check);
	if (bpf_l4_csum_replace(skb, csum_off, 0, (__u32)diff,
				BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, IP6_SRC_OFF, new_addrs, sizeof(new_addrs), 0))
		return TC_ACT_SHOT;
	if (rewrite_ports(skb, UDP6_OFF, &old_udp, v))
		return TC_ACT_SHOT;
	count(v, udp_len);
	if (v->rec_id)
		record(skb, v, UDP6_OFF + sizeof(struct udphdr), udp_len - sizeof(struct udphdr));
	return forward(v);
}

SEC("classifier")
int cv_rtp_fwd(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_UNSPEC;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return on_ipv4(skb, data, data_end);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return on_ipv6(skb, data, data_end);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
