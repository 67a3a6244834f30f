"""
The stages of the GPU check (assets/gpu_check.sh, issue 21) that are not a script of their own.

    python assets/gpu_check.py kernel --out a_kernel.txt  # (a) the kernel, compiled, against float64
    python assets/gpu_check.py step --out b_step.txt      # (b) one DiT-S/2 step: triton = sdpa in bf16
    python assets/gpu_check.py train --out d_train.md     # (d) train.py --benchmark rows, DiT-XL/2 and S/2
    python assets/gpu_check.py preset --out e_preset.txt --grid e_grid.png --work DIR   # (e) --preset gpu

Stage (c), the kernel table, is `assets/benchmark_attention.py --autotune quick`. Every stage
writes its result file as soon as it has a result, and again as more come in, so that a stage cut
off by its time limit still leaves what it finished. Exit status: 0 every check passed, 1 one failed
(the file says which), 2 a bad command line. `--smoke` runs the same code at toy sizes on the CPU,
the kernel in Triton's interpreter (start with TRITON_INTERPRET=1); its numbers mean nothing.
`bash assets/gpu_check.sh --cpu-smoke DIR` runs all five stages that way, and test_dit.py runs that.

This file is also a pytest plugin (stage a loads it with `-p gpu_check`): it pins each autotuned
kernel to one small config, so that the kernel tests of test_dit.py compile each kernel once per
dtype and head dim instead of once per candidate, and it keeps only the tests that run the kernel.
"""

import argparse
import contextlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import torch

ASSETS = Path(__file__).resolve().parent
ROOT = ASSETS.parent
sys.path[:0] = [str(ROOT), str(ASSETS)]
import flash_attn_triton  # noqa: E402
from benchmark_attention import config_key, quick_autotune, tuned_kernels  # noqa: E402


# -----------------------------------------------------------------------------
# Stage a: the compiled kernel against a float64 reference
# -----------------------------------------------------------------------------

# Largest error relative to the reference's largest magnitude, as in test_dit.py.
TOLERANCE = {"bfloat16": 3e-2, "float16": 1e-2}


class Case(NamedTuple):
    label: str
    B: int
    H: int
    N_q: int
    N_kv: int
    D: int
    dtype: str  # "bfloat16" or "float16"
    layout: str  # "contiguous", "fused_qkv" (one projection, as DiT's self-attention) or "fused_kv"
    lengths: tuple = None  # per-sample key lengths, where flash_attention takes them


def case_groups(smoke, key_lengths):
    """The GPU-only shapes, in groups that share compiled kernels (dtype, head dim, layout): each
    group runs in its own process, so that the groups compile in parallel."""
    if smoke:  # toy sizes, ragged against every block; one group per kind of case
        groups = [[Case("self", 1, 2, 40, 40, 72, "bfloat16", "contiguous")],
                  [Case("self", 2, 1, 40, 40, 16, "float16", "fused_qkv")],
                  [Case("cross", 1, 2, 40, 2, 72, "bfloat16", "fused_kv")]]
        if key_lengths:
            groups.append([Case("key lengths", 2, 2, 40, 40, 16, "bfloat16", "contiguous", (40, 17))])
        return groups
    groups = []
    # bf16 contiguous as benchmark_attention.py times it (H = 16 there too: Triton specialises
    # integer arguments on divisibility by 16, so the same H reuses the compiled kernels).
    # fp16 with the strides of a fused qkv projection and a transposed dO, as in a model.
    for dtype, layout in (("bfloat16", "contiguous"), ("float16", "fused_qkv")):
        for D in (64, 72, 128):
            groups.append([Case("self", 2 if N <= 1024 else 1, 16, N, N, D, dtype, layout)
                           for N in (256, 1024, 4096, 16384)])
    # The two training shapes of stages b, d and e, exactly: bf16, fused qkv, 256 tokens.
    groups.append([Case("DiT-S/2 as trained", 8, 6, 256, 256, 64, "bfloat16", "fused_qkv")])
    groups.append([Case("DiT-XL/2 as trained", 8, 16, 256, 256, 72, "bfloat16", "fused_qkv")])
    # Cross-attention: DiT's 2 condition tokens, a caption's 77, and more keys than queries.
    groups.append([Case("cross", 2, 16, 256, 2, 72, "bfloat16", "fused_kv"),
                   Case("cross", 1, 16, 4096, 77, 72, "bfloat16", "fused_kv"),
                   Case("cross", 2, 16, 1000, 3000, 72, "bfloat16", "fused_kv")])
    if key_lengths:
        groups.append([Case("key lengths", 3, 16, 1024, 300, 72, "bfloat16", "fused_kv", (300, 151, 1)),
                       Case("key lengths", 3, 16, 256, 256, 64, "bfloat16", "contiguous", (256, 100, 17))])
    return groups


