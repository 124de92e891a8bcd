"""Fused top-K distillation KL: the Triton kernel (run by the CPU interpreter) against the torch
reference, and the reference against hand computations."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainers.kernels import topk_kl as topk_kl_module
from trainers.kernels.topk_kl import MODES, topk_kl, topk_kl_reference

ROOT = Path(__file__).resolve().parents[1]
# Lanes of masked rows (and rows past B) compute log(0) and -inf - -inf, then are discarded:
# numpy, which runs the interpreted kernels, warns about each.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

T = 2.5
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (B, C, K): B = 1 and B not a power of two, K = 1, K = C, C not a power of two.
SHAPES = [(1, 1, 1), (7, 5, 1), (7, 5, 3), (1, 5, 5), (33, 37, 3), (7, 37, 37), (7, 130, 1), (33, 130, 3),
          (1, 130, 130)]
# Gradient tolerances (rtol, atol): both round the gradient to the logits' dtype, after
# different fp32 arithmetic.
GRAD_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (2e-3, 1e-6)}


def make_inputs(B, C, K, dtype=torch.float32, seed=0, idx_dtype=torch.int64):
    """Student logits [B, C] in ``dtype``, the teacher's top-K logits and indices (shuffled), its
    LSE (fp32, fp64 with fp64 logits) and a mask that keeps row 0."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, C, generator=g, dtype=torch.float64) * 3  # [B, C]
    t, idx = teacher.topk(K, dim=-1)  # [B, K]
    perm = torch.rand(B, K, generator=g).argsort(-1)  # the kernel must not rely on sorted indices
    t, idx = t.gather(1, perm), idx.gather(1, perm)
    lse = (teacher / T).logsumexp(-1)  # [B]
    s = (torch.randn(B, C, generator=g) * 3).to(dtype)  # [B, C]
    mask = torch.rand(B, generator=g) > 0.25
    mask[0] = True
    teacher_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return s, t.to(teacher_dtype), idx.to(idx_dtype), lse.to(teacher_dtype), mask


def loss_and_grad(fn, s, t, idx, lse, mask, mode, weights, **kw):
    s = s.detach().requires_grad_()
    loss = fn(s, t, idx, T, mode, lse, mask, **kw)
    (grad,) = torch.autograd.grad((loss * weights).sum(), s)
    return loss.detach(), grad


# --- kernel against reference -----------------------------------------------------------------


@pytest.fixture
def kernel():
    pytest.importorskip("triton")
    return lambda *args, **kw: topk_kl(*args, use_kernel=True, **kw)


# Rows a program handles: one (every B the student trains with) and four (programs with rows
# past B when B is not a multiple of it, and rows taking different paths in one program).
ROWS = pytest.mark.parametrize("rows", [1, 4], indirect=True, ids=lambda r: f"rows{r}")


@pytest.fixture
def rows(request, monkeypatch):
    monkeypatch.setattr(topk_kl_module, "ROWS_PER_PROGRAM", request.param)
    return request.param


@ROWS
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}-K{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_kernel_matches_reference(kernel, mode, dtype, shape, rows):
    s, t, idx, lse, mask = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    w = torch.rand(shape[0])
    loss_k, grad_k = loss_and_grad(kernel, s, t, idx, lse, mask, mode, w)
    loss_r, grad_r = loss_and_grad(topk_kl_reference, s, t, idx, lse, mask, mode, w)
    assert loss_k.dtype == torch.float32 and grad_k.dtype == dtype
    # Both compute in fp32 from the same logits, so the loss agrees to fp32 rounding for every dtype.
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-6)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad_k, grad_r, rtol=rtol, atol=atol)


