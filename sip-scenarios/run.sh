#!/usr/bin/env bash
# Runs one SIPp UAC/UAS scenario pair and prints SIPp's final statistics.
#
#   sip-scenarios/run.sh [options] SCENARIO [TARGET]
#
# SCENARIO: basic | info_message | cancel | callee_bye | hold | register | malformed
#           (files SCENARIO_uac.xml / SCENARIO_uas.xml in this directory).
# TARGET:   host:port the UAC sends to; default 127.0.0.1:5060 (callvault's default listen).
#
# For the call scenarios the UAS is started on --local-ip:--uas-port (default 5070, where
# config/examples/sipp-local.toml routes every call), so with callvault serving that config
# `run.sh basic` is a call through callvault.
# register and malformed are answered by callvault itself; their UAS files are stand-ins that
# only run with --direct. --direct runs the UAC straight at the local UAS (no callvault): the
# self-check of the scenarios.
#
# Options:
#   -m N              calls to make (default 1)
#   -r R              new calls per second (default 10)
#   -l L              at most L calls at once (default: SIPp's)
#   -t u1|t1          transport: UDP or TCP, one socket (default u1; malformed is UDP only)
#   -s USER           user dialled / registered (default 1002 for calls, 1001 for register)
#   -au USER -ap PW   digest credentials for register (default 1001 / secret)
#   --domain D        domain of the registered AOR (default example.com)
#   --direct          UAC -> local UAS directly, TARGET ignored
#   --no-uas          do not start a UAS (a UAS of your own answers at TARGET's route)
#   --uas-port P      UAS SIP port (default 5070)
#   --uac-port P      UAC SIP port (default 5061; 0 = let SIPp pick)
#   --uac-media-port P / --uas-media-port P   RTP ports the pcap is sent from and expected at
#                     (defaults 6000 / 6100; SIPp may also use P+2 for video)
#   --capture         count RTP received at each end with tcpdump on lo (needs root or
#                     CAP_NET_RAW); prints "RTP received: uac=N uas=M"
#   --local-ip IP     address SIPp binds for SIP and media (default 127.0.0.1; in the docker
#                     lab, the container's address)
#   --timeout S       give up after S seconds (default 120)
#   --out DIR         keep logs, stat CSVs and message traces in DIR (default: a temp dir)
#   -q                print only the summary lines, not SIPp's screens
#   -- ARGS           extra arguments for the UAC's sipp
#
# Output: SIPp's final screens (scenario counters, statistics) for each side, then one line per
# side, machine-readable:
#   RESULT side=uac exit=0 successful=1 failed=0 unexpected=0 retransmissions=0 timeouts=0
# Exit status: 0 when every started SIPp exited 0 (all calls successful), else 1.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cd "$here" # the scenarios name their audio as audio/... relative to this directory

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit "${1:-2}"; }

calls=1 rate=10 limit="" transport=u1 service="" auth_user=1001 auth_pass=secret
domain=example.com direct=0 start_uas=1 uas_port=5070 uac_port=5061
uac_mp=6000 uas_mp=6100 capture=0 timeout=120 out="" quiet=0 extra=() local_ip=127.0.0.1
scenario="" target=127.0.0.1:5060

while [ $# -gt 0 ]; do
    case "$1" in
        -m) calls=$2; shift 2 ;;
        -r) rate=$2; shift 2 ;;
        -l) limit=$2; shift 2 ;;
        -t) transport=$2; shift 2 ;;
        -s) service=$2; shift 2 ;;
        -au) auth_user=$2; shift 2 ;;
        -ap) auth_pass=$2; shift 2 ;;
        --domain) domain=$2; shift 2 ;;
        --direct) direct=1; shift ;;
        --no-uas) start_uas=0; shift ;;
        --uas-port) uas_port=$2; shift 2 ;;
        --uac-port) uac_port=$2; shift 2 ;;
        --uac-media-port) uac_mp=$2; shift 2 ;;
        --uas-media-port) uas_mp=$2; shift 2 ;;
        --capture) capture=1; shift ;;
        --local-ip) local_ip=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -q) quiet=1; shift ;;
        -h|--help) usage 0 ;;
        --) shift; extra=("$@"); break ;;
        -*) echo "run.sh: unknown option $1" >&2; usage ;;
        *)
            if [ -z "$scenario" ]; then scenario=$1
            else target=$1; fi
            shift ;;
    esac
