#!/usr/bin/env bash
# The protection's full evaluation on the built-in pair, as the docs quote it:
#   1. `sophon demo` (pretrain, protect, the 4-attack check) with the given options,
#   2. the default attack grid (30 attacks) and the `methods` grid on the result,
#   3. the held-out red-team attacks (scripts/red_team.py),
# then one line per part: how many attacks escape. Usage:
#   bash scripts/evaluate_protection.sh OUT [sophon demo options, e.g. --preset strong --seed 1]
# RED_TEAM=0 skips part 3 (on MNIST as the restricted domain it takes about an hour on 2 cores).
# Needs the Quickstart's .venv (bash scripts/setup.sh). Everything lands under OUT/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p "$1"
out="$(cd "$1" && pwd)"; shift  # absolute: the summary below runs from /
venv="$(cd "${VENV:-.venv}" && pwd)"
"$venv/bin/sophon" demo --no-progress --out "$out" "$@" | tee "$out/demo.txt"
# the grids attack the demo's own domains (they may be swapped with --set data.original.name=...)
read -r original restricted < <("$venv/bin/python" -c "import sys, yaml; d = yaml.safe_load(open(sys.argv[1]))['data']; print(d['original']['name'], d['restricted']['name'])" "$out/config.yaml")
for grid in default methods; do
  "$venv/bin/sophon" attack --protected "$out/protected.safetensors" --unprotected "$out/pretrained.safetensors" \
    --original "builtin:$original" --restricted "builtin:$restricted" --preset "$grid" --out "$out/grid_$grid" \
    --no-progress > "$out/grid_$grid.txt"
done
[ "${RED_TEAM:-1}" = 0 ] || "$venv/bin/python" scripts/red_team.py --protected "$out/protected.safetensors" --unprotected "$out/pretrained.safetensors" \
  --original "$original" --restricted "$restricted" --out "$out/red_team" --threads "$("$venv/bin/python" -c "import torch; print(torch.get_num_threads())")" --no-progress > "$out/red_team.txt"
(cd / && "$venv/bin/python" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
demo = json.loads((out / "report.json").read_text())
print(f"demo check: {'PASS' if demo['checks']['protected_passes'] else 'FAIL'}; original-domain {demo['original_domain']}")
for grid in ("default", "methods"):
    attacks = json.loads((out / f"grid_{grid}" / "report.json").read_text())["attacks"]
    escaped = [a["name"] for a in attacks if a["summary"]["escape"]]
    print(f"grid {grid}: {len(escaped)} of {len(attacks)} attacks escape" + (": " + ", ".join(escaped) if escaped else ""))
red = out / "red_team" / "red_team.json"
if red.exists():
    rows = json.loads(red.read_text())["rows"]
    escaped = [r["name"] for r in rows if r.get("escape")]
    print(f"red team: {len(escaped)} of {len(rows)} held-out attacks escape" + (": " + ", ".join(escaped) if escaped else ""))
else:
    print("red team: not run (RED_TEAM=0)")
PY
) | tee "$out/escapes.txt"
