#!/usr/bin/env bash
# Before/after PSK bootstrap throughput: bench/bootstrap.py of this checkout
# and of an earlier commit, alternated in the same session so that a change
# in the machine's speed hits both alike.
#
#   bench/before_after.sh BASE_COMMIT [local|tls] [ROUNDS]
#
# The earlier commit gets its own worktree and virtual environment under
# ${BEFORE_AFTER_DIR:-/tmp/mipsec-before}.  With ``local`` both sides run the
# same deployment, an HA in the HAC's process (deployment model 1): before
# issue 6, the bench's ``local`` mode ran no HA at all (the ``local``
# transport confirmed SAs that no HA held -- the fail-open path issue 6
# removed), so the earlier bench is given the same ``[local_ha]`` tables the
# current one writes.  Prints each run's rows (MNs | handshake/s |
# bootstrap/s | ...) and, at the end, the mean PSK bootstraps/s per side.
set -euo pipefail
base=${1:?usage: before_after.sh BASE_COMMIT [local|tls] [ROUNDS]}
mode=${2:-local}
rounds=${3:-4}
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${BEFORE_AFTER_DIR:-/tmp/mipsec-before}

if [[ ! -d $dir/.venv ]]; then
  git -C "$here" worktree add -f --detach "$dir" "$base" >/dev/null
  python3 -m venv "$dir/.venv"
  "$dir/.venv/bin/python" -m pip install -q -e "$dir[test]"
fi
git -C "$dir" checkout -q -f "$base"
# A base with other dependencies than the venv was built for: install again.
stamp=$(sha256sum "$dir/pyproject.toml" | cut -d' ' -f1)
if [[ $(cat "$dir/.venv/.pyproject.sha256" 2>/dev/null) != "$stamp" ]]; then
  "$dir/.venv/bin/python" -m pip install -q -e "$dir[test]"
  echo "$stamp" >"$dir/.venv/.pyproject.sha256"
fi
# The same in-process HA as this checkout's bench (see above).
python3 "$here/bench/tools/before_patch.py" "$dir/bench/bootstrap.py"

# --psk-only on each side whose bench has it: the same phases on both sides
# (an EAP-TLS phase between PSK slices changes what the PSK slices see).
extra=()
if grep -q -- '--psk-only' "$here/bench/bootstrap.py"; then extra=(--psk-only); fi
extra_before=()
if grep -q -- '--psk-only' "$dir/bench/bootstrap.py"; then extra_before=(--psk-only); fi
rows=$(mktemp)
trap 'rm -f "$rows"' EXIT
for i in $(seq "$rounds"); do
  for side in before after; do
    if [[ $side == before ]]; then d=$dir; args=("${extra_before[@]}"); else d=$here; args=("${extra[@]}"); fi
    echo "== $side $i"
    (cd "$d" && .venv/bin/python bench/bootstrap.py --provisioning "$mode" \
      --concurrency 1,16 --duration 3 "${args[@]}" 2>&1) |
      grep -E '^ +[0-9]+ \|' | sed "s/^/$side|/" | tee -a "$rows"
  done
done
echo "== PSK bootstraps ($mode provisioning, $rounds rounds): per side and MN count"
# Throughput is the budget's figure; CPU per bootstrap (server = HAC, + HA
# with tls; from /proc in the bench) moves far less with the machine's
# speed, so it tells a real cost change from noise.
python3 - "$rows" <<'PY'
import re, statistics, sys
acc = {}
for line in open(sys.argv[1]):
    side, _, rest = line.partition("|")
    cols = rest.split("|")
    cpu = re.findall(r"(\d+) / +(\d+)", rest)
    a = acc.setdefault((int(cols[0]), side), ([], [], []))
    a[0].append(float(cols[2]))
    if len(cpu) >= 2:
        a[1].append(int(cpu[0][1]))
        a[2].append(int(cpu[1][1]))
print(" MNs | side   | mean /s | median /s | server CPU µs/op | client CPU µs/op")
for (mns, side), (rate, srv, cli) in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1] != "before")):
    print(f" {mns:3d} | {side:6s} | {statistics.mean(rate):7.1f} | {statistics.median(rate):9.1f} "
          f"| {statistics.mean(srv) if srv else float('nan'):16.0f} | {statistics.mean(cli) if cli else float('nan'):16.0f}")
PY