done

[ -n "$scenario" ] || usage
uac_xml="${scenario}_uac.xml"
uas_xml="${scenario}_uas.xml"
[ -f "$uac_xml" ] || { echo "run.sh: no scenario $uac_xml in $here" >&2; exit 2; }
case "$transport" in u1|t1) ;; *) echo "run.sh: -t must be u1 or t1" >&2; exit 2 ;; esac
if [ "$scenario" = malformed ] && [ "$transport" != u1 ]; then
    echo "run.sh: malformed is UDP only (a truncated body cannot be framed on TCP)" >&2
    exit 2
fi
command -v sipp >/dev/null || { echo "run.sh: sipp not found (apt-get install sip-tester)" >&2; exit 2; }

if [ -z "$service" ]; then
    if [ "$scenario" = register ]; then service=$auth_user; else service=1002; fi
fi
# register and malformed are answered by callvault itself: their UAS is only a stand-in.
case "$scenario" in register|malformed) [ "$direct" = 1 ] || start_uas=0 ;; esac
if [ "$direct" = 1 ]; then
    start_uas=1
    target="$local_ip:$uas_port"
fi

if [ -z "$out" ]; then out=$(mktemp -d "${TMPDIR:-/tmp}/callvault-sipp.XXXXXX"); fi
mkdir -p "$out"

