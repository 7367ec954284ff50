/*
 * rtpgen - a cheap G.711 RTP load generator for bench/run (BENCH_RTPGEN=1).
 *
 * Why: SIPp's rtp_stream costs one sendto (and a thread's wake-up) per packet, about a third of
 * a core per 400 calls on the 2-core bench host. rtpgen sends the RTP of every call from one
 * thread: all the packets due in a 2 ms tick go out in one sendmmsg() on a raw socket (the UDP
 * source port is written in the header, so one socket serves every call), and the packets the
 * relay sends back are drained with recvmmsg() from each call's socket every -r ms (several
 * packets per system call).
 *
 * What it cannot save: on loopback the sender's system call also runs the kernel's delivery of
 * the packet into the receiver's socket (and the receiver's wake-up). On the bench VM (retpolines
 * and SRSO "safe RET" make the network stack's calls dear) that is ~5-7 us per packet, whoever
 * sends; rtpgen removes SIPp's user-space share only (measured: ~28% of a core per 400 calls
 * against SIPp's ~35%).
 *
 * Contract:
 *   - It binds UDP sockets on 127.0.0.1 for the port ranges given with -p LO:COUNT (at most -n
 *     ports in all) before anything starts, so a packet the relay sends to a call's port is never
 *     refused, and keeps them for the whole run.
 *   - It learns streams at run time from control files (-f, several allowed, they may appear
 *     later; SIPp writes them with <log> and -trace_logs), one line per event:
 *         LOCAL_PORT REMOTE_IP REMOTE_PORT   start sending from LOCAL_PORT (or re-target it)
 *         stop LOCAL_PORT                    stop that stream
 *     LOCAL_PORT must be one of the bound ports; REMOTE_IP must be 127.0.0.1 (anything else is
 *     refused and counted).
 *   - Each stream: RTP version 2, PT 0 (PCMU), 160-byte payload, one packet every 20 ms paced to
 *     its own phase (the time its start line was read), sequence +1 and timestamp +160 per
 *     packet, marker on the first, an SSRC of its own whose last byte is the local port's last
 *     byte (bench/run samples 1 stream in 16 with `udp[19] & 0x0f = 0`). A tick that comes late
 *     sends what is due (at most 5 packets per stream; more is counted as skipped).
 *   - It ends on SIGTERM/SIGINT or after -d seconds, then writes the totals as one JSON line
 *     (stdout or -o FILE) and, with -s FILE, one line per stream:
 *         local_port remote_ip remote_port ssrc sent received
 *   - Without the privilege for a raw socket (CAP_NET_RAW) it falls back to one sendto() per
 *     packet on the stream's own socket (same packets on the wire, more system calls).
 *
 * Build: cc -O2 -o rtpgen bench/rtpgen.c      Linux only.
 * Usage: rtpgen -p 20001:400 -p 25001:400 -f uac.log -f uas.log -d 120 -n 800 [-o report.json]
 *               [-s streams.txt] [-r 100] [-t 2] [-u]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 20000      /* hard cap on -n */
#define MAX_RANGES 8
#define MAX_FILES 8
#define PERIOD_NS 20000000LL /* 20 ms per packet */
#define MAX_SLOTS 20         /* PERIOD / TICK: one wheel slot per tick of the period */
#define RTP_LEN 172          /* 12-byte header + 160 bytes of G.711 */
#define PKT_LEN (20 + 8 + RTP_LEN)
#define BATCH 1024           /* sendmmsg's vlen limit (UIO_MAXIOV) */
#define RECV_BATCH 32
#define MAX_CATCHUP 5

struct stream {
    int fd;               /* bound UDP socket of this local port */
    uint16_t lport;
    int active;
    uint32_t raddr;       /* network order */
    uint16_t rport;       /* host order */
    uint16_t seq;
    uint32_t ts, ssrc;
    int first;
    long long next_due;   /* ns, CLOCK_MONOTONIC */
    int slot;             /* wheel slot it is linked in, -1 if none */
    int next_in_slot;     /* index, -1 ends the list */
    unsigned long long sent, received, skipped;
    long long last_live;  /* ns: last time it was active (for the receive sweep) */
    int ever;             /* has ever been started */
    /* Last remote, for the per-stream report after a stop. */
    uint32_t last_raddr;
    uint16_t last_rport;
};

