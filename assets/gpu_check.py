"""
The stages of the GPU check (assets/gpu_check.sh, issue 21) that are not a script of their own.

    python assets/gpu_check.py kernel --out a_kernel.txt  # (a) the kernel, compiled, against float64
    python assets/gpu_check.py step --out b_step.txt      # (b) one DiT-S/2 step: triton = sdpa in bf16
    python assets/gpu_check.py train --out d_train.md     # (d) train.py --benchmark rows, DiT-XL/2 and S/2
    python assets/gpu_check.py preset --out e_preset.txt --grid e_grid.png --work DIR   # (e) --preset gpu
    python assets/gpu_check.py compile --out compile.md   # no GPU needed: every candidate compiled for sm_90

Stage (c), the kernel table, is `assets/benchmark_attention.py --autotune quick`. Each stage rewrites
its result file as results come in, so one cut off by its time limit leaves what it finished. Exit
status: 0 all checks passed, 1 one failed (the file says which), 2 a bad command line. `--smoke`
(with TRITON_INTERPRET=1): the same code at toy sizes on the CPU, numbers meaningless; test_dit.py
runs all five stages so with `bash assets/gpu_check.sh --cpu-smoke DIR`. Also a pytest plugin (stage a).
"""

import argparse
import functools
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import namedtuple
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import triton

ASSETS = Path(__file__).resolve().parent
ROOT = ASSETS.parent
sys.path[:0] = [str(ROOT), str(ASSETS)]
import flash_attn_triton  # noqa: E402
from benchmark_attention import config_key, quick_autotune, tuned_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -----------------------------------------------------------------------------
# Result files
# -----------------------------------------------------------------------------

def environment():
    """Device, torch and triton, as one line."""
    p = torch.cuda.get_device_properties(0) if DEVICE.type == "cuda" else None
    dev = (f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
           f"CUDA {torch.version.cuda})" if p else
           f"CPU only ({platform.machine()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')})")
    return (f"{dev}; torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}, "
            f"pytest-xdist {'yes' if importlib.util.find_spec('xdist') else 'no'}")


class Report:
    """A result file rewritten in full at each add (locked: stage a adds from a second thread), so
    a stage killed by its time limit leaves every line it wrote, never half a line."""

    def __init__(self, path, title):
        self.path, self.lines, self.failed, self.lock = Path(path), [], 0, threading.Lock()
        self.add(title)
        self.lines.append("")  # in the file, a blank line under the title

    def add(self, *lines, ok=True):  # ok=False: the lines count as failed
        with self.lock:
            sys.stdout.write("".join(f"{line}\n" for line in lines))
            self.lines += lines
            self.failed += 0 if ok else len(lines)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)

    def finish(self):  # the verdict as the last line; the exit status for main()
        self.add(f"RESULT: FAILED ({self.failed} line(s) above marked FAIL)" if self.failed else "RESULT: ok")
        return 1 if self.failed else 0


# -----------------------------------------------------------------------------
# Stage a: the compiled kernel against a float64 reference
# -----------------------------------------------------------------------------

# Largest error relative to the reference's largest magnitude, as in test_dit.py.
TOLERANCE = {"bfloat16": 3e-2, "float16": 1e-2}

# One check: B x H heads, N_q queries against N_kv keys, head dim D; layout "contiguous", "fused_qkv"
# (one projection, as DiT's self-attention) or "fused_kv"; lengths: per-sample key lengths, if any.
Case = namedtuple("Case", "label B H N_q N_kv D dtype layout lengths", defaults=(None,))