pids=()
cleanup() {
    # Stop only what this script started.
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

common=(-i "$local_ip" -t "$transport" -nostdin -timeout "${timeout}s" -timeout_error
        -trace_stat -fd 1 -trace_screen -trace_err)
# Full message traces only for small runs: they grow by kilobytes per call.
if [ "$calls" -le 20 ]; then common+=(-trace_msg); fi

uas_pid=""
if [ "$start_uas" = 1 ]; then
    [ -f "$uas_xml" ] || { echo "run.sh: no scenario $uas_xml" >&2; exit 2; }
    sipp -sf "$uas_xml" -p "$uas_port" -mi "$local_ip" -mp "$uas_mp" -m "$calls" \
        -key auth_user "$auth_user" -key auth_pass "$auth_pass" "${common[@]}" \
        -stf "$out/uas_stat.csv" -screen_file "$out/uas_screen.log" \
        -error_file "$out/uas_errors.log" -message_file "$out/uas_messages.log" \
        </dev/null >"$out/uas_stdout.log" 2>&1 &
    uas_pid=$!
    pids+=("$uas_pid")
    # Wait until the UAS socket is bound, so the first INVITE is not lost.
    if command -v ss >/dev/null; then
        proto=udp; [ "$transport" = t1 ] && proto=tcp
        for _ in $(seq 50); do
            if ss -Hln -A "$proto" "sport = :$uas_port" 2>/dev/null | grep -q .; then break; fi
            sleep 0.1
        done
    else
        sleep 1
    fi
fi

cap_pid=""
if [ "$capture" = 1 ]; then
    command -v tcpdump >/dev/null || { echo "run.sh: --capture needs tcpdump" >&2; exit 2; }
    # --immediate-mode: without it libpcap hands packets over in blocks on a 1 s timeout and
    # the last ones are lost when tcpdump is stopped soon after the call.
    iface=lo
    [ "$local_ip" = 127.0.0.1 ] || iface=any
    tcpdump -i "$iface" -n -U --immediate-mode -w "$out/rtp.pcap" "udp and (dst port $uac_mp or dst port $uas_mp)" \
        2>"$out/tcpdump.log" &
    cap_pid=$!
    pids+=("$cap_pid")
    # tcpdump prints "listening on lo" once the capture is live.
    for _ in $(seq 50); do grep -q "listening on" "$out/tcpdump.log" 2>/dev/null && break; sleep 0.1; done
fi

uac_args=("$target" -sf "$uac_xml" -mi "$local_ip" -mp "$uac_mp" -m "$calls" -r "$rate"
          -s "$service" -au "$auth_user" -ap "$auth_pass" -key domain "$domain" "${common[@]}"
          -stf "$out/uac_stat.csv" -screen_file "$out/uac_screen.log"
          -error_file "$out/uac_errors.log" -message_file "$out/uac_messages.log")
if [ -n "$limit" ]; then uac_args+=(-l "$limit"); fi
if [ "$uac_port" != 0 ]; then uac_args+=(-p "$uac_port"); fi

set +e
sipp "${uac_args[@]}" "${extra[@]}" </dev/null >"$out/uac_stdout.log" 2>&1
uac_rc=$?
uas_rc=0
if [ -n "$uas_pid" ]; then
    # The UAS ends after -m calls (plus its timewait); give it a little, then stop it.
    for _ in $(seq 100); do kill -0 "$uas_pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$uas_pid" 2>/dev/null; then
        kill "$uas_pid" 2>/dev/null
        echo "run.sh: UAS did not finish its $calls call(s); stopped" >&2
    fi
    wait "$uas_pid"
    uas_rc=$?
fi
set -e

if [ -n "$cap_pid" ]; then
    sleep 0.3 # let the last packets land in the capture
    kill -INT "$cap_pid" 2>/dev/null || true
    wait "$cap_pid" 2>/dev/null || true
    count() { tcpdump -n -r "$out/rtp.pcap" "udp and dst port $1" 2>/dev/null | wc -l; }
fi

stat_line() { # side exit-code: summarize the last row of SIPp's -trace_stat CSV
    python3 - "$out/$1_stat.csv" "$1" "$2" <<'EOF'
import csv, sys
path, side, rc = sys.argv[1:4]
try:
    rows = list(csv.reader(open(path), delimiter=";"))
    d = dict(zip(rows[0], rows[-1]))
except (OSError, IndexError):
    print(f"RESULT side={side} exit={rc} stats=missing")
    sys.exit(0)
g = lambda k: d.get(k + "(C)", "?")
print(f"RESULT side={side} exit={rc} successful={g('SuccessfulCall')} failed={g('FailedCall')} "
      f"unexpected={g('FailedUnexpectedMessage')} retransmissions={g('Retransmissions')} "
      f"timeouts={g('FailedTimeoutOnRecv')} regexp_failed={g('FailedRegexpDoesntMatch')}")
EOF
}

if [ "$quiet" = 0 ]; then
    for side in uac uas; do
        [ -f "$out/${side}_screen.log" ] || continue
        echo "===== $side ($([ $side = uac ] && echo "$uac_xml -> $target" || echo "$uas_xml on $local_ip:$uas_port")) ====="
        # The screen file holds the last scenario, statistics and repartition screens.
        cat "$out/${side}_screen.log"
        if [ -s "$out/${side}_errors.log" ]; then
            echo "----- $side errors -----"
            grep -v "Failed to delete FD from epoll" "$out/${side}_errors.log" | tail -20 || true
        fi
    done
fi
stat_line uac "$uac_rc"
if [ -n "$uas_pid" ]; then stat_line uas "$uas_rc"; fi
if [ -n "$cap_pid" ]; then
    echo "RTP received: uac=$(count "$uac_mp") uas=$(count "$uas_mp")"
fi
echo "logs: $out"

[ "$uac_rc" = 0 ] && [ "$uas_rc" = 0 ]
