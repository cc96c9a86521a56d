#!/usr/bin/env bash
# test_tp_netns.sh - the tensor-parallel forward across two "hosts": two
# network namespaces (tests/comm/netns_hosts.sh), `entrokv bench tp` started
# by deploy/mpi/run.sh from a hostfile, one rank in each namespace, TCP only.
# Its greedy tokens must equal those of the same group of 2 on one host
# (shared memory): the allreduce sums in rank order (comm.h), so the
# transport cannot change a bit. Also checks that host 2's veth carried at
# least the bytes rank 0 sent.
#
# Usage: test_tp_netns.sh ENTROKV MODEL REPO_ROOT
# Exit 77 (ctest SKIP) where namespaces cannot be made.
set -u
bin=$1
model=$2
root=$3
. "$root/tests/comm/netns_hosts.sh"
netns_hosts_up 2 || { echo "SKIP: $NETNS_SKIP"; exit 77; }
out=$(mktemp)
trap 'netns_hosts_down; rm -f "$out" "$out".*' EXIT
args=(bench tp --model "$model" --n-decode 6 --prompt-tokens 24)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if ! timeout -k 5 120 mpirun --oversubscribe --bind-to none -np 2 "$bin" "${args[@]}" \
        >"$out.local" 2>"$out.err"; then
    echo "FAIL: the one-host group"; cat "$out.local" "$out.err"; exit 1
fi
rx() { ip netns exec "${NETNS_TAG}h2" cat /sys/class/net/eth0/statistics/rx_bytes; }
rx0=$(rx)
if ! OMPI_MCA_btl=self,tcp timeout -k 5 120 \
        bash -c '. "$0/tests/comm/netns_hosts.sh"; NETNS_TAG=$1; shift; netns_run 1 "$@"' \
        "$root" "$NETNS_TAG" "$root/deploy/mpi/run.sh" -H "$NETNS_HOSTFILE" \
        --rsh-agent "$NETNS_AGENT" --tcp-if "$NETNS_CIDR" -- "$bin" "${args[@]}" \
        >"$out.netns" 2>"$out.err"; then
    echo "FAIL: the two-host group"; cat "$out.netns" "$out.err"; exit 1
fi
got=$(($(rx) - rx0))
python3 - "$out.local" "$out.netns" "$got" <<'PY'
import json, sys
def line(p):
    ls = [json.loads(l) for l in open(p) if l.startswith('{"bench":"tp"')]
    assert len(ls) == 1, (p, ls)
    return ls[0]
a, b, got = line(sys.argv[1]), line(sys.argv[2]), int(sys.argv[3])
assert a["np"] == b["np"] == 2
assert a["tokens"] == b["tokens"], ("tokens differ across hosts", a["tokens"], b["tokens"])
assert a["bytes_per_token_per_rank"] == b["bytes_per_token_per_rank"]
sent0 = b["bytes_per_token_rank0"] * b["decode_tokens"]
assert got >= sent0, ("host 2 received fewer bytes than rank 0 sent while decoding", got, sent0)
print("ok: two hosts gave the one-host tokens", b["tokens"], "host 2 received", got, "bytes")
PY
