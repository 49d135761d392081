#!/usr/bin/env bash
# The speed and memory figures the README asks of a GPU, each as JSON in OUTDIR:
#   bash scripts/gpu_targets.sh OUTDIR [PART ...]      (default: every part, in this order)
# Parts (each ~1-6 minutes on one H100; run them in separate calls where a call's time is limited):
#   lora       1.3B 480x832x81 bf16, remat full: LoRA step (MFU), forward, DMD steps, sampling step, and diffusers +
#              peft's LoRA step and forward in the same process (--vs-torch: ratio_torch_over_jax)
#   attention  the LoRA step and forward with remat "attention" (the attention kernels' outputs kept), vs torch
#   projections  the LoRA step with remat "projections" (+ the attention layers' linear outputs kept), vs torch
#   matmuls    the LoRA step with remat "matmuls" (every linear output kept: no product recomputed), vs torch
#   none, dots the LoRA step with remat "none" (nothing recomputed) / "dots" (XLA's: every product's output kept), vs torch
#   xla        the LoRA step and forward on XLA's attention instead of cuDNN flash attention
#   gemm       bf16 matrix-product rates of JAX and torch at the 1.3B's shapes
#   kernels    the attention kernels alone at the 1.3B's self-attention (cuDNN, Mosaic GPU FlashAttention-3)
#   memory     compiled per-device memory of 14B LoRA, DMD (generator and critic programs) and DCM on 1 device
#   dmd14b     14B DMD with LoRA on this GPU: both DMD programs run (random weights); peak_memory_bytes measured
#   profile    the 1.3B LoRA step and forward, JAX and torch, each traced after its timings (--profile): the top
#              kernels per step (JSON), the JAX traces in OUTDIR/profile/ (TensorBoard / Perfetto)
# The python is $PYTHON (default: python). A part's stderr goes to OUTDIR/PART.log; its exit status is printed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_targets.sh OUTDIR [lora attention projections matmuls none dots xla gemm kernels memory dmd14b profile]}
shift
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(lora attention xla gemm memory dmd14b profile)
py=${PYTHON:-python}
mkdir -p "$out"
status=0
for part in "${parts[@]}"; do
  case "$part" in
    lora) cmd=(scripts/bench.py --vs-torch) ;;
    attention) cmd=(scripts/bench.py --vs-torch --remat attention --bench lora_train_step,forward) ;;
    projections|matmuls|none|dots) cmd=(scripts/bench.py --vs-torch --remat "$part" --bench lora_train_step) ;;
    xla) cmd=(scripts/bench.py --attention xla --bench lora_train_step,forward) ;;
    kernels) cmd=(scripts/bench_attention.py --impls cudnn,mosaic) ;;
    gemm) cmd=(scripts/bench_gemm.py --model 1.3b) ;;
    memory) cmd=(scripts/memory_report.py --model 14b --method lora,dmd_generator,dmd_critic,dcm --devices 1) ;;
    dmd14b) cmd=(scripts/bench.py --model 14b --bench dmd_generator_step,dmd_critic_step --steps 2) ;;
    profile) cmd=(scripts/bench.py --vs-torch --bench lora_train_step,forward --steps 3 --profile "$out/profile") ;;
    *) echo "[gpu_targets] unknown part '$part': expected lora attention projections matmuls none dots xla gemm kernels memory dmd14b profile" >&2; exit 2 ;;
  esac
  echo "[gpu_targets] $part: $py ${cmd[*]}" >&2
  t0=$SECONDS
  "$py" "${cmd[@]}" >"$out/$part.json" 2>"$out/$part.log"
  rc=$?
  echo "[gpu_targets] $part: exit $rc after $((SECONDS - t0)) s -> $out/$part.json" >&2
  [ $rc -ne 0 ] && status=$rc
done
exit $status