def key_length_parameter():
    """The name of flash_attention's per-sample key-length argument (issue 20), or None before it
    exists: any parameter besides q, k, v and scale with "len" in its name."""
    names = inspect.signature(flash_attn_triton.flash_attention).parameters
    found = [n for n in names if n not in ("q", "k", "v", "scale") and "len" in n.lower()]
    return found[0] if found else None


def make_inputs(case, dev, seed):
    """q, k, v (B, H, N, D) views with the case's strides, dO, and fresh random values."""
    gen = torch.Generator(dev).manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    B, H, N_q, N_kv, D = case.B, case.H, case.N_q, case.N_kv, case.D

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=dtype)

    if case.layout == "fused_qkv":  # (B, N, 3, H, D) from one projection; dO from a transpose
        qkv = randn(B, N_q, 3, H, D).requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
        do = randn(B, N_q, H, D).transpose(1, 2)  # (B, H, N_q, D)
    elif case.layout == "fused_kv":  # q from the image tokens, k and v from one projection
        q = randn(B, N_q, H, D).requires_grad_().transpose(1, 2)  # (B, H, N_q, D)
        kv = randn(B, N_kv, 2, H, D).requires_grad_()
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, N_kv, D)
        do = randn(B, N_q, H, D).transpose(1, 2)
    else:
        q = randn(B, H, N_q, D).requires_grad_()
        k, v = randn(B, H, N_kv, D).requires_grad_(), randn(B, H, N_kv, D).requires_grad_()
        do = randn(B, H, N_q, D)
    return q, k, v, do


