#!/usr/bin/env bash
# run.sh - start an entrokv tensor-parallel group (or any command on the
# communicator) with OpenMPI's mpirun, on this host or the hosts of a hostfile.
#
#   deploy/mpi/run.sh [-H HOSTFILE | --hosts h1,h2,...] [-np N] [options] -- COMMAND [ARGS...]
#
#   -H, --hostfile FILE  OpenMPI hostfile ("host slots=1" per line); ranks
#                        are placed one per host in file order (--map-by node),
#                        so rank 0 (the group's leader) runs on the first host
#   --hosts LIST         the same from a comma-separated list
#   -np N                ranks (default: the number of hosts, or 1)
#   --tcp-if NET         interface or CIDR for MPI's traffic (btl and oob),
#                        e.g. eth1 or 10.0.0.0/24 (default: OpenMPI's choice)
#   --rsh-agent PROG     what starts OpenMPI's daemon on another host
#                        (default ssh; the netns tests use a script that
#                        enters a network namespace)
#   --dry-run            print the mpirun command instead of running it
#
# What it sets so users do not have to:
#   - --oversubscribe: more ranks than cores is allowed (2-core CI runners);
#   - --bind-to none: each rank runs a thread pool; OpenMPI's default
#     binding (one core per rank for np <= 2) would serialize it;
#   - --enable-recovery: a rank that dies does not make mpirun kill the
#     others, so rank 0 sees the failure as an error from the communicator
#     (comm.h: EKV_EUNAVAILABLE within its timeout) and reports the group
#     unhealthy to the coordinator instead of vanishing;
#   - OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM) when run as root (containers, CI);
#   - every ENTROKV_* variable of this environment is exported to all ranks
#     (-x), so flags given as environment reach remote hosts too.
# MPIRUN overrides the mpirun binary; EKV_MPIRUN_ARGS adds raw mpirun options.
set -euo pipefail

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

hostfile="" hosts="" np="" tcp_if="" agent="" dry=0
while [ $# -gt 0 ]; do
    case "$1" in
    -H | --hostfile) hostfile=${2:?-H needs a file}; shift 2 ;;
    --hosts) hosts=${2:?--hosts needs a list}; shift 2 ;;
    -np | -n) np=${2:?-np needs a number}; shift 2 ;;
    --tcp-if) tcp_if=${2:?--tcp-if needs an interface or CIDR}; shift 2 ;;
    --rsh-agent) agent=${2:?--rsh-agent needs a program}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "run.sh: unknown option $1 (the command goes after --)" >&2; usage ;;
    esac
done
[ $# -gt 0 ] || { echo "run.sh: no command after --" >&2; usage; }
[ -z "$hostfile" ] || [ -z "$hosts" ] || { echo "run.sh: -H and --hosts exclude each other" >&2; exit 2; }
if [ -n "$hostfile" ] && [ ! -r "$hostfile" ]; then
    echo "run.sh: cannot read hostfile $hostfile" >&2; exit 2
fi

nhosts=0
if [ -n "$hostfile" ]; then
    nhosts=$(grep -cvE '^[[:space:]]*(#|$)' "$hostfile" || true)
elif [ -n "$hosts" ]; then
    nhosts=$(tr ',' '\n' <<<"$hosts" | grep -c .)
fi
if [ -z "$np" ]; then
    np=$((nhosts > 0 ? nhosts : 1))
fi
case "$np" in
'' | *[!0-9]* | 0) echo "run.sh: -np must be a positive integer, not '$np'" >&2; exit 2 ;;
esac

mpirun=${MPIRUN:-mpirun}
command -v "$mpirun" >/dev/null || { echo "run.sh: $mpirun not found (apt-get install openmpi-bin)" >&2; exit 2; }
args=(-np "$np" --oversubscribe --bind-to none --enable-recovery)
if [ -n "$hostfile" ]; then
    args+=(--hostfile "$hostfile" --map-by node)
elif [ -n "$hosts" ]; then
    # --host h1,h2 gives one slot per listed host
    args+=(--host "$hosts" --map-by node)
fi
if [ -n "$tcp_if" ]; then
    args+=(--mca btl_tcp_if_include "$tcp_if" --mca oob_tcp_if_include "$tcp_if")
fi
[ -z "$agent" ] || args+=(--mca plm_rsh_agent "$agent")
for v in $(compgen -e | grep '^ENTROKV_' || true); do
    args+=(-x "$v")
done
# shellcheck disable=SC2206 # EKV_MPIRUN_ARGS is a list of words on purpose
[ -z "${EKV_MPIRUN_ARGS:-}" ] || args+=(${EKV_MPIRUN_ARGS})
if [ "$(id -u)" -eq 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

if [ "$dry" = 1 ]; then
    printf '%q ' "$mpirun" "${args[@]}" "$@"
    echo
    exit 0
fi
exec "$mpirun" "${args[@]}" "$@"
