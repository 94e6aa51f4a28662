#!/usr/bin/env bash
# Regenerate GPU recordings in data/ on a CUDA machine that has torch (and triton) installed;
# run from anywhere, no .venv needed. Each study prints its command, then runs it.
#   bash scripts/gpu_studies.sh                   # every one-GPU study below, in this order
#   bash scripts/gpu_studies.sh longnet copy      # some of them
#   bash scripts/gpu_studies.sh ring2-longest-causal   # a two-GPU study (torchrun, 2 ranks)
#   STUDY=h100 bash scripts/gpu_studies.sh copy   # file prefix (default h200)
#   PYTHON=python3                                # interpreter (default python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}
p=${STUDY:-h200}
all=(tests copy fwd longnet longnet-grad longnet-fwdbwd memory memory-triton dilated natural-order
     natural-order-fwdbwd triton-launch triton-features triton-backward fwdbwd layouts
     hilbert adaptive overhead longest longest-sparse longest-fwdbwd longest-h100-memory)
two_gpu=(ring2-eff ring2-longest-causal ring2-longest-dilated ring2-eff-dilated)

run() {
    echo "[gpu-studies] $*"
    "$py" "$@"
}

ring2() {  # the distributed ring over two GPUs, one process each
    echo "[gpu-studies] torchrun --standalone --nproc-per-node=2 -m workbench ring-bench $*"
    "$py" -m torch.distributed.run --standalone --nproc-per-node=2 -m workbench ring-bench "$@"
}