@ROWS
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}-K{}".format(*s))
@pytest.mark.parametrize("reduction", ["rows", "elements"])
@pytest.mark.parametrize("mode", MODES)
def test_kernel_reductions_match_reference(kernel, mode, reduction, shape, rows):
    """Both reductions through the kernel: the backward gets the reduction's scale as an expanded
    scalar grad_output. The reference's reductions are the per-row losses' mean over the kept rows
    (x K in topk mode, x C in topk_lse mode)."""
    s, t, idx, lse, mask = make_inputs(*shape, dtype=torch.float32, seed=sum(shape) + 1)
    outs = []
    for fn in (kernel, topk_kl_reference):
        x = s.clone().requires_grad_()
        loss = fn(x, t, idx, T, mode, lse, mask, reduction=reduction)
        outs += [loss.detach(), torch.autograd.grad(loss * 3, x)[0]]
    assert outs[0].shape == ()
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1], outs[3], rtol=1e-5, atol=1e-7)
    per_row = topk_kl_reference(s, t, idx, T, mode, lse, mask)
    width = {"rows": 1, "elements": shape[2] if mode == "topk" else shape[1]}[reduction]
    torch.testing.assert_close(outs[2], per_row.sum() / (mask.sum() * width))


def test_reductions_with_no_kept_row_are_zero():
    s, t, idx, lse, mask = make_inputs(4, 9, 3)
    for reduction in ("rows", "elements"):
        assert topk_kl_reference(s, t, idx, T, "topk", lse, torch.zeros(4, dtype=torch.bool), reduction=reduction) == 0
    with pytest.raises(ValueError, match="reduction"):
        topk_kl_reference(s, t, idx, T, "topk", lse, mask, reduction="mean")


@ROWS
@pytest.mark.parametrize("mode", MODES)
def test_kernel_block_loops_int32_strided(kernel, mode, monkeypatch, rows):
    """Tiny block caps make the kernel loop over C and K; int32 indices; a strided logits view."""
    monkeypatch.setattr(topk_kl_module, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(topk_kl_module, "MAX_BLOCK_K", 2)
    B, C, K = 6, 37, 5
    s, t, idx, lse, mask = make_inputs(B, C, K, idx_dtype=torch.int32, seed=3)
    s = torch.cat([s, torch.randn(B, 3)], dim=1)[:, :C]  # row stride C + 3
    w = torch.rand(B)
    loss_k, grad_k = loss_and_grad(kernel, s, t, idx, lse, mask, mode, w)
    loss_r, grad_r = loss_and_grad(topk_kl_reference, s, t, idx, lse, mask, mode, w)
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_k, grad_r, rtol=1e-5, atol=1e-6)
    # Without requires_grad the kernel skips the gradient and returns the same loss.
    torch.testing.assert_close(kernel(s, t, idx, T, mode, lse, mask), loss_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift", [-0.3, 0.3])
def test_kernel_inconsistent_teacher_lse(kernel, shift):
    """A teacher LSE that disagrees with its top-K logits: sum p > 1 clamps p_tail to 0 (shift < 0),
    or leaves extra tail mass (shift > 0); the gradient then carries the factor sum p + p_tail."""
    s, t, idx, lse, mask = make_inputs(9, 23, 4, seed=13)
    lse = (t / T).logsumexp(-1) + shift
    w = torch.rand(9)
    loss_k, grad_k = loss_and_grad(kernel, s, t, idx, lse, mask, "topk_lse", w)
    loss_r, grad_r = loss_and_grad(topk_kl_reference, s, t, idx, lse, mask, "topk_lse", w)
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_k, grad_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_kernel_backward_twice(kernel, mode):
    """Backward scales the saved gradient out of place, so a retained graph can run it again."""
    s, t, idx, lse, mask = make_inputs(5, 11, 3, seed=4)
    s.requires_grad_()
    loss = kernel(s, t, idx, T, mode, lse, mask)
    (g1,) = torch.autograd.grad(loss.sum() * 2, s, retain_graph=True)
    (g2,) = torch.autograd.grad(loss.sum() * 2, s)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("mode", MODES)
def test_kernel_confident_student_keeps_exact_tail(kernel, mode):
    """The student puts ~all its mass on the teacher's top-K (1 - sum q underflows in fp32): the
    tail's own LSE keeps loss and gradient accurate; compare with a float64 reference."""
    B, C, K = 4, 40, 4
    s, t, idx, lse, mask = make_inputs(B, C, K, seed=5)
    s = s.scatter(1, idx.long(), 60.0 * T)  # q_tail ~ exp(-60)
    w = torch.rand(B)
    loss_k, grad_k = loss_and_grad(kernel, s, t, idx, lse, mask, mode, w)
    loss_r, grad_r = loss_and_grad(topk_kl_reference, s.double(), t, idx, lse, mask, mode, w.double())
    assert torch.isfinite(loss_k).all() and loss_k[mask].min() > (1.0 if mode == "topk_lse" else 0.0)
    torch.testing.assert_close(loss_k, loss_r.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_k, grad_r.float(), rtol=1e-4, atol=1e-7)


@ROWS
@pytest.mark.parametrize("fast_min", [0.0, 2.0], ids=["tail-from-top-mass", "tail-summed"])
def test_kernel_both_tail_paths(kernel, monkeypatch, fast_min, rows):
    """topk_lse takes q_tail from 1 - q_top when that is safe and sums the tail otherwise:
    force each path for every row of ordinary (unconfident) students."""
    monkeypatch.setattr(topk_kl_module, "TAIL_FAST_MIN", fast_min)
    for shape in ((33, 37, 3), (7, 130, 1), (33, 130, 3)):
        s, t, idx, lse, mask = make_inputs(*shape, seed=sum(shape))
        w = torch.rand(shape[0])
        loss_k, grad_k = loss_and_grad(kernel, s, t, idx, lse, mask, "topk_lse", w)
        loss_r, grad_r = loss_and_grad(topk_kl_reference, s, t, idx, lse, mask, "topk_lse", w)
        torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_k, grad_r, rtol=1e-5, atol=1e-6)