def case_groups(smoke, key_lengths):
    """The GPU-only shapes, in groups that share compiled kernels (dtype, head dim, layout): each
    group runs in its own process, so that the groups compile in parallel."""
    if smoke:  # toy sizes, ragged against every block; one group per kind of case
        return [[Case("self", 1, 2, 40, 40, 72, "bfloat16", "contiguous")],
                [Case("self", 2, 1, 40, 40, 16, "float16", "fused_qkv")],
                [Case("cross", 1, 2, 40, 2, 72, "bfloat16", "fused_kv")]] + bool(key_lengths) * [
                [Case("key lengths", 2, 2, 40, 40, 16, "bfloat16", "contiguous", (40, 17))]]
    # bf16 contiguous as benchmark_attention.py times it (H = 16 there too: Triton specialises
    # integer arguments on divisibility by 16, so the same H reuses the compiled kernels), and
    # fp16 with the strides of a fused qkv projection and a transposed dO, as in a model.
    groups = [[Case("self", 2 if N <= 1024 else 1, 16, N, N, D, dtype, layout) for N in (256, 1024, 4096, 16384)]
              for dtype, layout in (("bfloat16", "contiguous"), ("float16", "fused_qkv")) for D in (64, 72, 128)]
    # The two training shapes of stages b, d and e, exactly; then cross-attention: DiT's 2
    # condition tokens, a caption's 77, and more keys than queries.
    groups += [[Case("DiT-S/2 as trained", 8, 6, 256, 256, 64, "bfloat16", "fused_qkv")],
               [Case("DiT-XL/2 as trained", 8, 16, 256, 256, 72, "bfloat16", "fused_qkv")],
               [Case("cross", 2, 16, 256, 2, 72, "bfloat16", "fused_kv"),
                Case("cross", 1, 16, 4096, 77, 72, "bfloat16", "fused_kv"),
                Case("cross", 2, 16, 1000, 3000, 72, "bfloat16", "fused_kv")]]
    ragged = [Case("key lengths", 3, 16, 1024, 300, 72, "bfloat16", "fused_kv", (300, 151, 1)),
              Case("key lengths", 3, 16, 256, 256, 64, "bfloat16", "contiguous", (256, 100, 17))]
    return groups + [ragged] * bool(key_lengths)


