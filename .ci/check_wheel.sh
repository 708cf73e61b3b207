#!/usr/bin/env bash
# Builds the wheel from the current venv's torch, installs it into a FRESH venv the way a user
# would (torch first, then the wheel with its dependencies, no checkout on the path), and runs the
# commands a new user runs first. Catches what an editable install hides: files missing from the
# wheel (kernels, checkpoints, task YAMLs, the lm-eval startup hook), dependencies missing from
# the metadata, and `rcd demo` without the plot extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

torch_version=$("$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])")
"$PYTHON" -m pip wheel --no-build-isolation --no-deps -q -w "$work/dist" .
wheel=$(ls "$work"/dist/rcd_ext-*.whl)
echo "built $(basename "$wheel")"
version=$(basename "$wheel" | cut -d- -f2)
for member in rcd_ext/_C.so rcd_ext/demo/checkpoints/rcd/config.json \
    rcd_ext/integrations/lm_eval_tasks/rcd_gsm8k_cot.yaml \
    "rcd_ext-${version}.data/purelib/rcd_ext_lm_eval.pth" rcd_ext_lm_eval_startup/__init__.py; do
  "$PYTHON" - "$wheel" "$member" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert sys.argv[2] in names, f"{sys.argv[2]} is missing from the wheel"
PY
done

"$PYTHON" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install -q "torch==$torch_version"
"$venv_python" -m pip install -q "$wheel"
cd "$work"  # nothing of the checkout on sys.path from here on

"$work/venv/bin/rcd" info
# without the plot extra the demo must say that no PNG was written, and write the JSON
"$work/venv/bin/rcd" demo --out "$work/demo" --test-size 50 > "$work/demo.log" 2>&1 \
  || { cat "$work/demo.log"; exit 1; }
cat "$work/demo.log"
test -s "$work/demo/results.json"
test ! -e "$work/demo/demo.png"
if grep -i "^wrote" "$work/demo.log" | grep -q "demo.png"; then
  echo "rcd demo claims a PNG it did not write"; exit 1
fi

# the plain lm-eval CLI finds the models once lm-eval is installed next to the wheel
"$venv_python" -m pip install -q "${wheel}[lm-eval]"
"$venv_python" - <<'PY'
import lm_eval.api.registry as registry
for name in ("rcd", "seqd"):
    model_class = registry.get_model(name)
    print(f"lm-eval resolves --model {name} to {model_class.__module__}.{model_class.__name__}")
PY
checkpoint=$("$venv_python" -c "from importlib.resources import files; print(files('rcd_ext.demo') / 'checkpoints' / 'rcd')")
"$work/venv/bin/lm_eval" --model rcd --model_args "pretrained=$checkpoint" \
  --tasks rcd_coupled_choices --limit 8 --include_path "$("$work/venv/bin/rcd" eval tasks-dir)" \
  --output_path "$work/lm-eval-out" > "$work/lm-eval.log" 2>&1 || { cat "$work/lm-eval.log"; exit 1; }
grep -rq '"model_device": "cpu"' "$work/lm-eval-out" || { echo "no lm-eval results written"; exit 1; }
tail -4 "$work/lm-eval.log"
echo "wheel check passed"
