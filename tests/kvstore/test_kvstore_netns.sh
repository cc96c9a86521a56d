#!/usr/bin/env bash
# test_kvstore_netns.sh - three `entrokv kvstore` daemons, each in a network
# namespace of its own, and the client in a fourth: a bridge in the client's
# namespace joins one veth pair per daemon (10.213.0.1 the client,
# 10.213.0.2-4 the daemons). Nothing is added to this host's own namespace,
# so no traffic can leave. UCX_TLS=tcp, and UCX is limited to those devices.
# The third daemon's link is throttled (tbf, daemon -> client) so a kill -9
# lands mid-transfer. The checks themselves are in kvstore_netns_client.c.
#
# Usage: test_kvstore_netns.sh ENTROKV KVSTORE_NETNS_CLIENT
# Exit 77 (ctest SKIP) where namespaces cannot be created (not root, no
# iproute2, no netns / veth / bridge support).
set -u
bin=$1
client=$2
skip() { echo "SKIP: $*"; exit 77; }

[ "$(id -u)" -eq 0 ] || skip "network namespaces need root"
command -v ip >/dev/null || skip "ip (iproute2) is not installed"

tag="ekv$$"
tmp=$(mktemp -d)
pids=()
nss=()
cleanup() {
    for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null; kill -9 "$p" 2>/dev/null; done
    wait 2>/dev/null
    for ns in "${nss[@]}"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP PIPE

# namespaces left by an earlier run that was killed before its cleanup ran
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^ekv[0-9]+[c123]$'); do
    owner=${ns#ekv}
    owner=${owner%?}
    kill -0 "$owner" 2>/dev/null || ip netns del "$ns" 2>/dev/null
done

cns="${tag}c"
ip netns add "$cns" 2>"$tmp/err" || skip "ip netns add failed: $(cat "$tmp/err")"
nss+=("$cns")
ip netns exec "$cns" ip link set lo up
ip netns exec "$cns" ip link add br0 type bridge 2>"$tmp/err" || skip "no bridge: $(cat "$tmp/err")"
ip netns exec "$cns" ip addr add 10.213.0.1/24 dev br0
ip netns exec "$cns" ip link set br0 up
for i in 1 2 3; do
    ns="${tag}$i"
    ip netns add "$ns" 2>"$tmp/err" || skip "ip netns add failed: $(cat "$tmp/err")"
    nss+=("$ns")
    ip netns exec "$cns" ip link add "a$i" type veth peer name "p$i" netns "$ns" 2>"$tmp/err" ||
        skip "veth pairs unavailable: $(cat "$tmp/err")"
    ip netns exec "$cns" ip link set "a$i" master br0
    ip netns exec "$cns" ip link set "a$i" up
    ip netns exec "$ns" ip addr add "10.213.0.$((i + 1))/24" dev "p$i"
    ip netns exec "$ns" ip link set "p$i" up
    ip netns exec "$ns" ip link set lo up
done
# daemon 3 -> client at 40 Mbit/s: a 4 MiB get takes ~0.8 s
if ! ip netns exec "${tag}3" tc qdisc add dev p3 root tbf rate 40mbit burst 64kb latency 2s \
        2>"$tmp/err"; then
    echo "warning: no tbf ($(cat "$tmp/err")); the kill may land after the transfer"
fi

echo "test-netns-token" >"$tmp/token"
export UCX_TLS=tcp
peers=""
pidlist=""
for i in 1 2 3; do
    UCX_NET_DEVICES="p$i" ip netns exec "${tag}$i" "$bin" kvstore \
        --listen "10.213.0.$((i + 1)):7411" --capacity-mb 256 --auth-token-file "$tmp/token" \
        >"$tmp/d$i.out" 2>"$tmp/d$i.log" &
    pids+=($!)
    peers="$peers${peers:+,}10.213.0.$((i + 1)):7411"
    pidlist="$pidlist${pidlist:+,}$!"
done
for i in 1 2 3; do
    for _ in $(seq 50); do
        grep -q "listening on" "$tmp/d$i.out" && break
        sleep 0.1
    done
    grep -q "listening on" "$tmp/d$i.out" || { echo "FAIL: daemon $i did not start"; cat "$tmp/d$i.log"; exit 1; }
done

UCX_NET_DEVICES=br0 timeout 120 ip netns exec "$cns" "$client" "$tmp/token" "$peers" "$pidlist"
rc=$?

# daemons 1 and 2 must still be up and exit cleanly on SIGTERM; 3 was killed
for i in 1 2; do
    p=${pids[$((i - 1))]}
    kill -TERM "$p"
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    wait "$p" 2>/dev/null
    st=$?
    if [ "$st" -ne 0 ]; then
        echo "FAIL: daemon $i exited with $st after SIGTERM"
        rc=1
    fi
done
if [ "$rc" -eq 0 ]; then
    echo "ok   test_kvstore_netns"
else
    for i in 1 2 3; do echo "--- daemon $i log"; head -n 20 "$tmp/d$i.log"; done
    echo "FAIL test_kvstore_netns (status $rc)"
fi
exit "$rc"