def make_inputs(case, seed):
    """q, k, v (B, H, N, D) views with the case's strides, dO, and fresh random values."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    randn = functools.partial(torch.randn, generator=gen, device=DEVICE, dtype=getattr(torch, case.dtype))
    B, H, N_q, N_kv, D = case.B, case.H, case.N_q, case.N_kv, case.D
    if case.layout == "contiguous":
        q, k, v = (randn(B, H, N, D).requires_grad_() for N in (N_q, N_kv, N_kv))
        return q, k, v, randn(B, H, N_q, D)
    if case.layout == "fused_qkv":  # (B, N, 3, H, D) from one projection
        q, k, v = randn(B, N_q, 3, H, D).requires_grad_().permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
    else:  # fused_kv: q from the image tokens, k and v from one projection
        q = randn(B, N_q, H, D).requires_grad_().transpose(1, 2)  # (B, H, N_q, D)
        k, v = randn(B, N_kv, 2, H, D).requires_grad_().permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, N_kv, D)
    return q, k, v, randn(B, N_q, H, D).transpose(1, 2)  # dO from a transpose, as in a model


def reference(q, k, v, do, lengths=None):
    """o, dq, dk, dv of softmax(q k^T / sqrt(D)) v in float64 by autograd, sample b over its first lengths[b]
    keys (dk, dv zero past them); one head and query block at a time, so the scores fit at N = 16384."""
    B, H, N_q, D = q.shape
    o, dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float64, device=t.device) for t in (q, q, k, k))
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


def poison(nbytes):
    """NaN in the memory the allocator hands out next: an element the kernel never writes is NaN, not 0."""
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.full((nbytes // 4 + 1,), float("nan"), device=DEVICE)  # freed at once, its block cached


def check_group(cases, smoke, key_lengths):
    """Every case of the group under every plan: (line, ok) each. In a worker process of its own, so
    a plan pins the configs for good: with one candidate the autotuner neither prunes nor times."""
    quick_autotune()  # plan i runs candidate i of each kernel: every --autotune quick config at least once
    lines, lists = [], {name: tuned.configs for name, tuned in tuned_kernels().items()}
    count = 1 if smoke else max(len(c) for c in lists.values())  # the interpreter ignores configs
    plans = [{name: configs[i % len(configs)] for name, configs in lists.items()} for i in range(count)]
    for case in cases:
        tol, lengths = TOLERANCE[case.dtype], case.lengths
        name = (f"{case.label} B={case.B} H={case.H} N={case.N_q}x{case.N_kv} D={case.D} "
                f"{case.dtype} {case.layout}" + (f" lengths={list(lengths)}" if lengths else ""))
        extra = {key_lengths: torch.tensor(lengths, dtype=torch.int32, device=DEVICE)} if lengths else {}
        for i, plan in enumerate(plans):
            configs = "interpreter blocks" if flash_attn_triton._INTERPRET else " ".join(
                f"{kernel} {'{}x{} w{} s{}'.format(*config_key(c))}" for kernel, c in plan.items())
            try:
                q, k, v, do = make_inputs(case, seed=1000 * i + case.N_q + case.D)  # fresh per run
                poison(4 * q.numel() * q.element_size() + 2 * k.numel() * k.element_size())
                for kernel, config in plan.items():
                    tuned_kernels()[kernel].configs = [config]
                o = flash_attn_triton.flash_attention(q, k, v, **extra)
                got = (o, *torch.autograd.grad(o, (q, k, v), do))
                ref = reference(q, k, v, do, lengths)
            except Exception as err:  # noqa: BLE001  (one failing run must not hide the others)
                if type(err).__name__ in ("OutOfResources", "PTXASError"):  # the autotuner skips these too
                    lines.append((f"{name} | {configs} | does not fit this GPU, skipped", True))
                else:
                    why = (str(err).strip().splitlines() or [""])[0][:160]
                    lines.append((f"{name} | {configs} | FAIL {type(err).__name__}: {why}", False))
                continue
            errs, ok = [], True
            for label, g, r in zip(("o", "dq", "dk", "dv"), got, ref):
                err = ((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                ok &= math.isfinite(err) and err < tol  # NaN (an unwritten element) never passes
                errs.append(f"{label} {err:.1e}")
            for b, L in enumerate(lengths or ()):  # masked keys must get exactly no gradient
                if (got[2][b, :, L:] != 0).any() or (got[3][b, :, L:] != 0).any():
                    ok = False
                    errs.append(f"sample {b}: gradient reaches keys past {L}")
            verdict = f"{'ok' if ok else 'FAIL'} (tolerance {tol:.0e})"
            lines.append((f"{name} | {configs} | {', '.join(errs)} | {verdict}", ok))
    return lines


def run_kernel_tests(report, smoke):
    """test_dit.py's kernel tests, in this process (with pytest-xdist, over worker processes, which
    import this plugin by name: hence PYTHONPATH)."""
    import pytest

    args = ["-q", "-p", "no:cacheprovider", "-p", "gpu_check", "-rfE", "--tb=short", str(ROOT / "test_dit.py")]
    if smoke:  # two quick ones: this checks the plumbing, the CPU suite checks the kernel
        args += ["-k", "test_logsumexp_is_stored_in_base_2 or test_rejects_invalid_inputs"]
    elif importlib.util.find_spec("xdist"):  # half the cores: the shapes' workers have the rest
        args += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ASSETS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    reports, start = [], time.time()

    class Tally:  # every test's reports, in the process that reports them (with xdist: the controller)
        def pytest_runtest_logreport(self, report):
            reports.append(report)

    code = pytest.main(args, plugins=[Tally()])
    passed = sum(r.passed and r.when == "call" for r in reports)
    failed = [f"{r.nodeid} ({r.when})" for r in reports if r.failed]
    report.add(f"pytest {' '.join(args)}: exit {int(code)}, {passed} passed, {len(failed)} failed, "
               f"{sum(r.skipped for r in reports)} skipped, in {time.time() - start:.0f} s",
               ok=code == 0 and passed > 0)
    report.add(*(f"  FAIL {nodeid}" for nodeid in failed), ok=False)


def stage_kernel(args):
    """test_dit.py's kernel tests and the GPU-only shapes at once: both mostly wait for Triton's
    compiler. The shapes run in spawned processes (CUDA cannot fork), in the smoke run too, to try
    that path; lines are written as they come, so they interleave, and each says what it is."""
    report = Report(args.out, f"# (a) Kernel correctness, compiled: {environment()}\n\n"
                              "test_dit.py's kernel tests on this device (each autotuned kernel pinned to one small "
                              "config), and GPU-only shapes under every --autotune quick config (o, dq, dk, dv: "
                              "largest error relative to the largest magnitude of a float64 reference)")
    # Issue 20's per-sample key-length argument: a parameter besides q, k, v and scale with "len" in its name.
    key_lengths = next((n for n in inspect.signature(flash_attn_triton.flash_attention).parameters
                        if n not in ("q", "k", "v", "scale") and "len" in n.lower()), None)
    report.add("key lengths: " + (f"flash_attention takes {key_lengths!r}: checked" if key_lengths else
                                  "flash_attention takes none yet (no parameter with 'len' in its name): skipped"))
    groups = case_groups(args.smoke, key_lengths)
    workers = 1 if args.smoke else min(len(groups), max(1, (os.cpu_count() or 2) // 2))

    def record(future, first):  # a group's lines, as soon as its worker returns them
        try:
            lines = future.result()
        except Exception as err:  # noqa: BLE001  (a worker that died: say which group)
            lines = [(f"{first.label} D={first.D} {first.dtype} {first.layout}: FAIL, its worker died: "
                      f"{type(err).__name__}: {err}", False)]
        for line, ok in lines:
            report.add(line, ok=ok)

    start = time.time()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for cases in groups:
            pool.submit(check_group, cases, args.smoke, key_lengths).add_done_callback(
                lambda future, first=cases[0]: record(future, first))
        run_kernel_tests(report, args.smoke)  # meanwhile the pool compiles and checks
    report.add(f"(shapes: {len(groups)} groups in {workers} processes, {time.time() - start:.0f} s with the tests)")
    return report.finish()


# As a pytest plugin (`-p gpu_check`), this file pins each autotuned kernel to one config, so that
# test_dit.py's kernel tests compile it once per dtype and head dim, not once per candidate: the
# smallest tiles, which fit every dtype (fp32 too) and head dim. The shapes above cover the rest.
ONE_CONFIG = {"fwd": (64, 32, 4, 3), "dkdv": (32, 64, 4, 3), "dq": (64, 32, 4, 3)}


def pytest_configure(config):  # ONE_CONFIG where the kernel lists it, else its smallest tiles
    for name, tuned in tuned_kernels().items():
        tuned.configs = [min(tuned.configs, key=lambda c: (config_key(c) != ONE_CONFIG[name],
                                                           c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]


def pytest_collection_modifyitems(config, items):
    """Keep the tests whose code names the kernel, Triton or the test device; never this stage's own."""
    keep, dropped = [], []
    for item in items:
        try:
            source = inspect.getsource(item.function)
        except (AttributeError, OSError, TypeError):
            source = ""
        named = re.search(r"flash_attention|flash_attn|\bDEVICE\b|(?i:triton)", source) and "gpu_check" not in source
        (keep if named else dropped).append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = keep


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
    (loss, grads), (ref_loss, ref_grads) = run, ref
    diff = sum(((grads[n] - g) ** 2).sum() for n, g in ref_grads.items()).sqrt()
    norm = sum((g ** 2).sum() for g in ref_grads.values()).sqrt()
    tensors = {n: ((grads[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in ref_grads.items()
               if g.norm() > 1e-6 * norm}
    worst = max(tensors, key=tensors.get)
    return {"loss": abs(loss - ref_loss) / abs(ref_loss), "grad": (diff / norm).item(),
            "worst": tensors[worst], "worst_name": worst}


def stage_step(args):
    model, size, batch = ("DiT-Mi/2", 8, 4) if args.smoke else ("DiT-S/2", 32, 64)
    report = Report(args.out, f"# (b) One {model} training step ({size} px, batch {batch}): --attn triton "
                              f"against --attn sdpa, both bf16, and an fp32 reference: {environment()}")
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(DEVICE)
    y = torch.randint(0, 10, (batch,), generator=gen).to(DEVICE)
    base = ["--preset", "gpu", "--model", model, "--image-size", str(size), "--batch-size", str(batch),
            "--grad-clip", "0", "--device", DEVICE.type]
    runs = {}
    for name, attn, precision in (("triton bf16", "triton", "bf16"), ("sdpa bf16", "sdpa", "bf16"),
                                  ("sdpa fp32 (reference)", "sdpa", "fp32")):
        try:
            runs[name] = one_step(base + ["--attn", attn, "--precision", precision], x, y, seed=1)
            report.add(f"{name:22s} loss {runs[name][0]:.6f}")
        except Exception as err:  # noqa: BLE001  (the file says why, and the next backend still runs)
            report.add(f"{name:22s} FAIL {type(err).__name__}: {str(err).strip()[:300]}", ok=False)
    if len(runs) < 3:
        return report.finish()
    errs = {name: compare(runs[name], runs["sdpa fp32 (reference)"]) for name in ("triton bf16", "sdpa bf16")}
    errs["triton vs sdpa, bf16"] = compare(runs["triton bf16"], runs["sdpa bf16"])
    report.add("", "| compared | loss rel. err | gradient rel. err (all) | worst tensor rel. err | worst tensor |",
               "|---|---:|---:|---:|---|", *(f"| {name} | {e['loss']:.2e} | {e['grad']:.2e} | {e['worst']:.2e} | "
                                             f"{e['worst_name']} |" for name, e in errs.items()), "")
    # Within bf16 tolerance: our kernel may not be further from fp32 than PyTorch's own bf16
    # attention is, beyond twice that plus a floor (three times for the noisier single tensors).
    t, s = errs["triton bf16"], errs["sdpa bf16"]
    for key, factor in (("loss", 2), ("grad", 2), ("worst", 3)):
        bound = factor * s[key] + 2e-3
        report.add(f"{key}: triton {t[key]:.2e} <= {factor} x sdpa {s[key]:.2e} + 2e-3 = {bound:.2e}: "
                   f"{'ok' if t[key] <= bound else 'FAIL'}", ok=t[key] <= bound)
    return report.finish()


# -----------------------------------------------------------------------------
# Stages d and e: train.py --benchmark rows, and a short --preset gpu run with its sample grid
# -----------------------------------------------------------------------------

def stage_train(args):
    """DiT-S/2, then DiT-XL/2 at 256 tokens in bf16 with our kernel: eager and compiled at batch
    128, eager at doubled batches while one is predicted to fit in memory and in the time left,
    then compiled at the largest that fit. Each row is one `train.py --benchmark`, the table rewritten."""
    import benchmark_training

    print(f"--autotune quick: candidates per kernel {quick_autotune()}")
    # Smoke stand-ins: DiT-Mi/4 for S/2 and DiT-Mi/2 for XL/2 in fp32 with SDPA (stage b runs the
    # interpreted kernel in bf16 through train.py's step already), and no compile (minutes on a CPU).
    small, big, size, small_batch, first, cap, attn, precision = (
        ("DiT-Mi/4", "DiT-Mi/2", 8, 4, 2, 4, "sdpa", "fp32") if args.smoke else
        ("DiT-S/2", "DiT-XL/2", 32, 256, 128, 4096, "triton", "bf16"))
    name, total = ((torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / 2**30)
                   if DEVICE.type == "cuda" else ("CPU (smoke run: numbers mean nothing)", math.inf))
    deadline = time.time() + args.seconds - 15  # 15 s for the last table and the process's exit
    rows, took = [], {}
    notes = [f"each row is `python train.py --benchmark --model M --image-size {size} --batch-size B "
             f"--attn {attn} --precision {precision} [--compile]`, our kernel autotuned "
             f"over QUICK_CONFIGS of assets/benchmark_attention.py (as its --autotune quick)"]

    def write():
        text = benchmark_training.table(rows, name, "bash assets/gpu_check.sh (stage d)")
        Path(args.out).write_text(text + "\n" + "".join(f"- {n}\n" for n in notes), encoding="utf-8")

    def row(model, batch, compile=False, estimate=None):
        """A row, timed and written, unless `estimate` says it would overrun; None if not run or it failed."""
        if estimate is not None and time.time() + estimate >= deadline:
            notes.append(f"{model} batch {batch}{' compiled' * compile}: not run, about {estimate:.0f} s "
                         f"needed and {deadline - time.time():.0f} s left")
            return None
        start = time.time()
        rows.append(benchmark_training.run(model, size, batch, attn, precision, compile))
        took[model, batch, compile] = time.time() - start
        write()
        return None if rows[-1].get("oom") or rows[-1].get("error") else rows[-1]

    row(small, small_batch)
    eager = best = row(big, first)
    compiled = row(big, first, compile=True) if eager and not args.smoke else None
    if args.smoke:
        notes.append("compile on: skipped in the smoke run (torch.compile takes minutes on a CPU)")
    while best and 2 * best["batch"] <= cap:
        # Twice the last peak, less what does not grow with the batch (fp32 weights, gradients, AdamW's
        # two moments, the EMA: 20 bytes a parameter): a sure OOM is not tried, as each try costs a row.
        predicted = 2 * best["peak_mem_gib"] - 20 * best["params"] / 2**30
        if predicted > 0.95 * total:
            notes.append(f"{big}: batch {2 * best['batch']} not tried: about {predicted:.0f} GiB predicted "
                         f"from batch {best['batch']}'s peak, the GPU has {total:.0f} GiB")
            break
        if not (bigger := row(big, 2 * best["batch"], estimate=2 * took[big, best["batch"], False])):
            break  # not in time, out of memory after all, or an error
        best = bigger
    if best:
        notes.append(f"{big}: the largest batch that fits (powers of two from {first}): {best['batch']}")
    if compiled and best["batch"] != first:
        row(big, best["batch"], compile=True,
            estimate=took[big, first, True] + took[big, best["batch"], False] - took[big, first, False])
    write()
    print(Path(args.out).read_text())
    return 1 if any(r.get("error") for r in rows) or not eager else 0


def stage_preset(args):
    import dataset
    import dit
    import train

    quick_autotune()
    run_dir = Path(args.work) / "e_run"
    if args.smoke:  # a tiny data set and model: the preset's path, not its cost
        data = dataset.make_shapes_dataset(Path(args.work) / "shapes", images_per_class=6, image_size=16)
        argv = ["--preset", "gpu", "--out", str(run_dir), "--data", str(data), "--model", "DiT-Mi/4",
                "--image-size", "16", "--batch-size", "8", "--steps", "2", "--workers", "0",
                "--sample-steps", "2", "--log-every", "1", "--device", "cpu"]
    else:  # the built-in data set, generated into data/ the first time, as a user's first run
        argv = ["--preset", "gpu", "--out", str(run_dir), "--steps", "300", "--log-every", "50"]
    report = Report(args.out, f"# (e) python train.py {' '.join(argv)}: {environment()}")
    start = time.time()
    try:
        summary = train.main(argv)
    except (Exception, SystemExit) as err:  # noqa: BLE001  (train.py's one-line errors are SystemExit)
        report.add(f"FAIL {type(err).__name__}: {str(err).strip()[:300]}", ok=False)
        return report.finish()
    report.add(f"finished in {time.time() - start:.0f} s: {json.dumps(summary)}", "", "metrics.csv:",
               *("  " + line for line in (run_dir / "metrics.csv").read_text().splitlines()))
    # What backend "auto" settled on for each attention shape it met: True is our kernel.
    learned = getattr(dit, "_triton_works", None)
    report.add("attention 'auto', (q shape, k shape, dtype, with gradients) -> our kernel: " +
               ("not recorded by this dit.py" if learned is None else
                "; ".join(f"{tuple(k[0])}, {tuple(k[1])}, {k[2]}, {k[3]} -> {v}" for k, v in learned.items())
                or "never asked (not on a GPU)"))
    samples = sorted((run_dir / "samples").glob("step_*[0-9].png"))
    if samples:
        shutil.copyfile(samples[-1], args.grid)
    report.add(f"sample grid: {samples[-1].name} -> {args.grid}" if samples else "no sample grid written",
               ok=bool(samples))
    finite = summary is not None and math.isfinite(summary["final_loss"])
    report.add(f"final loss finite: {'ok' if finite else 'FAIL'}", ok=finite)
    return report.finish()


# -----------------------------------------------------------------------------
# Without a GPU: the kernels compiled for an H100 (sm_90)
# -----------------------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHARED_LIMIT = 227 * 1024  # the most shared memory one thread block may use on an H100


def compile_for_sm90(kernel, dtype, D, blocks, warps, stages, key_lengths=False, vec=None, H=16, N=1024):
    """One kernel config compiled for an H100 on any machine (Triton can target a GPU it does not
    have), specialised as Triton's JIT specialises a launch on contiguous (B, H, N, D) tensors:
    integer arguments equal to 1 become constants, those divisible by 16 (and the pointers) are marked
    so, and VEC is what the launcher would compute (or `vec`). Needs a process without TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    vec = vec or flash_attn_triton._vector_width(torch.empty(2, H, N, D, dtype=DTYPES[dtype]))
    constexprs = {**blocks, "BLOCK_D": max(16, triton.next_power_of_2(D)), "VEC": vec}
    if "DOT_PRECISION" in kernel.arg_names:
        constexprs["DOT_PRECISION"] = "tf32"
    if "HAS_KEY_LENGTHS" in kernel.arg_names:
        constexprs["HAS_KEY_LENGTHS"] = key_lengths
        if not key_lengths:
            constexprs["KEY_LENGTHS"] = None  # the launcher passes None, which Triton makes a constant
    values = {"H": H, "N_Q": N, "N_KV": N, "D": D}
    types, aligned = {}, []
    for i, name in enumerate(kernel.arg_names):
        if name.startswith("stride"):
            values[name] = {"b": H * N * D, "h": N * D, "n": D, "d": 1}[name[-1]]
            if values[name] == 1:
                constexprs[name] = 1
        if name in constexprs:
            types[name] = "constexpr"
        elif name in values:
            types[name] = "i32"
            if values[name] % 16 == 0:
                aligned.append(i)
        elif name == "sm_scale":
            types[name] = "fp32"
        else:  # a pointer; allocations are 16-byte aligned
            types[name] = {"KEY_LENGTHS": "*i32", "LSE": "*fp32", "DELTA": "*fp32"}.get(name, "*" + dtype)
            aligned.append(i)
    source = ASTSource(fn=kernel, signature=types, constexprs={(kernel.arg_names.index(n),): v
                                                               for n, v in constexprs.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def resources(compiled):
    """What a compiled kernel uses: shared memory, registers and spilled bytes per thread (by
    cuobjdump, which Triton ships; None without it), and how it reads global memory."""
    regs = spill = None
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
        found = dict(re.findall(r"\b(REG|STACK):(\d+)", usage))
        regs, spill = (int(found[k]) if k in found else None for k in ("REG", "STACK"))
    loads = re.findall(r"\bld\.global[\w.:]*", compiled.asm["ptx"])
    return {"shared": compiled.metadata.shared, "registers": regs, "spill": spill,
            # a 16-bit element loaded alone: the tile is not moved in vectors
            "scalar_loads": any(w.endswith(".b16") and ".v" not in w for w in loads),
            "async_copies": len(re.findall(r"\bcp\.async\.c[ag]\.", compiled.asm["ptx"]))}


def stage_compile(args):
    """Every autotune candidate of the three attention kernels, bf16, D = 64, 72, 128, compiled for
    sm_90: fails on a compile error, shared memory over the limit, or a tile loaded element by element."""
    report = Report(args.out, "# The attention kernels compiled for sm_90 (H100), on this machine")
    report.add(f"`python assets/gpu_check.py compile --out {Path(args.out).name}`; {environment()}", "",
               "Contiguous (B, 16, 1024, D) bf16 tensors; spill: bytes per thread in local memory (0 is best); "
               "async copies: cp.async instructions, the pipelined K/V (or Q, dO) loads.", "",
               "| kernel | D | BLOCK_M x BLOCK_N | warps | stages | shared KiB | registers | spill | "
               "vector loads | async copies |", "|---|---:|---|---:|---:|---:|---:|---:|---|---:|")
    for name, tuned in tuned_kernels().items():
        for D in (64, 72, 128):
            for config in tuned.configs:
                m, n, warps, stages = config_key(config)
                row = f"| {name} | {D} | {m} x {n} | {warps} | {stages} |"
                try:
                    r = resources(compile_for_sm90(tuned.fn, "bf16", D, config.kwargs, warps, stages))
                except Exception as err:  # noqa: BLE001 - the row says which config and why
                    reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else ""
                    report.add(f"{row} FAIL: {type(err).__name__}: {reason} |", ok=False)
                    continue
                ok = r["shared"] <= SHARED_LIMIT and not r["scalar_loads"]
                report.add(f"{row} {r['shared'] / 1024:.0f} | {r['registers']} | {r['spill']} | "
                           f"{'no: FAIL' if r['scalar_loads'] else 'yes'} | {r['async_copies']} |"
                           + ("" if r["shared"] <= SHARED_LIMIT else " FAIL: over 227 KiB"), ok=ok)
    return report.finish()


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("stage", choices=("kernel", "step", "train", "preset", "compile"))
    parser.add_argument("--out", required=True, help="the stage's result file")
    parser.add_argument("--grid", help="stage preset: where to copy the sample grid")
    parser.add_argument("--work", help="stage preset: a scratch folder for the run")
    parser.add_argument("--seconds", type=float, default=180,
                        help="stage train: its time budget; rows that would not end in it are left out")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        parser.error(f"--seconds: expected a number > 0, got {args.seconds:g}")
    if args.stage == "preset" and not (args.grid and args.work):
        parser.error("stage preset needs --grid FILE and --work DIR")
    if args.stage == "compile":
        if flash_attn_triton._INTERPRET or args.smoke:
            parser.error("stage compile compiles for a GPU: run it without TRITON_INTERPRET and without --smoke")
        return stage_compile(args)
    if args.smoke != flash_attn_triton._INTERPRET:
        parser.error("--smoke goes with TRITON_INTERPRET=1 (the kernel on the CPU), and only with it")
    if not args.smoke and DEVICE.type != "cuda":
        parser.error("no CUDA device here: for a dry run on the CPU use --smoke with TRITON_INTERPRET=1")
    return {"kernel": stage_kernel, "step": stage_step, "train": stage_train, "preset": stage_preset}[args.stage](args)


if __name__ == "__main__":
    raise SystemExit(main())
