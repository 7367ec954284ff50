#!/usr/bin/env bash
# Regenerates the audio the SIPp scenarios send (the outputs are committed; run this only to
# change them). Needs espeak-ng, sox and python3 (standard library only).
#   speech-5s.ul / speech-10s.ul     raw µ-law 8000 Hz mono, for <exec rtp_stream="...">
#   pcmu-5s.pcap / pcmu-10s.pcap     the same audio as RTP PT 0, 20 ms packets, for play_pcap_audio
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

text="This is callvault test audio. One two three four five six seven eight nine ten.\
 The quick brown fox jumps over the lazy dog. Testing the anchored media path, both directions."
espeak-ng -v en -s 150 -w "$tmp/speech.wav" "$text"

for secs in 5 10; do
    # Resample to 8 kHz mono, pad with silence and cut to an exact length so the packet count is
    # known (secs * 50), then encode as headerless µ-law.
    sox "$tmp/speech.wav" -r 8000 -c 1 "$tmp/speech-$secs.wav" pad 0 "$secs"
    sox "$tmp/speech-$secs.wav" -e u-law -t ul "speech-${secs}s.ul" trim 0 "$secs"
    python3 make_rtp_pcap.py "speech-${secs}s.ul" "pcmu-${secs}s.pcap" --pt 0
done