struct ctlfile {
    const char *path;
    int fd;
    off_t off;
    char buf[4096];
    size_t len;
};

static struct stream *streams;
static int nstreams;
/* Pacing granularity (-t, default 2 ms; a divisor of 20 ms): each wake-up costs a few us on the
 * bench VM, and a bigger tick sends bigger bursts. */
static long long TICK_NS = 2000000LL;
static int SLOTS = 10;
static int slot_head[MAX_SLOTS];
static struct ctlfile files[MAX_FILES];
static int nfiles;
static volatile sig_atomic_t stop_flag;

static struct {
    unsigned long long sent, received, send_errors, recv_errors, skipped, started, stopped,
        refused, bad_lines, late_ticks, max_late_us, batches;
} tot;

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void on_signal(int s) { (void)s; stop_flag = 1; }

static void die(const char *what) {
    fprintf(stderr, "rtpgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint32_t rng_state = 0x9e3779b9u;
static uint32_t rng(void) { /* xorshift32: SSRCs only need to differ */
    uint32_t x = rng_state;
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    return rng_state = x;
}

static unsigned range_lo[MAX_RANGES], range_cnt[MAX_RANGES];
static int range_first[MAX_RANGES], nrange;

static int port_index(unsigned port) {
    for (int r = 0; r < nrange; r++)
        if (port >= range_lo[r] && port < range_lo[r] + range_cnt[r])
            return range_first[r] + (int)(port - range_lo[r]);
    return -1;
}

static void slot_link(int idx) {
    struct stream *s = &streams[idx];
    int slot = (int)((s->next_due / TICK_NS) % SLOTS);
    s->slot = slot;
    s->next_in_slot = slot_head[slot];
    slot_head[slot] = idx;
}

static void stream_start(int idx, uint32_t raddr, uint16_t rport, long long now) {
    struct stream *s = &streams[idx];
    s->raddr = raddr;
    s->rport = rport;
    s->last_raddr = raddr;
    s->last_rport = rport;
    if (s->active) return; /* re-target only: keep sequence, timestamp, phase */
    s->active = 1;
    s->ever = 1;
    s->first = 1;
    s->seq = (uint16_t)rng();
    s->ts = rng();
    s->ssrc = (rng() & 0xffffff00u) | (s->lport & 0xffu);
    /* Due at the start of the current tick, so the wheel slot of this tick sends it now and
     * every 20th tick after. */
    s->next_due = now / TICK_NS * TICK_NS;
    s->last_live = now;
    tot.started++;
    if (s->slot < 0) slot_link(idx);
}

static void stream_stop(int idx, long long now) {
    struct stream *s = &streams[idx];
    if (!s->active) return;
    s->active = 0; /* unlinked lazily from its slot */
    s->last_live = now;
    tot.stopped++;
}

static void handle_line(char *line, long long now) {
    char a[64], b[64], c[64];
    int n = sscanf(line, "%63s %63s %63s", a, b, c);
    if (n <= 0) return;
    if (n == 2 && strcmp(a, "stop") == 0) {
        int idx = port_index((unsigned)atoi(b));
        if (idx < 0) { tot.refused++; return; }
        stream_stop(idx, now);
        return;
    }
    if (n != 3) { tot.bad_lines++; return; }
    char *end;
    long lp = strtol(a, &end, 10);
    if (*end) { tot.bad_lines++; return; }
    long rp = strtol(c, &end, 10);
    if (*end || rp <= 0 || rp > 65535) { tot.bad_lines++; return; }
    struct in_addr ra;
    /* Loopback only, by contract: never send anywhere else. */
    if (inet_pton(AF_INET, b, &ra) != 1 || ra.s_addr != htonl(INADDR_LOOPBACK)) {
        fprintf(stderr, "rtpgen: refused destination %s (only 127.0.0.1)\n", b);
        tot.refused++;
        return;
    }
    int idx = lp > 0 && lp <= 65535 ? port_index((unsigned)lp) : -1;
    if (idx < 0) {
        fprintf(stderr, "rtpgen: refused local port %ld (not bound by -p)\n", lp);
        tot.refused++;
        return;
    }
    stream_start(idx, ra.s_addr, (uint16_t)rp, now);
}

static void poll_files(long long now, int check_truncation) {
    for (int i = 0; i < nfiles; i++) {
        struct ctlfile *f = &files[i];
        if (f->fd < 0) {
            f->fd = open(f->path, O_RDONLY | O_CLOEXEC);
            if (f->fd < 0) continue; /* not written yet */
            f->off = 0;
            f->len = 0;
        }
        struct stat st;
        if (check_truncation && fstat(f->fd, &st) == 0 && st.st_size < f->off) { /* truncated: start over */
            f->off = 0;
            f->len = 0;
        }
        for (;;) {
            ssize_t r = pread(f->fd, f->buf + f->len, sizeof f->buf - 1 - f->len, f->off);
            if (r <= 0) break;
            f->off += r;
            f->len += (size_t)r;
            char *p = f->buf, *nl;
            while ((nl = memchr(p, '\n', f->len - (size_t)(p - f->buf))) != NULL) {
                *nl = 0;
                handle_line(p, now);
                p = nl + 1;
            }
            f->len -= (size_t)(p - f->buf);
            memmove(f->buf, p, f->len);
            if (f->len == sizeof f->buf - 1) { tot.bad_lines++; f->len = 0; } /* no newline */
        }
    }
}

static uint16_t csum_fold(uint32_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t n) {
    for (; n > 1; p += 2, n -= 2) sum += (uint32_t)(p[0] << 8 | p[1]);
    if (n) sum += (uint32_t)(p[0] << 8);
    return sum;
}

/* How packets leave: a raw IP socket (one sendmmsg per tick for every call), or, without
 * CAP_NET_RAW (or with -u), one sendto per packet on the stream's own socket. (An AF_PACKET
 * socket on lo would skip the output path too, but the kernel drops what it injects as a
 * martian: 127.0.0.1 arriving without an output route, unless route_localnet is set.) */
enum mode { MODE_UDP, MODE_RAW };
static enum mode mode;
static const char *mode_name[] = {"sendto per packet", "raw IP socket + sendmmsg"};

/* One packet into buf: IPv4 + UDP + RTP (raw mode), or RTP only (UDP mode). */
static size_t build(struct stream *s, uint8_t *buf) {
    int raw = mode == MODE_RAW;
    uint8_t *rtp = raw ? buf + 28 : buf;
    rtp[0] = 0x80;
    rtp[1] = (uint8_t)(s->first ? 0x80 : 0x00); /* marker on the first packet; PT 0 */
    rtp[2] = (uint8_t)(s->seq >> 8); rtp[3] = (uint8_t)s->seq;
    rtp[4] = (uint8_t)(s->ts >> 24); rtp[5] = (uint8_t)(s->ts >> 16);
    rtp[6] = (uint8_t)(s->ts >> 8); rtp[7] = (uint8_t)s->ts;
    rtp[8] = (uint8_t)(s->ssrc >> 24); rtp[9] = (uint8_t)(s->ssrc >> 16);
    rtp[10] = (uint8_t)(s->ssrc >> 8); rtp[11] = (uint8_t)s->ssrc;
    /* Payload: written once per buffer slot (see main), PCMU silence. */
    if (!raw) return RTP_LEN;
    struct iphdr *ip = (struct iphdr *)buf;
    ip->version = 4;
    ip->ihl = 5;
    ip->tos = 0;
    ip->tot_len = htons(PKT_LEN);
    ip->id = (uint16_t)s->seq;
    ip->frag_off = htons(IP_DF);
    ip->ttl = 64;
    ip->protocol = IPPROTO_UDP;
    ip->check = 0; /* the kernel fills it (IP_HDRINCL) */
    ip->saddr = htonl(INADDR_LOOPBACK);
    ip->daddr = s->raddr;
    uint8_t *udp = buf + 20;
    udp[0] = (uint8_t)(s->lport >> 8); udp[1] = (uint8_t)s->lport;
    udp[2] = (uint8_t)(s->rport >> 8); udp[3] = (uint8_t)s->rport;
    udp[4] = 0; udp[5] = 8 + RTP_LEN;
    udp[6] = udp[7] = 0;
    /* A real UDP checksum: a relay that rewrites ports in the kernel updates it incrementally,
     * which a zero ("none") checksum would not survive. */
    uint32_t sum = 0;
    sum = csum_add(sum, (const uint8_t *)&ip->saddr, 8);
    sum += IPPROTO_UDP + 8 + RTP_LEN;
    sum = csum_add(sum, udp, 8 + RTP_LEN);
    uint16_t c = csum_fold(sum);
    if (c == 0) c = 0xffff;
    udp[6] = (uint8_t)(c >> 8); udp[7] = (uint8_t)c;
    return PKT_LEN;
}

static uint8_t (*pkts)[PKT_LEN];
static struct mmsghdr *msgs;
static struct iovec *iovs;
static struct sockaddr_in *dsts;
static int *batch_idx;

static void flush(int rawfd, int n) {
    int off = 0;
    while (off < n) {
        int r = sendmmsg(rawfd, msgs + off, (unsigned)(n - off), 0);
        tot.batches++;
        if (r < 0) {
            if (errno == EINTR) continue;
            tot.send_errors++; /* drop this one, go on with the rest */
            streams[batch_idx[off]].sent--;
            tot.sent--;
            off++;
            continue;
        }
        off += r;
    }
}

/* Send what is due in the wheel slots between last_tick (exclusive) and tick (inclusive). */
static void send_due(long long now, long long *last_tick, int rawfd) {
    long long tick = now / TICK_NS;
    long long from = *last_tick + 1;
    if (tick - from >= SLOTS) from = tick - SLOTS + 1;
    if (tick - *last_tick > 2) {
        tot.late_ticks++;
        unsigned long long late = (unsigned long long)((now - (*last_tick + 1) * TICK_NS) / 1000);
        if (late > tot.max_late_us) tot.max_late_us = late;
    }
    *last_tick = tick;
    int n = 0;
    for (long long t = from; t <= tick; t++) {
        int slot = (int)(t % SLOTS);
        int *link = &slot_head[slot];
        while (*link >= 0) {
            int idx = *link;
            struct stream *s = &streams[idx];
            if (!s->active) { /* stopped: unlink */
                *link = s->next_in_slot;
                s->slot = -1;
                continue;
            }
            int k = 0;
            while (s->next_due <= now) {
                if (k == MAX_CATCHUP) { /* far behind: skip ahead in real time */
                    long long behind = (now - s->next_due) / PERIOD_NS + 1;
                    s->skipped += (unsigned long long)behind;
                    tot.skipped += (unsigned long long)behind;
                    s->next_due += behind * PERIOD_NS;
                    s->seq = (uint16_t)(s->seq + behind);
                    s->ts += (uint32_t)(160 * behind);
                    break;
                }
                if (mode == MODE_RAW) {
                    if (n == BATCH) { flush(rawfd, n); n = 0; }
                    size_t len = build(s, pkts[n]);
                    iovs[n].iov_len = len;
                    dsts[n].sin_addr.s_addr = s->raddr;
                    batch_idx[n] = idx;
                    n++;
                } else {
                    uint8_t *b = pkts[0];
                    build(s, b);
                    struct sockaddr_in d = {.sin_family = AF_INET, .sin_port = htons(s->rport),
                                            .sin_addr = {.s_addr = s->raddr}};
                    if (sendto(s->fd, b, RTP_LEN, 0, (struct sockaddr *)&d, sizeof d) < 0) {
                        tot.send_errors++;
                        s->sent--;
                        tot.sent--;
                    }
                }
                s->sent++;
                tot.sent++;
                s->first = 0;
                s->seq++;
                s->ts += 160;
                s->next_due += PERIOD_NS;
                k++;
            }
            s->last_live = now;
            link = &s->next_in_slot;
        }
    }
    if (n) flush(rawfd, n);
}

static uint8_t rbufs[RECV_BATCH][256];
static struct mmsghdr rmsgs[RECV_BATCH];
static struct iovec riovs[RECV_BATCH];

static void drain(int idx) {
    struct stream *s = &streams[idx];
    for (;;) {
        int r = recvmmsg(s->fd, rmsgs, RECV_BATCH, MSG_DONTWAIT, NULL);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno == EINTR) continue;
            tot.recv_errors++;
            return;
        }
        s->received += (unsigned)r;
        tot.received += (unsigned)r;
        if (r < RECV_BATCH) return;
    }
}