study() {
    case "$1" in
        tests)  # the gpu-marked tests (the notebooks' nbval plugin is not needed here)
            run -m pytest -o addopts="" -p no:cacheprovider -q -m gpu tests ;;
        copy)  # data/bench_<p>_copy.csv: the roofline's memory side
            run -m workbench copy-bandwidth --study "$p" ;;
        fwd)  # forward of every family against FlexAttention and dense SDPA
            run -m workbench bench --study "${p}_fwd" --seq-lens 16384 65536 262144 \
                --families dense causal local random10 dilated \
                --variants ours flex_natural sdpa_dense --reps 10 ;;
        longnet)  # LongNet against its naive baselines, and its paper mode
            run -m workbench bench --study "${p}_longnet" --seq-lens 16384 65536 262144 \
                --families longnet --variants ours strided_view strided_gather paper \
                flex_natural sdpa_dense --reps 10 ;;
        longnet-grad)  # the same forward, inputs requiring grad (the graph is kept, not used)
            run -m workbench bench --study "${p}_longnet_grad" --seq-lens 65536 262144 \
                --families longnet --variants ours strided_gather paper --grad-forward \
                --reps 10 ;;
        longnet-fwdbwd)  # forward+backward: time and peak memory against the plain gather
            run -m workbench bench --study "${p}_longnet_fwdbwd" --seq-lens 65536 262144 \
                --families longnet --variants ours strided_gather paper --backward --reps 10 ;;
        memory)  # forward+backward peak memory of every family at 256K, first call included
            run -m workbench bench --study "${p}_memory" --seq-lens 262144 \
                --families dense causal local random10 dilated longnet --variants ours \
                --backward --reps 3 --warmup 1 ;;
        memory-triton)  # dense and causal on our kernels, beside auto's SDPA in the same run
            run -m workbench bench --study "${p}_memory_triton" --seq-lens 262144 \
                --families dense causal --variants ours triton --backward --reps 3 --warmup 1 ;;
        dilated)
            run -m workbench bench --study "${p}_dilated" --seq-lens 16384 65536 262144 \
                --families dilated --variants ours sdpa_dense --reps 10 ;;
        natural-order)  # LongNet's tiles in natural order: mostly partial
            run -m workbench bench --study "${p}_natural_order" --seq-lens 65536 \
                --families longnet dilated --variants triton flex_natural --reps 5 ;;
        natural-order-fwdbwd)  # the same, forward+backward
            run -m workbench bench --study "${p}_natural_order_fwdbwd" --seq-lens 65536 \
                --families longnet dilated --variants triton flex_natural --backward --reps 5 ;;
        triton-launch)  # our forward kernel's launch parameters
            run -m workbench bench-triton --study "$p" --seq-len 65536 --reps 10 ;;
        triton-features)  # the best of those with and without TMA
            run -m workbench bench-triton --study "$p" --space features --seq-len 65536 \
                --reps 10 ;;
        triton-backward)  # forward+backward under the backward kernels' launch parameters
            run -m workbench bench-triton --study "$p" --space backward --seq-len 65536 \
                --reps 10 ;;
        fwdbwd)  # forward+backward of every block-sparse family, both kernels, dense SDPA
            run -m workbench bench --study "${p}_fwdbwd" --seq-lens 16384 65536 \
                --families dense causal local random10 --variants ours triton flex_natural \
                sdpa_dense --backward --reps 10 ;;
        layouts)  # data/layouts_1m_<p>.csv: every family's layout and kernel structures at
            # 1M tokens, block 128, per head count and random tiles' cell size
            run -m workbench bench --study "1m_${p}" --families full causal local global_local \
                strided sparse_transformer dilated longnet random dilated_window documents \
                prefix_lm --layout-timing 1048576 --layout-heads 1 8 16 32 \
                --layout-cells 16 32 64 128 256 --reps 5 --layout-max-seconds 30 ;;
        overhead)  # data/overhead_<p>.csv: per-call time of every entry point vs its kernel
            run -m workbench bench-overhead --study "$p" --seq-lens 512 1024 2048 4096 8192 \
                --reps 100 ;;
        longest)  # the longest sequence of dense and causal SDPA (minutes per call)
            run -m workbench bench-longest --study "$p" --families dense causal \
                --start 4194304 --limit 8388608 --max-seconds 300 ;;
        longest-sparse)  # the same for the sparse families
            run -m workbench bench-longest --study "${p}_sparse" --families dilated longnet \
                local random10 --start 4194304 --limit 8388608 --max-seconds 60 ;;
        longest-fwdbwd)  # forward+backward at 4M tokens, window and LongNet's patterns
            run -m workbench bench-longest --study "${p}_fwdbwd" --families local dilated \
                --start 4194304 --limit 4194304 --backward ;;
        longest-h100-memory)  # 4M tokens, this GPU capped at an H100 80GB's 79.1 GiB (CUDA's
            # total; both allocator settings)
            run -m workbench bench-longest --study "${p}_as_h100" --families local random10 \
                dilated --start 4194304 --limit 4194304 --memory-gib 79.1
            PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True run -m workbench bench-longest \
                --study "${p}_as_h100_expandable" --families local random10 dilated \
                --start 4194304 --limit 4194304 --memory-gib 79.1 ;;
        ring2-eff)  # data/ring_gpu2_eff.csv (+ _profile): every family and sharding at 512K
            # against one GPU at 256K
            ring2 --study gpu2_eff --seq-lens 524288 --families causal random10 local dilated \
                --shardings contiguous zigzag --timeout 120 --reps 8 --warmup 1 --profile 12 \
                --baseline ;;
        ring2-longest-causal)  # dense causal, both shardings, doubling until out of memory
            ring2 --study gpu2_longest_causal --seq-lens 1048576 --double-until 4194304 \
                --families causal --shardings contiguous zigzag --reps 1 --warmup 0 \
                --timeout 600 ;;
        ring2-longest-dilated)  # dilated, contiguous shards, doubling until out of memory
            ring2 --study gpu2_longest_dilated --seq-lens 1048576 --double-until 16777216 \
                --families dilated --shardings contiguous --reps 1 --warmup 0 --timeout 120 ;;
        ring2-eff-dilated)  # dilated alone, both shardings, against one GPU at 256K
            ring2 --study gpu2_eff_dilated --seq-lens 524288 --families dilated \
                --shardings contiguous zigzag --reps 8 --warmup 1 --baseline --timeout 120 ;;
        *)
            echo "unknown study '$1'; choose from: ${all[*]} ${two_gpu[*]}" >&2
            return 2 ;;
    esac
}

if [ "$#" -eq 0 ]; then
    set -- "${all[@]}"
fi
for name in "$@"; do
    study "$name"
done
