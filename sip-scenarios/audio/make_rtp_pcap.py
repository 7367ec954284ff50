#!/usr/bin/env python3
"""Packetize a raw G.711 file (.ul / .al) into an RTP pcap that SIPp can `play_pcap_audio`.

Standard library only. Each packet is Ethernet/IPv4/UDP/RTP with a 160-byte payload (20 ms at
8000 Hz), consecutive sequence numbers and timestamps, marker bit on the first packet, and pcap
timestamps 20 ms apart (SIPp paces playback by the pcap timestamps). The addresses and ports in
the capture do not matter: SIPp rewrites them to the call's media destination.

Usage: make_rtp_pcap.py IN.ul OUT.pcap [--pt 0] [--ssrc 0x...]
"""
import argparse
import struct
import sys

FRAME = 160  # bytes per 20 ms at 8 kHz, 1 byte per sample
PTIME_US = 20_000
SRC_IP = bytes([127, 0, 0, 1])
DST_IP = bytes([127, 0, 0, 1])
SRC_PORT = 6000
DST_PORT = 6002
# A fixed start time keeps the output byte-identical across runs (files are committed).
BASE_SECS = 1_700_000_000


def ip_checksum(header: bytes) -> int:
    total = 0
    for i in range(0, len(header), 2):
        total += (header[i] << 8) | header[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def packet(seq: int, ts: int, ssrc: int, pt: int, marker: bool, payload: bytes) -> bytes:
    rtp = struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                      ts & 0xFFFFFFFF, ssrc) + payload
    udp_len = 8 + len(rtp)
    # UDP checksum 0 = "not computed", legal over IPv4 and accepted by SIPp.
    udp = struct.pack("!HHHH", SRC_PORT, DST_PORT, udp_len, 0) + rtp
    ip_len = 20 + udp_len
    ip_hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, seq & 0xFFFF, 0x4000, 64, 17, 0,
                         SRC_IP, DST_IP)
    ip_hdr = ip_hdr[:10] + struct.pack("!H", ip_checksum(ip_hdr)) + ip_hdr[12:]
    eth = bytes([0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]) + b"\x08\x00"
    return eth + ip_hdr + udp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--pt", type=int, default=0, help="RTP payload type (0 = PCMU, 8 = PCMA)")
    ap.add_argument("--ssrc", type=lambda s: int(s, 0), default=0x43A11B01)
    args = ap.parse_args()

    with open(args.input, "rb") as f:
        data = f.read()
    if len(data) < FRAME:
        print(f"{args.input}: shorter than one 20 ms frame", file=sys.stderr)
        return 1
    usable = len(data) - len(data) % FRAME  # drop a trailing partial frame

    with open(args.output, "wb") as out:
        # pcap global header: magic, v2.4, tz 0, sigfigs 0, snaplen 65535, linktype 1 (Ethernet)
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, off in enumerate(range(0, usable, FRAME)):
            pkt = packet(i, i * FRAME, args.ssrc, args.pt, i == 0, data[off:off + FRAME])
            t_us = i * PTIME_US
            out.write(struct.pack("<IIII", BASE_SECS + t_us // 1_000_000, t_us % 1_000_000,
                                  len(pkt), len(pkt)))
            out.write(pkt)
    print(f"{args.output}: {usable // FRAME} packets, {usable // FRAME * 20} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