def reference(q, k, v, do, lengths=None):
    """o, dq, dk, dv of softmax(q k^T / sqrt(D)) v in float64 by autograd, each sample over its
    first lengths[b] keys (dk and dv stay zero past them). One head and a block of queries at a
    time keeps the score matrix under 512 MiB even at N = 16384."""
    B, H, N_q, D = q.shape
    o, dq = (torch.zeros(q.shape, dtype=torch.float64, device=q.device) for _ in range(2))
    dk, dv = (torch.zeros(k.shape, dtype=torch.float64, device=q.device) for _ in range(2))
    for b in range(B):
        L = k.shape[2] if lengths is None else lengths[b]
        rows = max(1, 2**26 // L)
        for h in range(H):
            kd = k[b, h, :L].detach().double().requires_grad_()  # (L, D)
            vd = v[b, h, :L].detach().double().requires_grad_()  # (L, D)
            for start in range(0, N_q, rows):
                part = slice(start, start + rows)
                qd = q[b, h, part].detach().double().requires_grad_()  # (rows, D)
                od = ((qd @ kd.T) * D ** -0.5).softmax(dim=-1) @ vd  # (rows, D)
                od.backward(do[b, h, part].double())  # dk and dv add up over the query blocks
                o[b, h, part], dq[b, h, part] = od.detach(), qd.grad
            dk[b, h, :L], dv[b, h, :L] = kd.grad, vd.grad
    return o, dq, dk, dv


def call_kernel(q, k, v, lengths):
    """flash_attention, with the key lengths in whichever form its new argument accepts."""
    if lengths is None:
        return flash_attn_triton.flash_attention(q, k, v)
    name, error = key_length_parameter(), None
    for form in (lambda: torch.tensor(lengths, dtype=torch.int32, device=q.device),
                 lambda: torch.tensor(lengths, dtype=torch.int64, device=q.device), lambda: list(lengths)):
        try:
            return flash_attn_triton.flash_attention(q, k, v, **{name: form()})
        except (TypeError, ValueError) as err:  # not this form: try the next
            error = err
    raise error


def poison(dev, nbytes):
    """Leave NaN in the memory the allocator hands out next, so that an output element the kernel
    never writes shows up as NaN, not as a lucky zero or a previous run's value."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.full((nbytes // 4 + 1,), float("nan"), device=dev)  # freed at once, its block cached


@contextlib.contextmanager
def pinned(plan):
    """Each autotuned kernel runs exactly the config of `plan` ({name: triton.Config}): with one
    candidate the autotuner neither prunes nor times, it launches."""
    kernels = tuned_kernels()
    saved = {name: tuned.configs for name, tuned in kernels.items()}
    try:
        for name, config in plan.items():
            kernels[name].configs = [config]
        yield
    finally:
        for name, configs in saved.items():
            kernels[name].configs = configs


def config_plans(smoke):
    """Every config of --autotune quick at least once: plan i runs candidate i of each kernel."""
    quick_autotune()
    lists = {name: tuned.configs for name, tuned in tuned_kernels().items()}
    count = 1 if smoke else max(len(c) for c in lists.values())  # the interpreter ignores configs
    return [{name: configs[i % len(configs)] for name, configs in lists.items()} for i in range(count)]


def describe(plan):
    return " ".join(f"{name} {'{}x{} w{} s{}'.format(*config_key(c))}" for name, c in plan.items())


def check_group(cases, smoke):
    """Every case of the group under every plan: (line, ok) each. Runs in a worker process."""
    dev, lines = device(), []
    for case in cases:
        tol = TOLERANCE[case.dtype]
        for i, plan in enumerate(config_plans(smoke)):
            name = (f"{case.label} B={case.B} H={case.H} N={case.N_q}x{case.N_kv} D={case.D} "
                    f"{case.dtype} {case.layout}" + (f" lengths={list(case.lengths)}" if case.lengths else ""))
            configs = "interpreter blocks" if flash_attn_triton._INTERPRET else describe(plan)
            try:
                q, k, v, do = make_inputs(case, dev, seed=1000 * i + case.N_q + case.D)  # fresh per run
                poison(dev, 4 * q.numel() * q.element_size() + 2 * k.numel() * k.element_size())
                with pinned(plan):
                    o = call_kernel(q, k, v, case.lengths)
                    got = (o, *torch.autograd.grad(o, (q, k, v), do))
                ref = reference(q, k, v, do, case.lengths)
            except Exception as err:  # noqa: BLE001  (one failing run must not hide the others)
                if type(err).__name__ in ("OutOfResources", "PTXASError"):  # the autotuner skips these too
                    lines.append((f"{name} | {configs} | does not fit this GPU, skipped", True))
                else:
                    lines.append((f"{name} | {configs} | FAIL {type(err).__name__}: "
                                  f"{str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}", False))
                continue
            errs, ok = [], True
            for label, g, r in zip(("o", "dq", "dk", "dv"), got, ref):
                err = ((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                ok &= math.isfinite(err) and err < tol  # NaN (an unwritten element) never passes
                errs.append(f"{label} {err:.1e}")
            for b, L in enumerate(case.lengths or ()):  # masked keys must get exactly no gradient
                if (got[2][b, :, L:] != 0).any() or (got[3][b, :, L:] != 0).any():
                    ok = False
                    errs.append(f"sample {b}: gradient reaches keys past {L}")
            lines.append((f"{name} | {configs} | {', '.join(errs)} | "
                          f"{'ok' if ok else 'FAIL'} (tolerance {tol:.0e})", ok))
    return lines


def run_kernel_tests(report, smoke):
    """test_dit.py's kernel tests, in this process (with pytest-xdist, over worker processes)."""
    import pytest

    args = ["-q", "-p", "no:cacheprovider", "-p", "gpu_check", "-rfE", "--tb=short", str(ROOT / "test_dit.py")]
    if smoke:  # two quick ones: this checks the plumbing, the CPU suite checks the kernel
        args += ["-k", "test_logsumexp_is_stored_in_base_2 or test_rejects_invalid_inputs"]
    elif importlib.util.find_spec("xdist"):  # half the cores: the shapes' workers have the rest
        args += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    # Worker processes import this plugin by name.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ASSETS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    tally = Tally()
    start = time.time()
    code = pytest.main(args, plugins=[tally])
    ok = code == 0 and tally.passed > 0
    report.add(f"pytest {' '.join(args)}: exit {int(code)}, {tally.passed} passed, {len(tally.failed)} failed, "
               f"{tally.skipped} skipped, in {time.time() - start:.0f} s", ok)
    for nodeid in tally.failed:
        report.add(f"  FAIL {nodeid}", False)


def stage_kernel(out, smoke):
    """test_dit.py's kernel tests and the GPU-only shapes at the same time: both mostly wait for
    Triton's compiler, one process per CPU core or so, while the GPU idles. Lines are written as
    they come, so they interleave; each says what it is."""
    dev = device()
    report = Report(out, f"# (a) Kernel correctness, compiled: {environment()}\n\n"
                         "test_dit.py's kernel tests on this device (each autotuned kernel pinned to one small "
                         "config), and GPU-only shapes under every --autotune quick config (o, dq, dk, dv: "
                         "largest error relative to the largest magnitude of a float64 reference)")
    key_lengths = key_length_parameter()
    report.add("key lengths: " + (f"flash_attention takes {key_lengths!r}: checked" if key_lengths else
                                  "flash_attention takes none yet (no parameter with 'len' in its name): skipped"))
    groups = case_groups(smoke, key_lengths)
    workers = 1 if smoke or dev.type != "cuda" else min(len(groups), max(1, (os.cpu_count() or 2) // 2))
    start = time.time()
    if workers == 1:
        run_kernel_tests(report, smoke)
        for cases in groups:
            for line, ok in check_group(cases, smoke):
                report.add(line, ok)
    else:  # spawn: a process that uses CUDA cannot fork
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for cases in groups:
                pool.submit(check_group, cases, smoke).add_done_callback(
                    lambda future, first=cases[0]: record_group(report, first, future))
            run_kernel_tests(report, smoke)  # meanwhile the pool compiles and checks
    report.add(f"(shapes: {len(groups)} groups in {workers} processes, {time.time() - start:.0f} s with the tests)")
    return report.finish()


def record_group(report, first, future):
    """A group's lines into the report as soon as its worker returns them."""
    try:
        for line, ok in future.result():
            report.add(line, ok)
    except Exception as err:  # noqa: BLE001  (a worker that died: say which group)
        report.add(f"{first.label} D={first.D} {first.dtype} {first.layout}: FAIL, its worker died: "
                   f"{type(err).__name__}: {err}", False)


# -----------------------------------------------------------------------------
# Stage b: one DiT-S/2 training step, --attn triton against --attn sdpa
# -----------------------------------------------------------------------------

def one_step(argv, x, y, seed):
    """Loss and gradients of one train.py step (its parser, state and step function), from weights
    that are random everywhere: adaLN-Zero's zero gates would give attention no gradient at all."""
    import train
    from config import TRAIN_PRESETS, TrainConfig, parse_args

    cfg = parse_args(TrainConfig, argv, TRAIN_PRESETS)
    proc = train.Process(0, 1, x.device)
    state = train.build_state(cfg, [str(i) for i in range(10)], proc)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.device))
    step = train.make_train_step(cfg, state, proc)
    if cfg.precision == "fp32":  # make_train_step allows TF32; the reference is plain fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(seed)  # the same timesteps, noise and label dropout for every backend
    loss, _, _ = step(x, y, 0.0)  # lr 0: the step leaves the weights, the gradients stay
    grads = {n: p.grad.detach().float().clone() for n, p in state.model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def compare(run, ref):
    """Relative errors: loss, all gradients as one vector, and the worst single tensor."""
    loss, grads = run
    ref_loss, ref_grads = ref
    diff = sum(((grads[n] - g) ** 2).sum() for n, g in ref_grads.items()).sqrt()
    norm = sum((g ** 2).sum() for g in ref_grads.values()).sqrt()
    tensors = {n: ((grads[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in ref_grads.items()
               if g.norm() > 1e-6 * norm}
    worst = max(tensors, key=tensors.get)
    return {"loss": abs(loss - ref_loss) / abs(ref_loss), "grad": (diff / norm).item(),
            "worst": tensors[worst], "worst_name": worst}


def stage_step(out, smoke):
    dev = device()
    model, size, batch = ("DiT-Mi/2", 8, 4) if smoke else ("DiT-S/2", 32, 64)
    report = Report(out, f"# (b) One {model} training step ({size} px, batch {batch}): --attn triton "
                         f"against --attn sdpa, both bf16, and an fp32 reference: {environment()}")
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
    base = ["--preset", "gpu", "--model", model, "--image-size", str(size), "--batch-size", str(batch),
            "--grad-clip", "0", "--device", dev.type]
    runs = {}
    for name, extra in (("triton bf16", ["--attn", "triton", "--precision", "bf16"]),
                        ("sdpa bf16", ["--attn", "sdpa", "--precision", "bf16"]),
                        ("sdpa fp32 (reference)", ["--attn", "sdpa", "--precision", "fp32"])):
        try:
            runs[name] = one_step(base + extra, x, y, seed=1)
        except Exception as err:  # noqa: BLE001  (the file says why, and the next backend still runs)
            report.add(f"{name:22s} FAIL {type(err).__name__}: {str(err).strip()[:300]}", False)
            continue
        report.add(f"{name:22s} loss {runs[name][0]:.6f}")
    if len(runs) < 3:
        return report.finish()
    ref = runs["sdpa fp32 (reference)"]
    errs = {name: compare(runs[name], ref) for name in ("triton bf16", "sdpa bf16")}
    errs["triton vs sdpa, bf16"] = compare(runs["triton bf16"], runs["sdpa bf16"])
    report.add()
    report.add("| compared | loss rel. err | gradient rel. err (all) | worst tensor rel. err | worst tensor |")
    report.add("|---|---:|---:|---:|---|")
    for name, e in errs.items():
        report.add(f"| {name} | {e['loss']:.2e} | {e['grad']:.2e} | {e['worst']:.2e} | {e['worst_name']} |")
    # Within bf16 tolerance: our kernel may not be further from fp32 than PyTorch's own bf16
    # attention is, beyond twice that plus a floor (three times for the noisier single tensors).
    t, s = errs["triton bf16"], errs["sdpa bf16"]
    report.add()
    for key, factor in (("loss", 2), ("grad", 2), ("worst", 3)):
        bound = factor * s[key] + 2e-3
        report.add(f"{key}: triton {t[key]:.2e} <= {factor} x sdpa {s[key]:.2e} + 2e-3 = {bound:.2e}: "
                   f"{'ok' if t[key] <= bound else 'FAIL'}", t[key] <= bound)
    return report.finish()


# -----------------------------------------------------------------------------
# Stage d: train.py --benchmark rows
# -----------------------------------------------------------------------------

def stage_train(out, smoke, seconds):
    """DiT-S/2, then DiT-XL/2 at 256 tokens in bf16 with our kernel: eager and compiled at batch
    128, eager at doubled batches while one is predicted to fit in memory and in the time left,
    then compiled at the largest batch that fit. Each row is one `train.py --benchmark` (warm-up,
    then 50 timed steps), and the table is rewritten after each."""
    import benchmark_training

    print(f"--autotune quick: candidates per kernel {quick_autotune()}")
    # Smoke stand-ins: DiT-Mi/4 for S/2 and DiT-Mi/2 for XL/2 in fp32 with SDPA (stage b runs the
    # interpreted kernel in bf16 through train.py's step already), and no compile (minutes on a CPU).
    if smoke:
        small, big, size, small_batch, first, cap = "DiT-Mi/4", "DiT-Mi/2", 8, 4, 2, 4
        options = dict(attn="sdpa", precision="fp32")
    else:
        small, big, size, small_batch, first, cap = "DiT-S/2", "DiT-XL/2", 32, 256, 128, 4096
        options = dict(attn="triton", precision="bf16")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run: numbers mean nothing)"
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else math.inf
    deadline = time.time() + seconds - 15  # 15 s for the last table and the process's exit
    rows, took = [], {}
    notes = [f"each row is `python train.py --benchmark --model M --image-size {size} --batch-size B "
             f"--attn {options['attn']} --precision {options['precision']} [--compile]`, our kernel autotuned "
             f"over QUICK_CONFIGS of assets/benchmark_attention.py (as its --autotune quick)"]

    def write():
        text = benchmark_training.table(rows, name, "bash assets/gpu_check.sh (stage d)")
        text += "\n" + "".join(f"- {n}\n" for n in notes)
        Path(out).write_text(text, encoding="utf-8")

    def row(model, batch, compile=False):
        """One benchmark row, timed and written; the row, or None when it ran out of memory or failed."""
        start = time.time()
        result = benchmark_training.run(model, size, batch, compile=compile, **options)
        took[model, batch, compile] = time.time() - start
        rows.append(result)
        write()
        return result if not (result.get("oom") or result.get("error")) else None

    def in_time(estimate, what):
        if time.time() + estimate < deadline:
            return True
        notes.append(f"{what}: not run, about {estimate:.0f} s needed and {deadline - time.time():.0f} s left")
        return False

    row(small, small_batch)
    eager = best = row(big, first)
    compiled = None
    if smoke:
        notes.append("compile on: skipped in the smoke run (torch.compile takes minutes on a CPU)")
    elif eager:
        compiled = row(big, first, compile=True)
    while best and 2 * best["batch"] <= cap:
        # Twice the last peak, less what does not grow with the batch (fp32 weights, gradients,
        # AdamW's two moments and the EMA: 20 bytes a parameter): a batch sure to run out of
        # memory is never tried, since each try that fits costs a full row.
        predicted = 2 * best["peak_mem_gib"] - 20 * best["params"] / 2**30
        if predicted > 0.95 * total:
            notes.append(f"{big}: batch {2 * best['batch']} not tried: about {predicted:.0f} GiB predicted "
                         f"from batch {best['batch']}'s peak, the GPU has {total:.0f} GiB")
            break
        if not in_time(2 * took[big, best["batch"], False], f"{big} batch {2 * best['batch']}"):
            break
        best = row(big, 2 * best["batch"]) or best
        if rows[-1] is not best:  # out of memory after all, or an error
            break
    if best:
        notes.append(f"{big}: the largest batch that fits (powers of two from {first}): {best['batch']}")
    if compiled and best["batch"] != first:
        estimate = took[big, first, True] + took[big, best["batch"], False] - took[big, first, False]
        if in_time(estimate, f"{big} batch {best['batch']} compiled"):
            row(big, best["batch"], compile=True)
    write()
    print(Path(out).read_text())
    return 1 if any(r.get("error") for r in rows) or not eager else 0


# -----------------------------------------------------------------------------
# Stage e: a short --preset gpu run and its sample grid
# -----------------------------------------------------------------------------

def stage_preset(out, grid, work, smoke):
    import dataset
    import dit
    import train

    quick_autotune()
    run_dir = Path(work) / "e_run"
    if smoke:  # a tiny data set and model: the preset's path, not its cost
        data = dataset.make_shapes_dataset(Path(work) / "shapes", images_per_class=6, image_size=16)
        argv = ["--preset", "gpu", "--out", str(run_dir), "--data", str(data), "--model", "DiT-Mi/4",
                "--image-size", "16", "--batch-size", "8", "--steps", "2", "--workers", "0",
                "--sample-steps", "2", "--log-every", "1", "--device", "cpu"]
    else:  # the built-in data set, generated into data/ the first time, as a user's first run
        argv = ["--preset", "gpu", "--out", str(run_dir), "--steps", "300", "--log-every", "50"]
    report = Report(out, f"# (e) python train.py {' '.join(argv)}: {environment()}")
    start = time.time()
    try:
        summary = train.main(argv)
    except (Exception, SystemExit) as err:  # noqa: BLE001  (train.py's one-line errors are SystemExit)
        report.add(f"FAIL {type(err).__name__}: {str(err).strip()[:300]}", False)
        return report.finish()
    report.add(f"finished in {time.time() - start:.0f} s: {json.dumps(summary)}")
    report.add()
    report.add("metrics.csv:")
    for line in (run_dir / "metrics.csv").read_text().splitlines():
        report.add("  " + line)
    # What backend "auto" settled on for each attention shape it met: True is our kernel.
    learned = getattr(dit, "_triton_works", None)
    report.add("attention 'auto', (q shape, k shape, dtype, with gradients) -> our kernel: " +
               ("not recorded by this dit.py" if learned is None else
                "; ".join(f"{tuple(k[0])}, {tuple(k[1])}, {k[2]}, {k[3]} -> {v}" for k, v in learned.items())
                or "never asked (not on a GPU)"))
    samples = sorted((run_dir / "samples").glob("step_*[0-9].png"))
    if not samples:
        report.add("no sample grid written", False)
        return report.finish()
    shutil.copyfile(samples[-1], grid)
    report.add(f"sample grid: {samples[-1].name} -> {grid}")
    finite = summary is not None and math.isfinite(summary["final_loss"])
    report.add(f"final loss finite: {'ok' if finite else 'FAIL'}", finite)
    return report.finish()


# -----------------------------------------------------------------------------
# Result files, the device, and the pytest plugin of stage a
# -----------------------------------------------------------------------------

def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Report:
    """A result file rewritten in full after every new line: a stage killed by its time limit
    leaves every line it had written, and the file never holds half a line."""

    def __init__(self, path, title):
        self.path, self.lines, self.failures = Path(path), [title, ""], []
        self.lock = threading.Lock()  # stage a adds lines from a second thread
        print(title)
        self.flush()

    def add(self, line="", ok=True):
        with self.lock:
            print(line)
            self.lines.append(line)
            if not ok:
                self.failures.append(line)
            self.flush()

    def flush(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def finish(self):
        """The verdict as the last line; the exit status for main()."""
        if self.failures:
            self.add(f"RESULT: FAILED ({len(self.failures)} line(s) above marked FAIL)")
            return 1
        self.add("RESULT: ok")
        return 0


# The one config each kernel is pinned to for test_dit.py's tests: the smallest tiles, which fit
# every dtype (fp32 too) and head dim. The GPU-only shapes above cover the larger configs.
ONE_CONFIG = {"fwd": (64, 32, 4, 3), "dkdv": (32, 64, 4, 3), "dq": (64, 32, 4, 3)}


def pytest_configure(config):
    for name, tuned in tuned_kernels().items():
        same = [c for c in tuned.configs if config_key(c) == ONE_CONFIG[name]]
        smallest = min(tuned.configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
        tuned.configs = same[:1] or [smallest]


def runs_the_kernel(item):
    """A test whose code names the kernel, Triton or the test device; never this stage's own test."""
    try:
        source = inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return False
    named = re.search(r"flash_attention|flash_attn|\bDEVICE\b", source) or re.search("triton", source, re.I)
    return "gpu_check" not in source and named is not None


def pytest_collection_modifyitems(config, items):
    kept = [item for item in items if runs_the_kernel(item)]
    dropped = [item for item in items if not runs_the_kernel(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


class Tally:
    """Counts outcomes in the process that reports them (with xdist: the controller)."""

    def __init__(self):
        self.passed, self.skipped, self.failed = 0, 0, []

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(f"{report.nodeid} ({report.when})")
        elif report.skipped:
            self.skipped += 1
        elif report.when == "call":
            self.passed += 1


def environment():
    """Device, torch and triton, as one line."""
    import triton

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        dev = (f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
               f"{p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})")
    else:
        dev = f"CPU only ({platform.machine()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')})"
    return (f"{dev}; torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}, "
            f"pytest-xdist {'yes' if importlib.util.find_spec('xdist') else 'no'}")


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("stage", choices=("kernel", "step", "train", "preset"))
    parser.add_argument("--out", help="the stage's result file")
    parser.add_argument("--grid", help="stage preset: where to copy the sample grid")
    parser.add_argument("--work", help="stage preset: a scratch folder for the run")
    parser.add_argument("--seconds", type=float, default=180,
                        help="stage train: its time budget; rows that would not end in it are left out")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error(f"stage {args.stage} needs --out FILE")
    if not args.seconds > 0:
        parser.error(f"--seconds: expected a number > 0, got {args.seconds:g}")
    if args.stage == "preset" and not (args.grid and args.work):
        parser.error("stage preset needs --grid FILE and --work DIR")
    if args.smoke != flash_attn_triton._INTERPRET:
        parser.error("--smoke goes with TRITON_INTERPRET=1 (the kernel on the CPU), and only with it")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: for a dry run on the CPU use --smoke with TRITON_INTERPRET=1")
    if args.stage == "kernel":
        return stage_kernel(args.out, args.smoke)
    if args.stage == "step":
        return stage_step(args.out, args.smoke)
    if args.stage == "train":
        return stage_train(args.out, args.smoke, args.seconds)
    return stage_preset(args.out, args.grid, args.work, args.smoke)


if __name__ == "__main__":
    raise SystemExit(main())