/* Drain the sockets of streams live in the last 2 s; every socket once a second and at the end
 * (late packets, or a relay sending before the stream's start line). */
static void drain_all(long long now, int full) {
    for (int i = 0; i < nstreams; i++)
        if (full || streams[i].active || now - streams[i].last_live < 2000000000LL) drain(i);
}

static void report(FILE *out, const char *streams_path, double secs) {
    unsigned long long ever = 0, stillactive = 0;
    for (int i = 0; i < nstreams; i++) {
        ever += (unsigned)streams[i].ever;
        stillactive += (unsigned)streams[i].active;
    }
    fprintf(out,
            "{\"secs\": %.3f, \"ports\": %d, \"send_mode\": \"%s\", \"streams\": %llu, \"started\": %llu, "
            "\"stopped\": %llu, \"active_at_end\": %llu, \"sent\": %llu, \"received\": %llu, "
            "\"send_errors\": %llu, \"recv_errors\": %llu, \"skipped\": %llu, \"refused\": %llu, "
            "\"bad_lines\": %llu, \"late_ticks\": %llu, \"max_late_us\": %llu, \"sendmmsg_calls\": %llu}\n",
            secs, nstreams, mode_name[mode], ever, tot.started, tot.stopped, stillactive,
            tot.sent, tot.received, tot.send_errors, tot.recv_errors, tot.skipped, tot.refused,
            tot.bad_lines, tot.late_ticks, tot.max_late_us, tot.batches);
    fflush(out);
    if (!streams_path) return;
    FILE *f = fopen(streams_path, "w");
    if (!f) { fprintf(stderr, "rtpgen: %s: %s\n", streams_path, strerror(errno)); return; }
    for (int i = 0; i < nstreams; i++) {
        struct stream *s = &streams[i];
        if (!s->ever && !s->received) continue;
        char ip[INET_ADDRSTRLEN] = "-";
        if (s->ever) inet_ntop(AF_INET, &s->last_raddr, ip, sizeof ip);
        fprintf(f, "%u %s %u %u %llu %llu\n", s->lport, ip, s->last_rport, s->ssrc, s->sent,
                s->received);
    }
    fclose(f);
}