@ROWS
def test_kernel_mixed_confident_rows(rows):
    """Confident and unconfident rows in one launch (with rows=4, in one program) take different
    tail paths; both stay exact."""
    pytest.importorskip("triton")
    B, C, K = 8, 40, 4
    s, t, idx, lse, mask = make_inputs(B, C, K, seed=14)
    s[::2] = s[::2].scatter(1, idx[::2].long(), 60.0 * T)  # even rows: q_tail ~ exp(-60)
    w = torch.rand(B)
    loss_k, grad_k = loss_and_grad(topk_kl, s, t, idx, lse, mask, "topk_lse", w, use_kernel=True)
    loss_r, grad_r = loss_and_grad(topk_kl_reference, s.double(), t, idx, lse, mask, "topk_lse", w.double())
    torch.testing.assert_close(loss_k, loss_r.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_k, grad_r.float(), rtol=1e-4, atol=1e-7)


def test_rows_per_program_rule():
    """One row a program until B leaves MIN_PROGRAMS programs with two, then up to MAX_ROWS."""
    per = topk_kl_module.rows_per_program
    n = topk_kl_module.MIN_PROGRAMS
    assert [per(b) for b in (1, 64, 512, 2 * n - 1, 2 * n, 4 * n, 4096, 10**6)] == [1, 1, 1, 1, 2, 4, 4, 8]


def test_kernel_default_rows_at_large_b(kernel):
    """B past the one-row range takes the default rule (two rows, B odd: one past B) in both modes."""
    B = 2 * topk_kl_module.MIN_PROGRAMS + 1
    assert topk_kl_module.rows_per_program(B) == 2
    s, t, idx, lse, mask = make_inputs(B, 6, 2, seed=21)
    w = torch.rand(B)
    for mode in MODES:
        loss_k, grad_k = loss_and_grad(kernel, s, t, idx, lse, mask, mode, w)
        loss_r, grad_r = loss_and_grad(topk_kl_reference, s, t, idx, lse, mask, mode, w)
        torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_k, grad_r, rtol=1e-5, atol=1e-6)


