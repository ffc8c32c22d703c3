#!/usr/bin/env bash
# GPU check of --device-map / --max-memory (run by hand on a CUDA machine; not collected by pytest).
#
# 1. saves a random-init Qwen2-VL of a published size (default 2b, bfloat16) around the bundled
#    world model's tokenizer and processor, so the world's edit cases spell in its vocabulary;
# 2. benches a few FT and DECODE edits on it twice: --device cuda and --device-map auto (restore
#    checked bit for bit after every edit); the quality columns must be equal, and seconds per edit
#    and peak memory are printed for both; then the same bench under torchrun --nproc_per_node 1
#    (the quality columns must equal the plain run's);
# 3. --device-map auto with --max-memory forcing part of the model off the GPU: the load must be
#    refused, naming the first offloaded weight (exit status 2);
# 4. mke-plugins scale --device-map auto on the same size (one capped edit per method, digests).
#
# Usage: bash tests/gpu/check_device_map.sh [OUT_DIR]     (SIZE=7b CASES=5 STEPS=10 to change)
# CPU dry run of the script itself: SIZE=test DEVICE=cpu DTYPE=float32 HPARAMS=world MAXMEM=cpu=100KB
# Fits in about 8 minutes on one H100 at the defaults (2b, 3 cases, 5 steps).
set -u -o pipefail
OUT=${1:-${OUT:-/tmp/mke-gpu-check}}
SIZE=${SIZE:-2b}
DTYPE=${DTYPE:-bfloat16}
CASES=${CASES:-3}
STEPS=${STEPS:-5}
DEVICE=${DEVICE:-cuda}                    # the one-device baseline of step 2
HPARAMS=${HPARAMS:-qwen2vl-7b}            # bundled YAML key (28 decoder layers, as the 2b and 7b sizes)
MAXMEM=${MAXMEM:-0=1GiB,cpu=64GiB}        # step 3: too little GPU memory for the model
export PYTHONPATH="$PWD:$PWD/hooks${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
MODEL="$OUT/random-qwen2-vl-$SIZE"
METHODS="FT[max_steps=$STEPS],DECODE[max_steps=$STEPS]"
status=0
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
say "1. random-init qwen2-vl $SIZE ($DTYPE) saved to $MODEL"
python3 - "$MODEL" "$SIZE" "$DTYPE" <<'PY' || exit 1
import sys, time
import torch
from mke_plugins import world
from mke_plugins.adapters.processors import load_processor
from mke_plugins.bench.scale import _config
from mke_plugins.hparams import to_dtype

out, size, dtype = sys.argv[1:4]
proc = load_processor(world.model_path())
cfg, cls = _config("qwen2-vl", size, proc.tokenizer)
torch.manual_seed(0)
t = time.perf_counter()
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = cls._from_config(cfg, dtype=to_dtype(dtype))
model.save_pretrained(out)
proc.save_pretrained(out)
n = sum(p.numel() for p in model.parameters())
print(f"built and saved {n / 1e9:.2f} B parameters in {time.perf_counter() - t:.0f} s")
PY

bench() {  # bench NAME EXTRA_FLAGS...
    local name=$1; shift
    python3 -m mke_plugins bench --model "$MODEL" --hparams "$HPARAMS" --dtype "$DTYPE" --methods "$METHODS" \
        --cases "$CASES" --no-generate --no-progress --plot "" --json "$OUT/bench-$name.json" "$@"
}
say "2a. bench on one device (--device $DEVICE)"
bench one --device "$DEVICE" || status=1
say "2b. bench with --device-map auto"
bench auto --device-map auto || status=1
python3 - "$OUT/bench-one.json" "$OUT/bench-auto.json" <<'PY' || status=1
import json, sys
one, auto = (json.load(open(p)) for p in sys.argv[1:3])
quality = ("rewrite_acc", "rephrase_acc", "image_rephrase_acc", "locality_acc", "multimodal_locality_acc",
           "text_only_acc", "image_only_acc")
bad = 0
for label, row in auto["methods"].items():
    ref = one["methods"][label]
    same = all(row.get(k) == ref.get(k) for k in quality)
    bad += not same
    print(f"{label}: device-map auto vs cuda quality columns equal: {same}; restore verified: "
          f"{row['restore_verified']}; s/edit (median) {ref['edit_seconds_median']:.2f} -> "
          f"{row['edit_seconds_median']:.2f}; peak MB {ref['peak_memory_mb']:.0f} -> {row['peak_memory_mb']:.0f}")
print("devices:", one["device"], "|", auto["device"])
sys.exit(1 if bad else 0)
PY

say "2c. the same bench under torchrun --nproc_per_node 1 (rank 0 on $DEVICE, its journal beside the JSON)"
python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m mke_plugins bench --model "$MODEL" \
    --hparams "$HPARAMS" --dtype "$DTYPE" --methods "$METHODS" --cases "$CASES" --no-generate --no-progress \
    --plot "" --json "$OUT/bench-torchrun.json" --device "$DEVICE" || status=1
python3 - "$OUT/bench-one.json" "$OUT/bench-torchrun.json" <<'PY' || status=1
import json, sys
one, run = (json.load(open(p)) for p in sys.argv[1:3])
keys = ("rewrite_acc", "rephrase_acc", "image_rephrase_acc", "locality_acc", "multimodal_locality_acc")
same = all(run["methods"][m].get(k) == row.get(k) for m, row in one["methods"].items() for k in keys)
print(f"torchrun (1 rank, device {run['device']}) vs plain bench: quality columns equal: {same}")
sys.exit(0 if same else 1)
PY

say "3. --device-map auto --max-memory $MAXMEM (part of the model off the GPU): expect a refusal"
bench capped --device-map auto --max-memory "$MAXMEM" 2> "$OUT/capped.err"
rc=$?
cat "$OUT/capped.err" | tail -3
if [ "$rc" -eq 2 ] && grep -q "on the 'meta' device" "$OUT/capped.err"; then
    say "refused as expected (exit 2, the first offloaded weight named)"
else
    say "UNEXPECTED: exit $rc without the offload refusal"; status=1
fi

say "4. scale --device-map auto ($SIZE, one capped edit per method)"
python3 -m mke_plugins scale --methods FT,DECODE --size "$SIZE" --dtype "$DTYPE" --device-map auto \
    --max-steps "$STEPS" --image-size 224 --hparams "$HPARAMS" --json "$OUT/scale-auto.json" || status=1
nvidia-smi --query-gpu=memory.used --format=csv,noheader || true
say "done, status $status (results in $OUT)"
exit $status
