#!/usr/bin/env bash
# mutations_apply.sh - every planted bug in scripts/mutations/ still applies
# to the tree (git apply --check). A patch that no longer applies is a bug
# the suite has silently stopped planting: mutate.sh reports it INVALID only
# when someone runs it, and CI's --fast subset runs six. This catches the
# drift in the unit stage, in a second, when the change that causes it lands.
set -euo pipefail
root=${1:?usage: mutations_apply.sh REPO_ROOT}
cd "$root"
bad=0
for p in scripts/mutations/*.patch; do
    if ! out=$(git apply --check "$p" 2>&1); then
        echo "does not apply: $p"
        echo "$out" | sed 's/^/    /'
        bad=$((bad + 1))
    fi
done
n=$(ls scripts/mutations/*.patch | wc -l)
echo "mutations_apply: $((n - bad)) of $n patches apply"
[ "$bad" -eq 0 ]
