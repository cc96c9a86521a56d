#!/usr/bin/env bash
# test_comm_netns.sh - the MPI communicator across two "hosts": two network
# namespaces joined by a veth pair (tests/comm/netns_hosts.sh), mpirun
# started by deploy/mpi/run.sh in the first with a hostfile of both
# addresses; OpenMPI's rsh agent enters the second namespace, and the ranks
# talk over TCP between the veth addresses only (no shared memory). Checks
# every collective across them, then a rank killed on the second host.
#
# Usage: test_comm_netns.sh TEST_COMM_MPI REPO_ROOT
# Exit 77 (ctest SKIP) where namespaces cannot be made.
set -u
prog=$1
root=$2
. "$root/tests/comm/netns_hosts.sh"
netns_hosts_up 2 || { echo "SKIP: $NETNS_SKIP"; exit 77; }
out=$(mktemp)
trap 'netns_hosts_down; rm -f "$out" "$out.err"' EXIT
fail=0
run() {
    OMPI_MCA_btl=self,tcp timeout -k 5 60 \
        bash -c '. "$0/tests/comm/netns_hosts.sh"; NETNS_TAG=$1; shift; netns_run 1 "$@"' \
        "$root" "$NETNS_TAG" "$root/deploy/mpi/run.sh" -H "$NETNS_HOSTFILE" \
        --rsh-agent "$NETNS_AGENT" --tcp-if "$NETNS_CIDR" -- "$@"
}
rx() { ip netns exec "${NETNS_TAG}h2" cat /sys/class/net/eth0/statistics/rx_bytes; }
rx0=$(rx)
if ! run "$prog" collectives >"$out" 2>"$out.err" ||
    [ "$(grep -c 'collectives ok' "$out")" -ne 2 ] ||
    ! grep -q 'rank 0 of 2: collectives ok .* on h1$' "$out" ||
    ! grep -q 'rank 1 of 2: collectives ok .* on h2$' "$out"; then
    echo "FAIL collectives across two namespaces"; cat "$out" "$out.err"; fail=1
else
    echo "ok   collectives across two namespaces: $(tr '\n' ' ' <"$out")"
fi
# the data went over the veth: host 2 received at least what rank 0 sent
sent0=$(sed -n 's/rank 0 of 2: collectives ok (\([0-9]*\) bytes.*/\1/p' "$out")
got=$(($(rx) - rx0))
if [ -z "$sent0" ] || [ "$got" -lt "$sent0" ]; then
    echo "FAIL host 2's eth0 received $got bytes, rank 0 sent ${sent0:-?}"; fail=1
else
    echo "ok   host 2's eth0 received $got bytes (rank 0's collectives: $sent0)"
fi
run "$prog" dead 2000 >"$out" 2>"$out.err"
if ! grep -q 'rank 0 of 2: peer failure seen' "$out" || grep -q 'test_comm_mpi.c:' "$out.err"; then
    echo "FAIL dead peer across namespaces"; cat "$out" "$out.err"; fail=1
else
    echo "ok   dead peer across namespaces: $(grep 'peer failure' "$out")"
fi
exit $fail
