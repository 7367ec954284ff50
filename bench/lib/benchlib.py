#!/usr/bin/env python3
"""Helpers for bench/run (Python 3 standard library only).

Subcommands (each prints one line of JSON or text on stdout):
  ports-free PORT...                 exit 1 naming the first port bound on 127.0.0.1 (UDP or TCP)
  ticks PID...                       utime+stime of the processes, in seconds (all threads)
  pss PID...                         sum of Pss (KiB) from /proc/PID/smaps_rollup
  descendants PID                    PID and every descendant, space separated
  metric URL NAME                    value of a Prometheus sample without labels (0 if absent)
  rtpengine-totals TEXT_FILE         relayed packets from `rtpengine-ctl list totals` output
  sipp CSV...                        cumulative counters summed over SIPp -trace_stat CSVs (JSON)
  rtp PCAP A_PORTS B_PORTS           loss and added delay of RTP relayed between two parties'
                                     media ports (a port or LO-HI: SIPp's media port, rtpgen's
                                     per-call ranges), matched by (direction, SSRC, sequence) (JSON)
  pcap-packets PCAP...               packets in pcap files (recordings)
  record FILE SECTION METRIC SYSTEM VALUE UNIT BETTER [NOTE]
                                     append one measurement (VALUE numeric or text) to FILE
  json-get JSON KEY                  one field of a JSON object (for bash)
  table RESULTS_JSONL [--markdown]   the side-by-side table
"""

import json
import os
import socket
import struct
import sys
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


def ports_free(ports):
    for p in ports:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            s = socket.socket(socket.AF_INET, kind)
            if kind == socket.SOCK_STREAM:
                # As the servers bind: a TIME_WAIT left by the previous run is no conflict.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", int(p)))
            except OSError:
                print(f"port {p} is in use on 127.0.0.1")
                return 1
            finally:
                s.close()
    return 0


def ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                # comm may hold spaces: fields after the closing parenthesis.
                rest = f.read().rsplit(")", 1)[1].split()
            total += int(rest[11]) + int(rest[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            pass
    print(f"{total / CLK_TCK:.3f}")


def pss(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    print(total)


def descendants(pid):
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [int(pid)]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    print(" ".join(map(str, out)))


def metric(url, name):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError as e:
        print(f"metric: {e}", file=sys.stderr)
        print("nan")
        return
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == name:
            print(parts[1])
            return
    print("0")


def rtpengine_totals(path):
    # rtpengine 10.5 prints e.g. " Packets per second (userspace)  :1234" and totals such as
    # "Total relayed packets (userspace)  :123456"; take the userspace relayed packet total.
    value = None
    with open(path) as f:
        for line in f:
            low = line.lower()
            if "relayed packets" in low and ":" in line and "per second" not in low:
                try:
                    v = int(line.rsplit(":", 1)[1].strip())
                except ValueError:
                    continue
                if "userspace" in low or value is None:
                    value = v
    print(value if value is not None else "nan")


SIPP_KEYS = {
    "created": ["TotalCallCreated"],
    "successful": ["SuccessfulCall"],
    "failed": ["FailedCall"],
    "retransmissions": ["Retransmissions"],
    "unexpected": ["FailedUnexpectedMessage"],
    "timeouts": ["FailedTimeoutOnRecv", "FailedTimeoutOnSend"],
    "max_udp_retrans": ["FailedMaxUDPRetrans"],
    "out_of_call": ["OutOfCallMsgs"],
    "dead_call": ["DeadCallMsgs"],
}


def sipp_stats(paths):
    out = {k: 0 for k in SIPP_KEYS}
    out["files"] = 0
    out["elapsed_max"] = 0.0
    out["launch_secs_max"] = 0.0
    for path in paths:
        try:
            with open(path) as f:
                rows = [line.rstrip("\n").split(";") for line in f if line.strip()]
        except OSError:
            continue
        if len(rows) < 2:
            continue
        head = [h.strip() for h in rows[0]]
        last = dict(zip(head, rows[-1]))
        out["files"] += 1
        for k, cols in SIPP_KEYS.items():
            for c in cols:
                try:
                    out[k] += int(last.get(c + "(C)", last.get(c, "0")) or 0)
                except ValueError:
                    pass
        # Elapsed is "hh:mm:ss" (optionally ":uuuuuu"); the first row whose created count
        # reaches the final one tells how long SIPp needed to launch every call (1 s resolution
        # with -fd 1).
        def secs(v):
            try:
                f = [int(x) for x in v.strip().split(":")]
                return f[0] * 3600 + f[1] * 60 + f[2] + (f[3] / 1e6 if len(f) > 3 else 0)
            except (ValueError, IndexError):
                return 0.0
        out["elapsed_max"] = max(out["elapsed_max"], secs(last.get("ElapsedTime(C)", "")))
        final = last.get("TotalCallCreated")
        for r in rows[1:]:
            d = dict(zip(head, r))
            if d.get("TotalCallCreated") == final:
                out["launch_secs_max"] = max(out["launch_secs_max"],
                                             secs(d.get("ElapsedTime(C)", "")))
                break
    print(json.dumps(out))


def read_pcap(path):
    """Yields (time, src_port, dst_port, udp_payload) for UDP/IPv4 packets."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return
    magic = struct.unpack("<I", data[:4])[0]
    if magic in (0xA1B2C3D4, 0xA1B23C4D):
        e = "<"
    elif magic in (0xD4C3B2A1, 0x4D3CB2A1):
        e = ">"
    else:
        raise ValueError(f"{path}: not a pcap file")
    nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
    link = struct.unpack(e + "I", data[20:24])[0]
    l2 = {1: 14, 101: 0, 113: 16, 276: 20}.get(link)
    if l2 is None:
        raise ValueError(f"{path}: link type {link}")
    off = 24
    hdr = struct.Struct(e + "IIII")
    div = 1e9 if nano else 1e6
    while off + 16 <= len(data):
        sec, frac, incl, _orig = hdr.unpack_from(data, off)
        pkt = data[off + 16: off + 16 + incl]
        off += 16 + incl
        ip = pkt[l2:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        ihl = (ip[0] & 15) * 4
        udp = ip[ihl:]
        if len(udp) < 8:
            continue
        sport, dport = struct.unpack_from(">HH", udp, 0)
        yield sec + frac / div, sport, dport, udp[8:]


def pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def port_range(spec):
    """"40100" or "20001-20400" -> (lo, hi), inclusive."""
    lo, _, hi = str(spec).partition("-")
    return int(lo), int(hi or lo)


def rtp_analyze(path, a_ports, b_ports):
    """Party A sends from/receives on a_ports, party B on b_ports (one SIPp media port each, or
    rtpgen's per-call port ranges); the system under test sits in between. A packet leaving A
    (src in A) must come out towards B (dst in B) with the same SSRC and sequence number, and
    vice versa. Added delay = transit - the stream's minimum transit: the jitter the relay adds,
    independent of the senders' own timing."""
    (alo, ahi), (blo, bhi) = port_range(a_ports), port_range(b_ports)
    ins, outs = {}, {}
    first = last = None
    for t, sp, dp, pl in read_pcap(path):
        if len(pl) < 12 or pl[0] >> 6 != 2:
            continue
        seq = struct.unpack_from(">H", pl, 2)[0]
        ssrc = struct.unpack_from(">I", pl, 8)[0]
        first = t if first is None else first
        last = t
        sa, sb = alo <= sp <= ahi, blo <= sp <= bhi
        da, db = alo <= dp <= ahi, blo <= dp <= bhi
        if sa and not db:
            ins[("ab", ssrc, seq)] = t
        elif sb and not da:
            ins[("ba", ssrc, seq)] = t
        elif db and not sa:
            outs.setdefault(("ab", ssrc, seq), t)
        elif da and not sb:
            outs.setdefault(("ba", ssrc, seq), t)
    res = {"packets_in": len(ins), "packets_out": len(outs)}
    if first is None:
        res.update(interior_in=0, lost=0, loss_pct=float("nan"), p50_ms=float("nan"),
                   p99_ms=float("nan"), max_ms=float("nan"), streams=0)
        print(json.dumps(res))
        return
    # Only packets well inside the window: the edges hold halves of in/out pairs.
    lo, hi = first + 0.5, last - 0.5
    lost = interior = 0
    transit = {}
    for k, t in ins.items():
        o = outs.get(k)
        if lo <= t <= hi:
            interior += 1
            if o is None:
                lost += 1
        if o is not None:
            transit.setdefault(k[:2], []).append(o - t)
    added = []
    for vals in transit.values():
        m = min(vals)
        added.extend(v - m for v in vals)
    added.sort()
    res.update(
        interior_in=interior,
        lost=lost,
        loss_pct=(100.0 * lost / interior) if interior else float("nan"),
        p50_ms=pct(added, 50) * 1000,
        p99_ms=pct(added, 99) * 1000,
        max_ms=(added[-1] * 1000) if added else float("nan"),
        streams=len(transit),
        window_secs=round(last - first, 2),
    )
    print(json.dumps(res))


def pcap_packets(paths):
    n = 0
    for p in paths:
        try:
            n += sum(1 for _ in read_pcap(p))
        except (OSError, ValueError):
            pass
    print(n)


def fmt(v, unit):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if v != v:  # NaN
        return "n/a"
    if unit in ("calls/s", "packets/s"):
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(path, markdown):
    rows, order = {}, []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            key = (r["section"], r["metric"])
            if key not in rows:
                rows[key] = {"unit": r.get("unit", ""), "better": r.get("better", ""),
                             "note": "", "callvault": None, "reference": None}
                order.append(key)
            rows[key][r["system"]] = r.get("value")
            if r.get("note"):
                sep = "; " if rows[key]["note"] else ""
                rows[key]["note"] += sep + f"{r['system']}: {r['note']}"
    head = ["scenario", "metric", "callvault", "reference", "ratio cv/ref", "better", "notes"]
    body = []
    for key in order:
        r = rows[key]
        cv, ref = r["callvault"], r["reference"]
        ratio = "-"
        if isinstance(cv, (int, float)) and isinstance(ref, (int, float)) and ref == ref \
                and cv == cv and ref != 0:
            ratio = f"{cv / ref:.2f}x"
        metric_name = key[1] + (f" ({r['unit']})" if r["unit"] else "")
        body.append([key[0], metric_name, fmt(cv, r["unit"]), fmt(ref, r["unit"]), ratio,
                     r["better"], r["note"]])
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("| " + " | ".join("---" for _ in head) + " |")
        for b in body:
            print("| " + " | ".join(c.replace("|", "/") for c in b) + " |")
    else:
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
                  for i, h in enumerate(head[:-1])]
        line = "  ".join(h.ljust(w) for h, w in zip(head[:-1], widths))
        print(line)
        print("-" * len(line))
        for b in body:
            print("  ".join(c.ljust(w) for c, w in zip(b[:-1], widths)))
        notes = [f"  [{b[0]} / {b[1]}] {b[6]}" for b in body if b[6]]
        if notes:
            print("\nnotes:")
            print("\n".join(notes))


def record(path, section, metric_name, system, value, unit, better, note=""):
    try:
        v = float(value)
        v = int(v) if v == int(v) and abs(v) < 1e15 else v
    except (ValueError, OverflowError):
        v = value
    r = {"section": section, "metric": metric_name, "system": system, "value": v,
         "unit": unit, "better": better, "note": note}
    with open(path, "a") as f:
        f.write(json.dumps(r) + "\n")


def json_get(text, key):
    v = json.loads(text).get(key)
    print("" if v is None else v)


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "ports-free":
        return ports_free(args)
    if cmd == "ticks":
        ticks(args)
    elif cmd == "pss":
        pss(args)
    elif cmd == "descendants":
        descendants(args[0])
    elif cmd == "metric":
        metric(args[0], args[1])
    elif cmd == "rtpengine-totals":
        rtpengine_totals(args[0])
    elif cmd == "sipp":
        sipp_stats(args)
    elif cmd == "rtp":
        rtp_analyze(*args[:3])
    elif cmd == "pcap-packets":
        pcap_packets(args)
    elif cmd == "record":
        record(*args[:8])
    elif cmd == "json-get":
        json_get(args[0], args[1])
    elif cmd == "table":
        table(args[0], "--markdown" in args[1:])
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
