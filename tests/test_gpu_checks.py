"""bench/gpu_checks.sh: its parts fit one device command each, in priority order, a budget
stops before a part that would overrun it, and every step's command still names real options."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench/gpu_checks.sh"
COMMAND_LIMIT_S = 600  # the device's limit on one command
SETUP_S = 60  # the script's set-up allowance before the first part
STEP = re.compile(r"^=== part (\d) (\S+) \(limit (\d+) s\): (.*)$")


def gpu_checks(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # python3: this interpreter
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PATH": path, **(env or {})})


def plan(*args) -> tuple[list[tuple[int, str, int, str]], str]:
    """(part, step, limit, command) of each planned step, and the final line."""
    r = gpu_checks("--dry-run", *args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    steps = [(int(m[1]), m[2], int(m[3]), m[4]) for m in map(STEP.match, lines) if m]
    return steps, lines[-1]


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_parts_fit_one_command_in_the_priority_order_of_the_open_figures():
    steps, last = plan()
    assert last == "=== gpu_checks: parts planned: 1 2 3 4 5 6"
    limits = {p: sum(s[2] for s in steps if s[0] == p) for p in range(1, 7)}
    assert all(SETUP_S + limit <= 0.8 * COMMAND_LIMIT_S for limit in limits.values()), limits
    first = {}  # part where each benchmark or test file first runs
    for part, _, _, cmd in steps:
        for word in shlex.split(cmd):
            first.setdefault(Path(word).stem, part)
    # CUDA correctness first, then issue 13's throughput ratio and kernel floor, the video
    # pipeline, the teacher (issue 12), attention back ends
    assert first["test_topk_kl"] == first["test_student_step"] == first["student_step"] == 1
    assert [first[b] for b in ("topk_kl", "video_features", "teacher_build", "attention")] == [2, 3, 4, 5]
    assert [s[1] for s in steps if s[0] == 1][:2] == ["kernel-tests", "student-tests"]


def test_a_budget_runs_whole_parts_in_order_and_names_the_rest():
    steps, last = plan("--budget-s", "480")
    assert {s[0] for s in steps} == {1}
    assert last.endswith("not run (budget 480 s): 2,3,4,5,6, continue with --part 2,3,4,5,6")
    steps, last = plan("--budget-s", "900", "--part", "3,4,5")
    assert [s[0] for s in steps] == [3, 3, 4, 4] and last.endswith("continue with --part 5")
    steps, last = plan("--budget-s", "100", "--part", "2")
    assert steps == [] and last == "=== gpu_checks: parts planned: none; not run (budget 100 s): 2, continue with --part 2"


@pytest.mark.parametrize("args, message", [
    (["--part", "7"], "--part: expected parts among 1 2 3 4 5 6, found '7'"),
    (["--budget-s", "ten"], "--budget-s needs whole seconds"),
    (["--fast"], "unknown argument '--fast'"),
])
def test_bad_arguments_end_in_one_line(args, message):
    r = gpu_checks(*args)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr


def test_a_run_logs_to_out_and_stops_before_a_part_it_cannot_finish(tmp_path):
    r = gpu_checks("--budget-s", "30", "--part", "5", env={"OUT": str(tmp_path)})  # set-up only, on any machine
    assert r.returncode == 0, r.stderr
    last = "=== gpu_checks: parts run: none; not run (budget 30 s): 5, continue with --part 5"
    assert r.stdout.splitlines()[-1] == last
    assert (tmp_path / "gpu_checks.log").read_text().splitlines()[-1] == last


def test_every_step_names_real_files_and_options():
    steps, _ = plan()
    helps: dict[str, str] = {}
    for _, name, _, cmd in steps:
        words = shlex.split(cmd)
        if words[:3] == ["python3", "-m", "pytest"]:
            files = [w for w in words if w.startswith("tests/")]
            assert files and all((ROOT / f).is_file() for f in files), name
            if "-k" in words:  # the selection still picks tests
                k = words[words.index("-k") + 1]
                r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                    *files, "-k", k], capture_output=True, text=True, cwd=ROOT)
                assert any("::" in line for line in r.stdout.splitlines()), (name, r.stdout[-500:])
        elif words[1].startswith("bench/"):
            script = words[1]
            if script not in helps:
                r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT)
                assert r.returncode == 0, r.stderr
                helps[script] = r.stdout
            for opt in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", helps[script]), f"{name}: {script} has no option {opt}"