static void usage(void) {
    fprintf(stderr,
            "usage: rtpgen -p LO:COUNT [-p ...] -f CONTROL_FILE [-f ...] -d MAX_SECS -n MAX_PORTS\n"
            "              [-o REPORT_JSON] [-s STREAMS_FILE] [-r RECV_SWEEP_MS] [-t TICK_MS] [-u]\n");
    exit(2);
}

int main(int argc, char **argv) {
    unsigned lo[MAX_RANGES], cnt[MAX_RANGES];
    int nranges = 0, max_ports = 0, force_udp = 0;
    double max_secs = 0;
    long sweep_ms = 100;
    const char *report_path = NULL, *streams_path = NULL;
    int opt;
    long tick_ms = 2;
    while ((opt = getopt(argc, argv, "p:f:d:n:o:s:r:t:u")) != -1) {
        switch (opt) {
        case 'p':
            if (nranges == MAX_RANGES || sscanf(optarg, "%u:%u", &lo[nranges], &cnt[nranges]) != 2 ||
                lo[nranges] == 0 || cnt[nranges] == 0 || lo[nranges] + cnt[nranges] > 65536)
                usage();
            nranges++;
            break;
        case 'f':
            if (nfiles == MAX_FILES) usage();
            files[nfiles].path = optarg;
            files[nfiles].fd = -1;
            nfiles++;
            break;
        case 'd': max_secs = atof(optarg); break;
        case 'n': max_ports = atoi(optarg); break;
        case 'o': report_path = optarg; break;
        case 's': streams_path = optarg; break;
        case 'r': sweep_ms = atol(optarg); break;
        case 't': tick_ms = atol(optarg); break;
        case 'u': force_udp = 1; break;
        default: usage();
        }
    }
    /* Everything bounded: a duration and a port count are required. */
    if (!nranges || !nfiles || max_secs <= 0 || max_secs > 7200 || max_ports <= 0 ||
        max_ports > MAX_PORTS || sweep_ms < 1 || sweep_ms > 1000 || tick_ms < 1 || tick_ms > 20 ||
        20 % tick_ms)
        usage();
    TICK_NS = tick_ms * 1000000LL;
    SLOTS = (int)(PERIOD_NS / TICK_NS);
    for (int i = 0; i < nranges; i++) nstreams += (int)cnt[i];
    if (nstreams > max_ports) {
        fprintf(stderr, "rtpgen: %d ports asked, -n allows %d\n", nstreams, max_ports);
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)nstreams + 64) {
        rl.rlim_cur = rl.rlim_max < (rlim_t)nstreams + 64 ? rl.rlim_max : (rlim_t)nstreams + 64;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    streams = calloc((size_t)nstreams, sizeof *streams);
    pkts = calloc(BATCH, sizeof *pkts);
    msgs = calloc(BATCH, sizeof *msgs);
    iovs = calloc(BATCH, sizeof *iovs);
    dsts = calloc(BATCH, sizeof *dsts);
    batch_idx = calloc(BATCH, sizeof *batch_idx);
    if (!streams || !pkts || !msgs || !iovs || !dsts || !batch_idx) die("calloc");
    for (int i = 0; i < SLOTS; i++) slot_head[i] = -1;
    rng_state ^= (uint32_t)getpid() * 2654435761u ^ (uint32_t)now_ns();

    int k = 0;
    for (int r = 0; r < nranges; r++) {
        range_lo[r] = lo[r];
        range_cnt[r] = cnt[r];
        range_first[r] = k;
        nrange = r + 1;
        for (unsigned p = lo[r]; p < lo[r] + cnt[r]; p++, k++) {
            struct stream *s = &streams[k];
            if (k > 0 && streams[k - 1].lport >= p) {
                fprintf(stderr, "rtpgen: port ranges must be increasing and disjoint\n");
                return 2;
            }
            s->lport = (uint16_t)p;
            s->slot = -1;
            s->next_in_slot = -1;
            s->last_live = -10000000000LL;
            s->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (s->fd < 0) die("socket");
            struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)p),
                                    .sin_addr = {.s_addr = htonl(INADDR_LOOPBACK)}};
            if (bind(s->fd, (struct sockaddr *)&a, sizeof a) < 0) {
                fprintf(stderr, "rtpgen: bind 127.0.0.1:%u: %s\n", p, strerror(errno));
                return 1;
            }
        }
    }
    int rawfd = -1;
    mode = MODE_UDP;
    if (!force_udp) {
        if ((rawfd = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW)) >= 0)
            mode = MODE_RAW; /* IPPROTO_RAW implies IP_HDRINCL */
        else
            fprintf(stderr, "rtpgen: no raw socket (%s): one sendto per packet\n", strerror(errno));
    }
    for (int i = 0; i < BATCH; i++) {
        memset(pkts[i], 0xff, PKT_LEN); /* PCMU silence; the headers are written per packet */
        iovs[i].iov_base = pkts[i];
        dsts[i].sin_family = AF_INET;
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &dsts[i];
        msgs[i].msg_hdr.msg_namelen = sizeof dsts[i];
    }
    for (int i = 0; i < RECV_BATCH; i++) {
        riovs[i].iov_base = rbufs[i];
        riovs[i].iov_len = sizeof rbufs[i];
        rmsgs[i].msg_hdr.msg_iov = &riovs[i];
        rmsgs[i].msg_hdr.msg_iovlen = 1;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    FILE *out = stdout;
    if (report_path && !(out = fopen(report_path, "w"))) die(report_path);
    fprintf(stderr, "rtpgen: %d ports bound, %s, max %.0f s\n", nstreams,
            mode_name[mode], max_secs);

    long long start = now_ns(), end = start + (long long)(max_secs * 1e9);
    long long last_tick = start / TICK_NS - 1, next_ctl = start, next_sweep = start,
              next_full = start + 1000000000LL;
    struct timespec wake;
    while (!stop_flag) {
        long long now = now_ns();
        if (now >= end) break;
        if (now >= next_ctl) { /* every 20 ms: a start is late by at most one period */
            poll_files(now, now >= next_full);
            next_ctl = now + PERIOD_NS;
        }
        send_due(now, &last_tick, rawfd);
        if (now >= next_sweep) {
            int full = now >= next_full;
            drain_all(now, full);
            if (full) next_full = now + 1000000000LL;
            next_sweep = now + sweep_ms * 1000000LL;
        }
        long long t = (now / TICK_NS + 1) * TICK_NS; /* the next tick boundary */
        wake.tv_sec = t / 1000000000LL;
        wake.tv_nsec = t % 1000000000LL;
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &wake, NULL);
    }
    poll_files(now_ns(), 1); /* the last stop lines */
    drain_all(now_ns(), 1);
    report(out, streams_path, (double)(now_ns() - start) / 1e9);
    if (out != stdout) fclose(out);
    return 0;
}
