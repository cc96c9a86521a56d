# shellcheck shell=bash disable=SC2034,SC2016
# netns_hosts.sh - sourced by tests: N network namespaces that act as N hosts
# for mpirun (issue 16's multi-host tests; the TP forward's tests reuse it).
#
#   . tests/comm/netns_hosts.sh
#   netns_hosts_up 2 || exit 77     # skips where namespaces cannot be made
#   netns_run 1 deploy/mpi/run.sh -H "$NETNS_HOSTFILE" --rsh-agent "$NETNS_AGENT" \
#       --tcp-if "$NETNS_CIDR" -- prog ...
#   netns_hosts_down                 # also run by the EXIT trap it installs
#
# Host i (1..N) is namespace ${NETNS_TAG}h$i with address 10.216.0.$i/24 on a
# veth joined to a bridge in host 1's namespace (so host 1 also plays the
# switch). Nothing is added to this machine's own namespace: no traffic can
# leave. $NETNS_HOSTFILE lists the N addresses (slots=1), $NETNS_AGENT is
# the rsh agent OpenMPI calls as `agent HOST COMMAND...`: it runs the command
# in that host's namespace (as ssh would on that host), so mpirun started in
# host 1 (netns_run 1 ...) starts its daemons in the others. Each namespace
# also gets its own UTS (hostname h$i) so OpenMPI sees distinct nodes.
# Needs root and iproute2; netns_hosts_up returns 1 with $NETNS_SKIP set otherwise.

NETNS_TAG="ekvh$$"
NETNS_CIDR=10.216.0.0/24
NETNS_DIR=""
NETNS_N=0

netns_hosts_down() {
    local i
    for ((i = 1; i <= NETNS_N; i++)); do
        # kill what is still running inside (mpirun's daemons, ranks)
        local pids
        pids=$(ip netns pids "${NETNS_TAG}h$i" 2>/dev/null || true)
        # shellcheck disable=SC2086 # one pid per word
        [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
        ip netns del "${NETNS_TAG}h$i" 2>/dev/null || true
    done
    NETNS_N=0
    [ -z "$NETNS_DIR" ] || rm -rf "$NETNS_DIR"
    NETNS_DIR=""
}

netns_hosts_up() {
    local n=$1 i err
    NETNS_SKIP=""
    if [ "$(id -u)" -ne 0 ]; then NETNS_SKIP="network namespaces need root"; return 1; fi
    if ! command -v ip >/dev/null; then NETNS_SKIP="ip (iproute2) is not installed"; return 1; fi
    if ! command -v unshare >/dev/null; then NETNS_SKIP="unshare (util-linux) is missing"; return 1; fi
    # namespaces left by a run killed before its cleanup
    local ns owner
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^ekvh[0-9]+h[0-9]+$'); do
        owner=${ns#ekvh}
        owner=${owner%h*}
        kill -0 "$owner" 2>/dev/null || ip netns del "$ns" 2>/dev/null
    done
    NETNS_DIR=$(mktemp -d)
    trap netns_hosts_down EXIT
    local h1="${NETNS_TAG}h1"
    for ((i = 1; i <= n; i++)); do
        if ! err=$(ip netns add "${NETNS_TAG}h$i" 2>&1); then
            NETNS_SKIP="ip netns add failed: $err"; netns_hosts_down; return 1
        fi
        NETNS_N=$i
        ip netns exec "${NETNS_TAG}h$i" ip link set lo up
    done
    if ! err=$(ip netns exec "$h1" ip link add br0 type bridge 2>&1); then
        NETNS_SKIP="no bridge: $err"; netns_hosts_down; return 1
    fi
    ip netns exec "$h1" ip link set br0 up
    ip netns exec "$h1" ip addr add 10.216.0.1/24 dev br0
    for ((i = 2; i <= n; i++)); do
        if ! err=$(ip netns exec "$h1" ip link add "a$i" type veth peer name eth0 \
                netns "${NETNS_TAG}h$i" 2>&1); then
            NETNS_SKIP="veth pairs unavailable: $err"; netns_hosts_down; return 1
        fi
        ip netns exec "$h1" ip link set "a$i" master br0
        ip netns exec "$h1" ip link set "a$i" up
        ip netns exec "${NETNS_TAG}h$i" ip addr add "10.216.0.$i/24" dev eth0
        ip netns exec "${NETNS_TAG}h$i" ip link set eth0 up
    done
    NETNS_HOSTFILE="$NETNS_DIR/hostfile"
    NETNS_AGENT="$NETNS_DIR/agent.sh"
    : >"$NETNS_HOSTFILE"
    for ((i = 1; i <= n; i++)); do
        echo "10.216.0.$i slots=1" >>"$NETNS_HOSTFILE"
    done
    cat >"$NETNS_AGENT" <<AGENT
#!/bin/sh
# OpenMPI's rsh agent for the namespace hosts: agent [ssh options] HOST COMMAND...
while [ \$# -gt 0 ]; do case "\$1" in -*) shift ;; *) break ;; esac; done
host=\$1; shift
case "\$host" in
10.216.0.[0-9]*) i=\${host#10.216.0.} ;;
*) echo "agent.sh: unknown host \$host" >&2; exit 255 ;;
esac
exec ip netns exec "${NETNS_TAG}h\$i" unshare --uts sh -c "hostname h\$i; \$*"
AGENT
    chmod +x "$NETNS_AGENT"
    export NETNS_HOSTFILE NETNS_AGENT NETNS_CIDR
    return 0
}

# netns_run I COMMAND...: COMMAND on host I (its namespace and hostname).
netns_run() {
    local i=$1
    shift
    ip netns exec "${NETNS_TAG}h$i" unshare --uts sh -c 'hostname "h$0"; exec "$@"' "$i" "$@"
}