def test_kernel_compiles_for_h100():
    """The interpreter skips Triton's frontend checks (e.g. on globals) and code generation:
    compile both kernels in both modes for sm_90 (Triton ships ptxas, no GPU needed), at the
    benchmark's blocks with one and four rows a program."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from trainers.kernels.topk_kl import _blocks, _topk_kl_bwd_kernel, _topk_kl_fwd_kernel
        for rows, lse_mode, logits in ((1, False, "*bf16"), (1, True, "*fp32"), (4, True, "*fp16"), (4, False, "*fp32")):
            blocks = _blocks(2513, 50, rows)
            warps = blocks.pop("num_warps")
            common = {"s_ptr": logits, "s_stride": "i32", "idx_ptr": "*i64", "idx_stride": "i32", "keep_ptr": "*u8",
                      "gk_ptr": "*fp32", "stats_ptr": "*fp32", "inv_t": "fp32", "B": "i32", "C": "i32", "K": "i32",
                      "ROWS": "constexpr", "BLOCK_K": "constexpr", "BLOCK_C": "constexpr"}
            fwd = {**common, "t_ptr": "*fp32", "t_stride": "i32", "lse_ptr": "*fp32", "loss_ptr": "*fp32",
                   "tail_fast_min": "fp32", "LSE_MODE": "constexpr", "BLOCK_X": "constexpr"}
            bwd = {**common, "go_ptr": "*fp32", "go_stride": "i32", "grad_ptr": logits, "grad_stride": "i32",
                   "DENSE": "constexpr"}
            for fn, sig, flags in ((_topk_kl_fwd_kernel, fwd, {"LSE_MODE": lse_mode, **blocks}),
                                   (_topk_kl_bwd_kernel, bwd, {"DENSE": lse_mode, "ROWS": rows,
                                                               "BLOCK_K": blocks["BLOCK_K"],
                                                               "BLOCK_C": blocks["BLOCK_C"]})):
                sig = {k: sig[k] for k in fn.arg_names}  # in the kernel's argument order
                triton.compile(ASTSource(fn, sig, flags), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps})
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernel_on_cuda():
    """The compiled kernel (this module forces the interpreter, so in a fresh process) against the
    reference at the benchmark's size and with C and K over the block caps."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from trainers.kernels.topk_kl import topk_kl, topk_kl_reference
        T = 10.0
        for B, C, K in ((4096, 2513, 50), (33, 130, 3), (7, 5000, 1), (4, 3000, 1100), (5, 37, 37), (3, 1, 1)):
            teacher = torch.randn(B, C, device="cuda") * 20
            t, idx = teacher.topk(K, dim=-1)
            lse, mask, w = (teacher / T).logsumexp(-1), torch.rand(B, device="cuda") > 0.2, torch.rand(B, device="cuda")
            for dtype, tol in ((torch.float32, (1e-5, 1e-6)), (torch.bfloat16, (1.6e-2, 1e-5))):
                s = (torch.randn(B, C, device="cuda") * 20).to(dtype)
                for mode in ("topk", "topk_lse"):
                    out = []
                    for fn in (topk_kl, topk_kl_reference):
                        x = s.clone().requires_grad_()
                        loss = fn(x, t, idx, T, mode, lse, mask)
                        out += [loss, torch.autograd.grad((loss * w).sum(), x)[0]]
                    torch.testing.assert_close(out[0], out[2], rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(out[1], out[3], rtol=tol[0], atol=tol[1])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("use_kernel", [False, True], ids=["reference", "kernel"])
@pytest.mark.parametrize("mode", MODES)
def test_masked_rows_are_exactly_zero(mode, use_kernel):
    """Rows without a teacher may hold padding (index -1, NaN); their loss and gradient are 0."""
    if use_kernel:
        pytest.importorskip("triton")
    s, t, idx, lse, mask = make_inputs(6, 9, 3, seed=6)
    mask[:] = torch.tensor([True, False, True, False, False, True])
    idx[~mask], t[~mask], lse[~mask] = -1, float("nan"), float("nan")
    loss, grad = loss_and_grad(topk_kl, s, t, idx, lse, mask, mode, torch.ones(6), use_kernel=use_kernel)
    assert torch.equal(loss[~mask], torch.zeros(3)) and torch.equal(grad[~mask], torch.zeros(3, 9))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and (loss[mask] > 0).all()


# --- reference against hand computations -------------------------------------------------------


def test_topk_with_all_classes_is_full_kl():
    s, t, idx, lse, _ = make_inputs(5, 8, 8, dtype=torch.float64, seed=7)
    full_teacher = torch.empty(5, 8, dtype=torch.float64).scatter_(1, idx, t)  # [B, C]
    expected = F.kl_div((s / T).log_softmax(-1), (full_teacher / T).softmax(-1), reduction="none").sum(-1)
    for mode in MODES:
        torch.testing.assert_close(topk_kl_reference(s, t, idx, T, mode, lse), expected)


def test_topk_is_kl_of_renormalised_distributions_with_grad_q_minus_p():
    B, C, K = 4, 10, 3
    s, t, idx, _, _ = make_inputs(B, C, K, dtype=torch.float64, seed=8)
    s.requires_grad_()
    loss = topk_kl_reference(s, t, idx, T, "topk")
    p = (t / T).softmax(-1)  # [B, K]
    q = (s.detach().gather(1, idx) / T).softmax(-1)  # [B, K]
    torch.testing.assert_close(loss, (p * (p / q).log()).sum(-1))
    (grad,) = torch.autograd.grad(loss.sum(), s)
    expected = torch.zeros(B, C, dtype=torch.float64).scatter_(1, idx, (q - p) / T)
    torch.testing.assert_close(grad, expected)


def test_topk_lse_matches_explicit_tail_bucket():
    """Loss with an explicit (K+1)-bucket teacher and student; gradient (q - p) / T on the K
    classes and q (1 - p_tail / q_tail) / T elsewhere, summing to zero over the row."""
    B, C, K = 4, 10, 3
    s, t, idx, lse, _ = make_inputs(B, C, K, dtype=torch.float64, seed=9)
    s.requires_grad_()
    loss = topk_kl_reference(s, t, idx, T, "topk_lse", lse)
    p = (t / T - lse[:, None]).exp()  # [B, K]
    q_all = (s.detach() / T).softmax(-1)  # [B, C]
    q = q_all.gather(1, idx)  # [B, K]
    p_tail, q_tail = 1 - p.sum(-1), 1 - q.sum(-1)  # [B]
    expected = (p * (p / q).log()).sum(-1) + p_tail * (p_tail / q_tail).log()
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    expected_grad = (q_all * (1 - p_tail / q_tail)[:, None]).scatter(1, idx, q - p) / T
    torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(grad.sum(-1), torch.zeros(B, dtype=torch.float64))


@pytest.mark.parametrize("mode", MODES)
def test_reference_gradcheck(mode):
    s, t, idx, lse, mask = make_inputs(4, 7, 3, dtype=torch.float64, seed=10)
    mask[1] = False
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: topk_kl_reference(x, t, idx, T, mode, lse, mask), (s,))


