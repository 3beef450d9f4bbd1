#!/usr/bin/env bash
# `make test-integration`: real services, on this machine (as root; installs what it needs).
#   1. SLURM: ci/slurm-local.sh starts a one-node cluster; tests/integration/test_slurm.py runs the
#      demo's exp0, teacher, grounding and gate through --profile profiles/slurm and checks sacct.
#   2. Label Studio: a server in its own venv ($VLMREL_LS_VENV, default ~/.cache/vlmrel/...);
#      tests/integration/test_labelstudio.py does the review round trip through its API.
# Prints the time of each part; exits non-zero when either part failed (both always run).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
LS_VERSION=1.23.2
export VLMREL_INTEGRATION=1
export VLMREL_LS_VENV=${VLMREL_LS_VENV:-$HOME/.cache/vlmrel/label-studio-$LS_VERSION}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

now() { date +%s; }
declare -A took
status=0
start=$(now)

install_label_studio() {
    if [ -x "$VLMREL_LS_VENV/bin/label-studio" ]; then return 0; fi
    rm -rf "$VLMREL_LS_VENV"
    python3 -m venv "$VLMREL_LS_VENV" &&
        "$VLMREL_LS_VENV/bin/pip" install --quiet --upgrade pip &&
        "$VLMREL_LS_VENV/bin/pip" install --quiet "label-studio==$LS_VERSION"
}

# setup: the cluster and the Label Studio venv, side by side
t=$(now)
mkdir -p results/integration
install_label_studio >results/integration/ls-install.log 2>&1 &
ls_pid=$!
ci/slurm-local.sh start || status=1
wait "$ls_pid" || { echo "Label Studio install failed:"; tail -20 results/integration/ls-install.log; status=1; }
took[setup]=$(($(now) - t))
echo "== setup (cluster, Label Studio venv): ${took[setup]} s"

t=$(now)
"$BIN/pytest" tests/integration/test_slurm.py -s -v -p no:cacheprovider || status=1
took[slurm]=$(($(now) - t))
echo "== SLURM part: ${took[slurm]} s"

t=$(now)
"$BIN/pytest" tests/integration/test_labelstudio.py -s -v -p no:cacheprovider || status=1
took[labelstudio]=$(($(now) - t))
echo "== Label Studio part: ${took[labelstudio]} s"

echo "== integration: setup ${took[setup]} s, SLURM ${took[slurm]} s, Label Studio ${took[labelstudio]} s," \
    "total $(($(now) - start)) s"
if [ -f results/integration/slurm-times.json ]; then
    echo "== exp0 and the rest, local vs cluster (s):"
    cat results/integration/slurm-times.json
fi
exit $status