# --- dispatch, errors, benchmark ---------------------------------------------------------------


def test_cpu_tensors_default_to_reference():
    s, t, idx, lse, mask = make_inputs(3, 6, 2, seed=11)
    for mode in MODES:
        assert torch.equal(topk_kl(s, t, idx, T, mode, lse, mask), topk_kl_reference(s, t, idx, T, mode, lse, mask))


@pytest.mark.parametrize("bad, match", [
    (dict(mode="full"), "mode"),
    (dict(t=torch.zeros(3, 7)), "teacher_topk"),
    (dict(idx=torch.zeros(3, 2)), "topk_idx"),
    (dict(lse=None), "teacher_lse"),
    (dict(mask=torch.ones(4, dtype=torch.bool)), "mask"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_arguments_raise(bad, match):
    s, t, idx, lse, mask = make_inputs(3, 6, 2, seed=12)
    args = dict(t=t, idx=idx, lse=lse, mask=mask, mode="topk_lse", temperature=T) | bad
    with pytest.raises(ValueError, match=match):
        topk_kl(s, args["t"], args["idx"], args["temperature"], args["mode"], args["lse"], args["mask"])


def test_kernel_without_triton_raises_dependency_error():
    code = (
        "import sys, torch; sys.modules['triton'] = None\n"
        "from kdstore.errors import DependencyError\n"
        "from trainers.kernels.topk_kl import topk_kl\n"
        "s, t, i = torch.zeros(2, 4), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long)\n"
        "assert torch.equal(topk_kl(s, t, i, 1.0), torch.zeros(2))\n"
        "try:\n    topk_kl(s, t, i, 1.0, use_kernel=True)\nexcept DependencyError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "not installed" in out.stdout and "pip install 'kdstore[gpu]'" in out.stdout


def test_benchmark_tiny_cpu(tmp_path):
    from bench.topk_kl import run

    rows = run(tiny=True, device="cpu", out_dir=tmp_path)
    assert len(rows) == 4 and (tmp_path / "topk_kl.csv").exists()  # eager x 2 modes x 2 dtypes
    assert all("error" not in r and float(r["median_s"]) > 0 for r in rows)
