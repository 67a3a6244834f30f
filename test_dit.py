"""
Tests for the whole project, on the CPU in a few minutes:  python -m pytest -q test_dit.py

Each test checks a property a real bug would break: equivalence to an independent reference,
identity at initialisation, a loss that falls, a resumed run identical to an uninterrupted one.
The Triton kernel runs through the Triton interpreter when there is no GPU (never skipped), and
compiled on the GPU when there is one.
"""

import os

import torch

if not torch.cuda.is_available():  # must happen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses
import inspect
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import dataset
import dit
import flash_attn_triton
import sample
import train
from config import ConfigError, SampleConfig, TrainConfig, TRAIN_PRESETS, parse_args
from dataset import (DatasetError, ImageFolder, check_batch_size,
                     ensure_builtin_dataset, make_shapes_dataset)
from flash_attn_triton import flash_attention

sys.path.insert(0, str(Path(__file__).parent / "assets"))
import evaluate  # noqa: E402  (assets/evaluate.py)


# -----------------------------------------------------------------------------
# Shared fixtures and helpers
# -----------------------------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parent


def randomize(model, std=0.05, seed=0):
    """Give the zero-initialised layers values, so that outputs depend on every part of the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny_model(**kwargs):
    args = dict(input_size=8, in_channels=3, num_classes=5)
    args.update(kwargs)
    return dit.DiT_models["DiT-Mi/2"](**args)


def tiny_text_model(**kwargs):
    """Words that see each other (text_depth 1, not the default bag), so the tests cover both."""
    args = dict(input_size=8, in_channels=3, learn_sigma=False, text_depth=1, max_caption_bytes=32)
    args.update(kwargs)
    return dit.TextDiT_models["TextDiT-Mi/2"](**args)


def decode_captions(tokens):
    """(N, L) tokens -> the N captions as text: tokenize's inverse."""
    return [bytes(b for b in row.tolist() if b < 256).decode("utf-8", errors="replace") for row in tokens]


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def rgb(x):
    """Mean colour of an image tensor in [-1, 1], as 0..255 per channel."""
    return ((x.mean(dim=(1, 2)) + 1) * 127.5).tolist()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    make_shapes_dataset(root, images_per_class=6, image_size=16, seed=0)
    return root


def tiny_args(data, out, steps, *extra):
    return ["--data", str(data), "--out", str(out), "--model", "DiT-Mi/4", "--image-size", "16",
            "--batch-size", "8", "--steps", str(steps), "--log-every", "2", "--ckpt-every", "2",
            "--sample-every", "0", "--sample-steps", "2", "--warmup-steps", "2", "--device", "cpu", *extra]


TINY_RUN = ("--lr", "3e-3", "--log-every", "20")


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    summary = train.main(tiny_args(tiny_data, out, 80, *TINY_RUN))
    return out, summary


def run_sample(run, out, *extra):
    return sample.main(["--ckpt", str(run), "--out", str(out), "--steps", "4", "--num", "2", *extra])


def png_pixels(path):
    """A PNG file's pixels, (3, H, W) uint8: the layout of torchvision's make_grid and save_image."""
    image = Image.open(path).convert("RGB")
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    return pixels.permute(2, 0, 1)


def tile(grid, row, col, size=16):
    """The image at (row, col) of a make_grid grid with 1 px of padding."""
    top, left = 1 + row * (size + 1), 1 + col * (size + 1)
    return grid[:, top:top + size, left:left + size]


# -----------------------------------------------------------------------------
# Model: shapes, sizes, layout
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,channels,learn_sigma", [
    ("DiT-Mi/2", 8, 3, True), ("DiT-Mi/4", 16, 3, False), ("DiT-Ti/4", 32, 3, False), ("DiT-S/8", 32, 4, True)])
def test_output_shape(name, size, channels, learn_sigma):
    model = dit.DiT_models[name](input_size=size, in_channels=channels, num_classes=7, learn_sigma=learn_sigma)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]), torch.tensor([1, 6]))
    assert out.shape == (2, channels * (2 if learn_sigma else 1), size, size)


def test_state_dict_has_reference_layout():
    with torch.device("meta"):
        sd = dit.DiT_models["DiT-S/2"]().state_dict()
    expected = {
        "pos_embed": (1, 256, 384), "x_embedder.proj.weight": (384, 4, 2, 2), "x_embedder.proj.bias": (384,),
        "t_embedder.mlp.0.weight": (384, 256), "t_embedder.mlp.2.weight": (384, 384),
        "y_embedder.embedding_table.weight": (1001, 384),
        "blocks.11.attn.qkv.weight": (1152, 384), "blocks.11.attn.proj.weight": (384, 384),
        "blocks.0.mlp.fc1.weight": (1536, 384), "blocks.0.mlp.fc2.bias": (384,),
        "blocks.0.adaLN_modulation.1.weight": (2304, 384), "final_layer.linear.weight": (32, 384),
        "final_layer.adaLN_modulation.1.bias": (768,)}
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 1 + 2 + 4 + 1 + 12 * 10 + 4  # pos, patch, t-MLP, labels, 12 blocks, final


def test_pos_embed_matches_reference_numpy_formula():
    import numpy as np
    dim, grid = 64, 4
    # The MAE/DiT reference: meshgrid(w, h), first half of channels from grid[0] (the column).
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    ref = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    ours = dit.sincos_pos_embed_2d(dim, grid)
    assert torch.allclose(ours, torch.from_numpy(ref).float(), atol=1e-6)
    assert dit.DiT_models["DiT-Mi/2"](input_size=8).pos_embed.requires_grad is False


def test_timestep_embedding_is_cos_then_sin():
    emb = dit.timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(5 * freqs), torch.sin(5 * freqs)]))


def _multihead_like(ours, qkv_weights, qkv_biases):
    """nn.MultiheadAttention with our layer's weights (q;k;v stacked as PyTorch stacks them), on its device."""
    ref = nn.MultiheadAttention(ours.proj.in_features, ours.num_heads, batch_first=True).to(ours.proj.weight.device)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat(qkv_weights))
        ref.in_proj_bias.copy_(torch.cat(qkv_biases))
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    return ref


def test_attention_layout_matches_torch_multihead_attention():
    """Fused q;k;v with heads split as reshape(B, N, 3, H, D) is exactly nn.MultiheadAttention's layout."""
    torch.manual_seed(0)
    ours = dit.Attention(32, 4, backend="math")
    ref = _multihead_like(ours, [ours.qkv.weight], [ours.qkv.bias])
    x = torch.randn(3, 10, 32)
    assert torch.allclose(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-5)


# -----------------------------------------------------------------------------
# Model: initialisation and the label embedder
# -----------------------------------------------------------------------------

def test_fresh_model_outputs_zero_and_blocks_are_identity():
    model = tiny_model()
    x = torch.randn(4, 3, 8, 8)
    t, y = torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 3])
    assert torch.equal(model(x, t, y), torch.zeros(4, 6, 8, 8))
    tokens = torch.randn(4, 16, 64)
    c = torch.randn(4, 64)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)
    # The zero comes from the zero-initialised final layer, not from a model that ignores x:
    nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    out = model(x, t, y)
    assert out.abs().max() > 0 and not torch.equal(out, model(x + 1, t, y))


def test_label_dropout_uses_null_class_only_in_training():
    model = tiny_model(class_dropout_prob=1.0)
    emb = model.y_embedder
    y = torch.tensor([0, 1, 2])
    assert torch.equal(emb(y, train=True), emb.embedding_table.weight[[5, 5, 5]])
    assert torch.equal(emb(y, train=False), emb.embedding_table.weight[[0, 1, 2]])
    assert tiny_model(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 5


def test_label_dropout_replaces_the_given_fraction_of_labels():
    torch.manual_seed(0)
    emb = dit.LabelEmbedder(5, 8, dropout_prob=0.3)
    y = torch.arange(20_000) % 5
    out = emb(y, train=True)
    null = (out == emb.embedding_table.weight[5]).all(dim=1)
    assert abs(null.float().mean().item() - 0.3) < 0.015  # binomial std 0.0032
    for k in range(5):  # whatever the label: 4000 draws each, std 0.0072
        assert abs(null[y == k].float().mean().item() - 0.3) < 0.035
    assert torch.equal(out[~null], emb.embedding_table.weight[y[~null]])
    assert torch.equal(emb(y, train=False), emb.embedding_table.weight[y])


# -----------------------------------------------------------------------------
# Model: the paper's four conditioning designs (Sec. 3.2, Fig. 3, Table 4)
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("conditioning", dit.CONDITIONINGS)
def test_each_design_starts_as_designed(conditioning):
    """Every design outputs zero at first (zero output layer); only adaLN-Zero's blocks are identities."""
    model = tiny_model(conditioning=conditioning)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 3])
    assert torch.equal(model(x, t, y), torch.zeros(2, 6, 8, 8))
    block = model.blocks[0]
    tokens = torch.randn(2, 16, 64)
    if conditioning == "in-context":  # t and y are tokens; the LayerNorms have a scale and shift of their own
        assert block.norm1.weight.shape == (64,) and not hasattr(block, "adaLN_modulation")
        assert (block(tokens, None) - tokens).abs().mean() > 0.1  # an ordinary block from the start (0.43)
        return
    if conditioning == "cross-attn":  # the context [t; y] is attended to; no adaLN vector
        c, run = torch.randn(2, 2, 64), lambda c: block(tokens, None, c)
    else:  # t + y sets the norms
        c, run = torch.randn(2, 64), lambda c: block(tokens, c)
    out = run(c)
    if conditioning == "adaln-zero":
        assert torch.equal(out, tokens)
    else:  # ordinary initialisation: c changes the block's output from the first step
        # a block left at identity, or blind to c, gives 0
        assert (out - tokens).abs().mean() > 0.1
        assert (run(torch.randn_like(c)) - out).abs().mean() > 0.1


def test_in_context_block_is_a_standard_vit_block():
    """Checked against PyTorch's own pre-norm transformer layer with the same weights."""
    torch.manual_seed(0)
    block = randomize(dit.DiTBlock(64, 4, attn_backend="math", conditioning="in-context"))
    ref = nn.TransformerEncoderLayer(64, 4, dim_feedforward=256, dropout=0.0, layer_norm_eps=1e-6,
                                     activation=lambda x: F.gelu(x, approximate="tanh"),
                                     batch_first=True, norm_first=True)
    with torch.no_grad():
        for ours, theirs in [("attn.qkv", "self_attn.in_proj"), ("attn.proj", "self_attn.out_proj"),
                             ("mlp.fc1", "linear1"), ("mlp.fc2", "linear2"), ("norm1", "norm1"), ("norm2", "norm2")]:
            for kind in ("weight", "bias"):
                ref.get_parameter(f"{theirs}_{kind}" if theirs.endswith("in_proj") else f"{theirs}.{kind}").copy_(
                    block.get_parameter(f"{ours}.{kind}"))
    x = torch.randn(3, 10, 64)
    torch.testing.assert_close(block(x, None), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_cross_attention_matches_torch_multihead_attention(backend):
    """10 image tokens attend to 2 condition tokens (N_q != N_kv); q;k;v stacked as PyTorch stacks them."""
    torch.manual_seed(0)
    ours = dit.CrossAttention(32, 4, backend=backend)
    ref = _multihead_like(ours, [ours.q.weight, ours.kv.weight], [ours.q.bias, ours.kv.bias])
    x, context = torch.randn(3, 10, 32), torch.randn(3, 2, 32)
    torch.testing.assert_close(ours(x, context), ref(x, context, context, need_weights=False)[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conditioning", dit.CONDITIONINGS)
def test_each_design_is_conditioned_on_t_and_y_per_sample(conditioning):
    torch.manual_seed(0)
    model = randomize(tiny_model(conditioning=conditioning)).eval()
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([10, 400, 900]), torch.tensor([1, 3, 4])
    out = model(x, t, y)
    for t2, y2 in [(t, torch.tensor([2, 3, 4])), (torch.tensor([600, 400, 900]), y)]:  # sample 0 changes
        other = model(x, t2, y2)
        # mean changes of 0.010 to 0.068 measured; a mean, so that a few stray pixels cannot pass
        assert (other[0] - out[0]).abs().mean() > 3e-3             # its output follows its t and y ...
        torch.testing.assert_close(other[1:], out[1:], atol=1e-6, rtol=0)  # ... and no other sample's


@pytest.mark.parametrize("conditioning", dit.CONDITIONINGS)
def test_each_design_returns_every_patch_to_its_place(conditioning):
    """With every residual branch silenced, each block is the identity, so an output patch can only
    depend on its own input patch: a model that dropped the wrong tokens (in-context), or shuffled
    them, would move a change elsewhere."""
    torch.manual_seed(0)
    model = randomize(tiny_model(conditioning=conditioning)).eval()
    with torch.no_grad():
        for name, p in model.blocks.named_parameters():
            if name.split(".")[-2] in ("proj", "fc2"):  # the last layer of each branch
                p.zero_()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 3])
    x2 = x.clone()
    x2[:, :, 4:6, 2:4] += 1  # one 2x2 patch, the 11th of 16
    changed = (model(x2, t, y) - model(x, t, y)).abs().amax(dim=(0, 1)) > 1e-6  # (8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:6, 2:4] = True
    assert torch.equal(changed, expected)


# -----------------------------------------------------------------------------
# Model: attention backends, per-sample key lengths and the "auto" fallback
# -----------------------------------------------------------------------------

def test_attention_backends_agree():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    t, y = torch.tensor([3, 700], device=DEVICE), torch.tensor([1, 4], device=DEVICE)
    outputs = {}
    for backend in ("math", "sdpa", "triton"):
        torch.manual_seed(1)  # the same weights for each backend
        model = randomize(tiny_model(attn_backend=backend)).to(DEVICE).eval()
        outputs[backend] = model(x, t, y)
    assert outputs["math"].abs().mean() > 0.1  # measured 0.28: a real output, so atol 1e-5 below means something
    torch.testing.assert_close(outputs["sdpa"], outputs["math"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs["triton"], outputs["math"], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", ["math", "sdpa", "triton"])
def test_key_lengths_match_multihead_attention_with_key_padding_mask(backend):
    """Self-attention over padded captions and image tokens attending to them, against PyTorch's
    own key_padding_mask (True = ignore), forward and backward: inputs and weights."""
    torch.manual_seed(0)
    self_attn = dit.Attention(32, 4, backend=backend).to(DEVICE)
    cross_attn = dit.CrossAttention(32, 4, backend=backend).to(DEVICE)
    self_ref = _multihead_like(self_attn, [self_attn.qkv.weight], [self_attn.qkv.bias])
    cross_ref = _multihead_like(cross_attn, [cross_attn.q.weight, cross_attn.kv.weight],
                                [cross_attn.q.bias, cross_attn.kv.bias])
    x = torch.randn(3, 10, 32, device=DEVICE, requires_grad=True)
    caption = torch.randn(3, 7, 32, device=DEVICE, requires_grad=True)
    key_lengths = torch.tensor([7, 1, 4], device=DEVICE)
    ignore = torch.arange(7, device=DEVICE) >= key_lengths[:, None]  # (B, M), True = padding

    cases = {  # name: (ours, PyTorch's, inputs, our in-projection weights, our layer, PyTorch's layer)
        "self": (lambda lengths: self_attn(caption, key_lengths=lengths),
                 lambda: self_ref(caption, caption, caption, key_padding_mask=ignore, need_weights=False)[0],
                 (caption,), [self_attn.qkv.weight], self_attn, self_ref),
        "cross": (lambda lengths: cross_attn(x, caption, key_lengths=lengths),
                  lambda: cross_ref(x, caption, caption, key_padding_mask=ignore, need_weights=False)[0],
                  (x, caption), [cross_attn.q.weight, cross_attn.kv.weight], cross_attn, cross_ref),
    }
    for name, (ours, theirs, inputs, in_weights, layer, ref) in cases.items():
        out, expected = ours(key_lengths), theirs()
        assert (out - ours(None)).abs().max() > 1e-2, name  # the padding does matter here
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4, msg=name)
        grad_out = torch.randn_like(out)
        got = torch.autograd.grad(out, (*inputs, *in_weights, layer.proj.weight), grad_out)
        want = torch.autograd.grad(expected, (*inputs, ref.in_proj_weight, ref.out_proj.weight), grad_out)
        n = len(inputs)
        got = (*got[:n], torch.cat(got[n:-1]), got[-1])  # our q;k;v weights stacked as PyTorch's
        for what, g, w in zip(("input",) * n + ("in-projection", "out-projection"), got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=f"{name}: {what} gradient")


def test_auto_backend_is_sdpa_on_cpu():
    q = k = v = torch.randn(1, 2, 5, 16)
    assert torch.equal(dit.attention(q, k, v, "auto"), torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.fixture
def pretend_gpu(monkeypatch):
    """Backend "auto" as on a GPU, on CPU tensors, with nothing yet learned about the kernel."""
    monkeypatch.setattr(dit, "AUTO_TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(dit, "_triton_works", {})
    dit._triton_imports.cache_clear()
    yield
    dit._triton_imports.cache_clear()


def _qkv(n, requires_grad=False):
    return [torch.randn(1, 2, n, 16, requires_grad=requires_grad) for _ in range(3)]


def test_auto_falls_back_to_sdpa_once_per_failing_shape(pretend_gpu, monkeypatch):
    tried = []

    def kernel(q, k, v):
        tried.append(q.shape[2])
        if q.shape[2] == 7:
            raise RuntimeError("out of resources: shared memory")
        return torch.zeros_like(q)  # a marker: not what SDPA computes
    monkeypatch.setattr(flash_attn_triton, "flash_attention", kernel)
    bad, good = _qkv(7), _qkv(5)
    with pytest.warns(UserWarning) as record:
        for _ in range(3):
            assert torch.equal(dit.attention(*bad, "auto"), F.scaled_dot_product_attention(*bad))
            assert torch.equal(dit.attention(*good, "auto"), torch.zeros(1, 2, 5, 16))
    messages = [str(w.message) for w in record if "attention 'auto'" in str(w.message)]
    assert len(messages) == 1, messages  # once, however often the shape comes back
    assert "(1, 2, 7, 16)" in messages[0] and "RuntimeError: out of resources" in messages[0]
    assert tried.count(7) == 1  # and the failing shape is not tried again
    with pytest.raises(RuntimeError, match="out of resources"):  # an explicit choice is not overruled
        dit.attention(*bad, "triton")


def test_auto_falls_back_when_only_the_backward_kernel_fails(pretend_gpu, monkeypatch):
    class ForwardOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            return F.scaled_dot_product_attention(q, k, v) + 1  # + 1: tells the kernel's output apart

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("backward kernel failed to compile")
    monkeypatch.setattr(flash_attn_triton, "flash_attention", ForwardOnly.apply)
    q, k, v = _qkv(6, requires_grad=True)
    with pytest.warns(UserWarning, match="failed for q.*backward kernel failed to compile"):
        out = dit.attention(q, k, v, "auto")
    out.sum().backward()  # training goes on, through SDPA
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref).sum().backward()
    torch.testing.assert_close(q.grad, ref[0].grad)
    with torch.no_grad():  # without gradients the forward kernel still serves this shape
        torch.testing.assert_close(dit.attention(q, k, v, "auto"), F.scaled_dot_product_attention(q, k, v) + 1)


def test_auto_trial_run_survives_gradient_checkpointing(pretend_gpu, monkeypatch):
    """The first call of a shape tries the kernel's backward inside the model's forward; under
    gradient checkpointing that trial must stay out of the checkpoint's saved tensors."""
    monkeypatch.setattr(flash_attn_triton, "flash_attention", lambda q, k, v: dit.attention(q, k, v, "math"))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4])
    grads = []
    for checkpointing in (True, False):
        torch.manual_seed(1)
        model = randomize(tiny_model(grad_checkpointing=checkpointing))
        model(x, t, y).square().sum().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_auto_warns_once_when_triton_cannot_be_imported(pretend_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn_triton", None)  # makes the import raise ImportError
    with pytest.warns(UserWarning) as record:
        for n in (5, 7, 5):
            q, k, v = _qkv(n)
            assert torch.equal(dit.attention(q, k, v, "auto"), F.scaled_dot_product_attention(q, k, v))
    messages = [str(w.message) for w in record if "attention 'auto'" in str(w.message)]
    assert len(messages) == 1 and "cannot be imported (ModuleNotFoundError" in messages[0], messages
    with pytest.raises(RuntimeError, match="cannot be imported"):
        dit.attention(q, k, v, "triton")


def test_auto_tries_the_key_length_kernel_apart_and_falls_back_to_masked_sdpa(pretend_gpu, monkeypatch):
    """With key lengths the kernel is another compiled kernel: "auto" tries it on its own, and
    when it fails, SDPA with the mask takes over those calls, while the same shape without
    lengths keeps the kernel. A bad length is the caller's error: raised, not taken for a
    kernel failure."""
    calls = []

    def kernel(q, k, v, key_lengths=None):
        calls.append(key_lengths)
        if key_lengths is not None:
            raise RuntimeError("out of resources: the key-length variant")
        return torch.zeros_like(q)  # a marker: not what SDPA computes
    monkeypatch.setattr(flash_attn_triton, "flash_attention", kernel)
    q, k, v = (torch.randn(2, 2, 5, 16) for _ in range(3))

    with pytest.raises(ValueError, match="a length of 0 masks every key"):
        dit.attention(q, k, v, "auto", key_lengths=torch.tensor([0, 5]))
    assert calls == []
    for attempt, lengths in enumerate(([2, 5], [5, 1], [3, 3])):
        lengths = torch.tensor(lengths)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out = dit.attention(q, k, v, "auto", key_lengths=lengths)
        expected = dit.attention(q, k, v, "math", key_lengths=lengths)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
        messages = [str(w.message) for w in record if "attention 'auto'" in str(w.message)]
        if attempt == 0:  # tried once, with these lengths, and the failure said so
            assert len(calls) == 1 and torch.equal(calls[0], lengths)
            assert len(messages) == 1 and "(2, 2, 5, 16) with key lengths" in messages[0], messages
        else:  # remembered: not tried again, not warned about again
            assert messages == [] and all(c is None for c in calls[1:])
        assert torch.equal(dit.attention(q, k, v, "auto"), torch.zeros_like(q))  # no lengths: the kernel
    assert [c is None for c in calls] == [False] + [True] * 4  # the plain trial, then 3 plain calls


# -----------------------------------------------------------------------------
# Model: gradient checkpointing
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("conditioning", dit.CONDITIONINGS)
def test_gradient_checkpointing_gives_same_gradients(conditioning):
    torch.manual_seed(0)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = randomize(tiny_model(grad_checkpointing=checkpointing, class_dropout_prob=0.0,
                                     conditioning=conditioning))
        model(x, t, y).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0]["blocks.0.attn.qkv.weight"].abs().sum() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_runs_each_block_again_in_the_backward(monkeypatch):
    """Equal gradients do not show that a block was recomputed; counting its forward calls does
    (by wrapping forward: the recomputation does not fire the module's forward hooks)."""
    calls, forward = [], dit.DiTBlock.forward
    monkeypatch.setattr(dit.DiTBlock, "forward", lambda block, x, *c: calls.append(block.index) or forward(block, x, *c))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4])
    for checkpointing, expected in ((True, [0, 1, 1, 0]), (False, [0, 1])):
        model = randomize(tiny_model(grad_checkpointing=checkpointing))
        for i, block in enumerate(model.blocks):
            block.index = i
        calls.clear()
        model(x, t, y).square().sum().backward()
        assert calls == expected  # with checkpointing: the forward, then each block again, last first
        calls.clear()
        with torch.no_grad():  # nothing to recompute without a backward
            model(x, t, y)
        assert calls == [0, 1]


# -----------------------------------------------------------------------------
# Model: presets and cost (parameters, GMACs)
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,count", [
    ("DiT-S/2", 32_963_360), ("DiT-B/2", 130_512_416), ("DiT-XL/2", 675_129_632)])
def test_parameter_count_matches_paper(name, count):
    with torch.device("meta"):  # no memory, no initialisation cost
        model = dit.DiT_models[name](input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("conditioning,params_m,gmacs", [
    ("in-context", 449, 119.37), ("cross-attn", 598, 137.62), ("adaln", 600, 118.56), ("adaln-zero", 675, 118.64)])
def test_table4_parameters_and_gmacs(conditioning, params_m, gmacs):
    """DiT-XL/2 on 32x32x4 latents, 1000 classes, learned sigma: the paper's Table 4, which truncates
    parameters to millions and prints GMACs per image (it calls them Gflops) to two decimals."""
    with torch.device("meta"):
        model = dit.DiT_models["DiT-XL/2"](input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                                           conditioning=conditioning)
    assert sum(p.numel() for p in model.parameters()) // 10**6 == params_m
    assert round(dit.forward_gmacs(model), 2) == gmacs


def test_gmacs_count_attention_whatever_the_backend():
    """A fused backend (SDPA on a CPU, our kernel on a GPU) hides its matmuls from the counter."""
    counts = {}
    for backend in ("math", "sdpa"):
        model = dit.DiT_models["DiT-Mi/2"](input_size=16, in_channels=3, num_classes=4, attn_backend=backend,
                                           conditioning="cross-attn")
        counts[backend] = dit.forward_gmacs(model)
        assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {backend}  # restored
    assert counts["sdpa"] == counts["math"]


# -----------------------------------------------------------------------------
# Text model: the byte tokenizer and the caption encoder
# -----------------------------------------------------------------------------

def test_tokenizer_is_utf8_bytes_after_bos():
    tokens = dit.tokenize(["", "ab", "é"])
    B, P = dit.CAPTION_BOS, dit.CAPTION_PAD
    assert tokens.tolist() == [[B, P, P], [B, 97, 98], [B, 0xC3, 0xA9]] and tokens.dtype == torch.long
    assert dit.caption_lengths(tokens).tolist() == [1, 3, 3]         # never 0: BOS is always a key
    captions = ["", "un cœur rouge ♥", "東京の星", "a red star"]
    assert decode_captions(dit.tokenize(captions)) == captions
    assert dit.tokenize(["x" * 64]).shape == (1, 65)
    with pytest.raises(ValueError, match=r"caption 'xxx.*\.\.\.' is 65 bytes in UTF-8, over the limit of 64"):
        dit.tokenize(["x" * 65])
    with pytest.raises(ValueError, match="is 66 bytes in UTF-8, over the limit of 64"):
        dit.tokenize(["♥" * 22])                                     # 22 characters, 3 bytes each
    with pytest.raises(ValueError, match="is 9 bytes in UTF-8, over the limit of 8"):
        dit.tokenize(["ok", "too long!"], max_bytes=8)
    with pytest.raises(ValueError, match=r"caption 'a \\udcff star' is not valid Unicode text"):
        dit.tokenize(["a \udcff star"])                              # a byte Python could not decode
    with pytest.raises(TypeError, match="a list of captions, not one string"):
        dit.tokenize("a red star")


def test_spell_words_regroups_the_bytes_one_word_per_row():
    captions = ["a red star", "", "  an orange\theart x ", "été rouge", "   "]
    grid, words = dit.spell_words(dit.tokenize(captions))
    assert words.tolist() == [4, 1, 5, 3, 1] and grid.shape == (5, 5, len("orange"))  # BOS is word 0
    spelled = [[bytes(b for b in row.tolist() if b < 256).decode() for row in caption[:n]]
               for caption, n in zip(grid, words.tolist())]
    assert spelled == [["", "a", "red", "star"], [""], ["", "an", "orange", "heart", "x"], ["", "été", "rouge"], [""]]
    assert (grid[:, 0, 0] == dit.CAPTION_BOS).all() and (grid[:, 0, 1:] == dit.CAPTION_PAD).all()
    assert (grid[1, 1:] == dit.CAPTION_PAD).all() and (grid[0, 2, 3:] == dit.CAPTION_PAD).all()


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_caption_encoder_on_empty_long_and_non_ascii_captions(backend):
    encoder = randomize(tiny_text_model(attn_backend=backend)).caption_encoder.eval()
    captions = ["", "un cœur rouge ♥", "東京", "a red star"]
    with torch.no_grad():
        text, lengths, pooled = encoder(dit.tokenize(captions))
        assert text.shape == (4, 5, 64) and pooled.shape == (4, 64)   # BOS and the words: keys
        assert lengths.tolist() == [1, 5, 2, 4] and text.isfinite().all() and pooled.isfinite().all()
        # The empty caption (BOS alone) is a real condition: finite, and the same in any batch.
        alone = encoder(dit.tokenize([""]))
        torch.testing.assert_close(pooled[0], alone[2][0])
        torch.testing.assert_close(text[0, :1], alone[0][0])
        assert (pooled[1:] - pooled[0]).abs().amax(dim=1).min() > 1e-3  # every caption its own vector
        # Token rows wider than this model's limit (32 bytes) are refused, not silently cut.
        with pytest.raises(ValueError, match="captions of 33 bytes, over this model's limit of 32"):
            encoder(dit.tokenize(["x" * 33]))


def test_the_default_encoder_is_a_bag_of_words():
    """text_depth 0: a word's feature is the same in every caption and every place, so "orange"
    in a held-out "an orange cross" is the key the model learned from "something orange". With
    layers across words (text_depth 1) the same word differs by its neighbours."""
    def features(encoder, caption):
        text, words, pooled = encoder(dit.tokenize([caption]))
        return dict(zip(["<bos>", *caption.split()], text[0, :int(words[0])])), pooled[0]
    bag = randomize(tiny_text_model(text_depth=0)).caption_encoder.eval()
    assert len(dit.TextDiT_models["TextDiT-Mi/2"]().caption_encoder.layers) == 0  # the default
    with torch.no_grad():
        a, pooled_a = features(bag, "an orange cross")
        b, _ = features(bag, "something orange")
        c, pooled_c = features(bag, "cross orange an")
        torch.testing.assert_close(a["orange"], b["orange"])
        torch.testing.assert_close(a["<bos>"], b["<bos>"])
        torch.testing.assert_close(pooled_a, pooled_c)               # word order: none
        assert (a["orange"] - a["cross"]).abs().max() > 1e-2         # words differ from each other
        context = randomize(tiny_text_model(text_depth=1)).caption_encoder.eval()
        a, _ = features(context, "an orange cross")
        b, _ = features(context, "something orange")
        assert (a["orange"] - b["orange"]).abs().max() > 1e-3


def test_the_pooled_caption_is_the_mean_of_its_words_vectors():
    """caption_pool "mlp_then_mean" (the default): words x pooled is a sum over the words, so an
    unseen pair's vector is made of seen parts: "a purple ring" = "a purple" + "ring" - "" (each
    caption has the BOS word once). "mean_then_mlp" (older text runs) sends the mean through
    the MLP: no such sum, which is why the choice is stored with the run."""
    def summed(encoder, caption):
        _, words, pooled = encoder(dit.tokenize([caption]))
        return words[0] * pooled[0]                                               # (D,)
    for pool, additive in [("mlp_then_mean", True), ("mean_then_mlp", False)]:
        encoder = randomize(tiny_text_model(text_depth=0, caption_pool=pool)).caption_encoder.eval()
        with torch.no_grad():
            whole = summed(encoder, "a purple ring")
            parts = summed(encoder, "a purple") + summed(encoder, "ring") - summed(encoder, "")
        assert torch.allclose(whole, parts, atol=1e-5) == additive, pool
    assert dit.TextDiT_models["TextDiT-Mi/2"]().caption_encoder.pool_order == "mlp_then_mean"
    with pytest.raises(ValueError, match=r"unknown caption pool 'max'; choose from \('mlp_then_mean', "):
        tiny_text_model(caption_pool="max")


def test_each_distinct_word_is_spelled_once():
    """A batch repeats its words: the spelling layers see each distinct one once (and one row of
    padding), and every caption's features and gradients are those it has alone."""
    encoder = randomize(tiny_text_model()).caption_encoder.eval()
    rows = []
    encoder.spell.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    captions = ["a red star", "a red heart", "red", "", "a star in red"]
    with torch.no_grad():
        text, words, pooled = encoder(dit.tokenize(captions))
        assert rows == [7]  # <bos> a red star heart in, and the padding row: not 5 captions x 5 rows
        for i, caption in enumerate(captions):
            alone, count, alone_pooled = encoder(dit.tokenize([caption]))
            assert words[i] == count[0]
            torch.testing.assert_close(text[i, :int(count[0])], alone[0])
            torch.testing.assert_close(pooled[i], alone_pooled[0])
    # The copies carry gradients back to the one spelling: the same as spelling each caption alone.
    def grads(batches):
        encoder.zero_grad()
        for batch in batches:
            text, words, pooled = encoder(dit.tokenize(batch))    # (N, W, D), (N,), (N, D)
            real = torch.arange(text.shape[1]) < words[:, None]   # (N, W) not padding
            (text[real].square().sum() + pooled.sum()).backward()
        assert all(p.grad is not None for p in encoder.parameters())  # the spelling layers too
        return [p.grad.clone() for p in encoder.parameters()]
    together, apart = grads([captions]), grads([[c] for c in captions])
    for a, b in zip(together, apart):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_encoders_gradients_are_the_same_every_time():
    """The copies of a word go back to its one spelling through index_select, whose CPU backward
    adds in a fixed order. Through x[place] (index_put with accumulate, added in parallel) the
    gradients differed from call to call (up to 6e-4 here), so two --preset text runs with one seed
    parted from step 50 on and ended as different networks (README, Text to image)."""
    torch.manual_seed(0)
    encoder = dit.TextDiT_models["TextDiT-Ti/8"](input_size=32).caption_encoder
    tokens = dit.tokenize(["a red star", "red star", "a star in red", "a circle", "something blue"] * 52)
    runs = []
    for _ in range(4):
        encoder.zero_grad()
        text, words, pooled = encoder(tokens)
        (text.square().sum() + pooled.square().sum()).backward()
        runs.append(torch.cat([p.grad.flatten() for p in encoder.parameters()]))
    assert all(torch.equal(run, runs[0]) for run in runs)


# -----------------------------------------------------------------------------
# Text model: TextDiT (PixArt-alpha's cross-attention block, padding, caption dropout)
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["math", "sdpa", "triton"])
def test_padded_captions_give_the_unpadded_output(backend, monkeypatch):
    """The whole text model on each backend; on "triton" (~3 s in the CPU's interpreter) it is the
    GPU's path: the encoder's self-attention and every cross-attention with key lengths."""
    model = randomize(tiny_text_model(attn_backend=backend)).eval().to(DEVICE)
    x, t = torch.randn(2, 3, 8, 8, device=DEVICE), torch.tensor([10, 600], device=DEVICE)
    captions = dit.tokenize(["a red star", "a longer one: star is padded"]).to(DEVICE)
    with torch.no_grad():
        batch = model(x, t, captions)
        alone = model(x[:1], t[:1], dit.tokenize(["a red star"]).to(DEVICE))
        torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=1e-5)
        # The comparison can fail: with the padding attended to, the output changes.
        monkeypatch.setattr(dit, "caption_lengths", lambda tokens: torch.full(tokens.shape[:1], tokens.shape[1],
                                                                              device=tokens.device))
        unmasked = model(x, t, captions)
    assert (unmasked[:1] - alone).abs().max() > 1e-3


def test_text_block_is_the_adaln_zero_block_at_init():
    model = tiny_text_model()
    block = model.blocks[0]
    assert isinstance(block, dit.DiTBlock) and block.conditioning == "adaln-zero"
    with torch.no_grad():  # gates open, so that the blocks are not both the identity
        block.adaLN_modulation[-1].weight.normal_(std=0.2)
        block.adaLN_modulation[-1].bias.normal_(std=0.2)
    plain = dit.DiTBlock(64, 2, attn_backend=block.attn.backend)
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("cross_attn.")})
    x, c, text = torch.randn(2, 16, 64), torch.randn(2, 64), torch.randn(2, 5, 64)
    out = block(x, c, text, torch.tensor([5, 2]))
    assert torch.equal(out, plain(x, c))  # the cross-attention adds exactly zero
    out.square().sum().backward()         # ...and yet it learns: its output projection has a gradient
    assert block.cross_attn.proj.weight.grad.abs().max() > 0
    # The whole fresh model predicts 0, as the class-conditional DiT does.
    assert torch.equal(model(torch.randn(2, 3, 8, 8), torch.tensor([0, 999]), dit.tokenize(["a", "b"])),
                       torch.zeros(2, 3, 8, 8))


def test_caption_dropout_uses_the_empty_caption():
    model = randomize(tiny_text_model(caption_dropout_prob=1.0))
    x, t = torch.randn(8, 3, 8, 8), torch.randint(0, 1000, (8,))
    captions = dit.tokenize(["a red star", "two", "a blue heart", "a", "b", "c", "d", "e"])
    with torch.no_grad():
        cond = model.eval()(x, t, captions)
        null = model(x, t, dit.empty_captions(8))
        assert (cond - null).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every caption matters
        torch.testing.assert_close(model.train()(x, t, captions), null, atol=1e-5, rtol=1e-5)
        model.caption_dropout_prob = 0.5  # per sample: each row is either its caption's or the null's
        torch.manual_seed(0)
        mixed = model(x, t, captions)
        dropped = [(mixed[i] - null[i]).abs().max() < 1e-5 for i in range(8)]
        kept = [(mixed[i] - cond[i]).abs().max() < 1e-5 for i in range(8)]
        assert all(a != b for a, b in zip(dropped, kept)) and any(dropped) and any(kept)
        model.caption_dropout_prob = 0.0
        torch.testing.assert_close(model(x, t, captions), cond)


def test_text_model_rebuilds_from_its_model_args(tmp_path):
    model_args = dict(name="TextDiT-Mi/4", input_size=16, in_channels=3, learn_sigma=False, text_depth=2,
                      max_caption_bytes=16, caption_dropout_prob=0.2)
    args = dict(model_args)
    model = randomize(dit.TextDiT_models[args.pop("name")](**args))
    torch.save({"model": model.state_dict(), "model_args": model_args}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain tensors and values only
    args = dict(saved["model_args"])
    rebuilt = dit.TextDiT_models[args.pop("name")](**args)
    rebuilt.load_state_dict(saved["model"])  # strict: the same layout
    x, t, captions = torch.randn(2, 3, 16, 16), torch.tensor([3, 900]), dit.tokenize(["a red star", ""])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, captions), rebuilt.eval()(x, t, captions))
    with pytest.raises(ValueError, match="over this model's limit of 16"):  # the tokenizer's limit travels
        rebuilt(x, t, dit.tokenize(["a caption of 17 b", ""]))
    # Its cost counts the caption's path, and counts alike on the meta device, as train.py counts it.
    gmacs = dit.forward_gmacs(rebuilt)
    assert gmacs > dit.forward_gmacs(dit.DiT_models["DiT-Mi/4"](input_size=16, in_channels=3))
    with torch.device("meta"):
        assert dit.forward_gmacs(dit.TextDiT_models["TextDiT-Mi/4"](**args)) == pytest.approx(gmacs)


def test_tiny_text_model_learns_colours_from_captions():
    """Four flat images, one per caption, at high noise only (t >= 900), where x_t has all but
    lost the image: the loss can fall below that of predicting the mean colour (about 1) only by
    reading the caption, and the prediction from pure noise must be the caption's colour."""
    torch.manual_seed(0)
    colours = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "a white one": (1, 1, 1)}
    x0 = torch.tensor(list(colours.values()), dtype=torch.float)[:, :, None, None].expand(4, 3, 8, 8)
    captions = dit.tokenize(list(colours))
    model = tiny_text_model(caption_dropout_prob=0.0)
    diffusion = dit.GaussianDiffusion(schedule="cosine", prediction="x0", learn_sigma=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = diffusion.training_losses(model, x0, torch.randint(900, 1000, (4,)), captions)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.1 * sum(losses[:10]) and sum(losses[-10:]) / 10 < 0.1
    with torch.no_grad():
        pred = model.eval()(torch.randn(4, 3, 8, 8), torch.full((4,), 999), captions)  # (4, 3, 8, 8)
    torch.testing.assert_close(pred.mean(dim=(2, 3)), x0[:, :, 0, 0], atol=0.5, rtol=0)


# -----------------------------------------------------------------------------
# Diffusion: schedules, closed forms and training losses
# -----------------------------------------------------------------------------

def test_schedules():
    d = dit.GaussianDiffusion(schedule="linear")
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    abar = 1.0
    for s in range(500):
        abar *= 1 - (1e-4 + (0.02 - 1e-4) * s / 999)
    assert d.alphas_cumprod[499].item() == pytest.approx(abar, rel=1e-9)
    c = dit.GaussianDiffusion(schedule="cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert c.alphas_cumprod[299].item() == pytest.approx(f(300) / f(0), rel=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_noise_shift_divides_every_steps_snr_by_its_square(schedule):
    base = dit.GaussianDiffusion(schedule=schedule).alphas_cumprod
    shifted = dit.GaussianDiffusion(schedule=schedule, noise_shift=2.0).alphas_cumprod
    snr = lambda abar: abar / (1 - abar)  # noqa: E731
    ratio = snr(shifted) / snr(base)
    # The last cosine step is clamped at beta = 0.999 (as without the shift), so it is left out.
    torch.testing.assert_close(ratio[:-1], torch.full_like(ratio[:-1], 0.25), rtol=1e-9, atol=0)
    assert (shifted < base).all()


def test_q_sample_and_posterior_closed_forms():
    d = dit.GaussianDiffusion(schedule="linear")
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 250, 999])
    x_t = d.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        abar = torch.prod(1 - d.betas[: ti + 1]).item()
        torch.testing.assert_close(x_t[i], math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * noise[i])
    # Bayes: q(x_{t-1}|x_t,x_0) is q(x_t|x_{t-1}) q(x_{t-1}|x_0) normalised; its precision is the sum.
    ti = 250
    beta, abar_prev = d.betas[ti].item(), d.alphas_cumprod[ti - 1].item()
    precision = 1 / (1 - abar_prev) + (1 - beta) / beta
    mean = (math.sqrt(abar_prev) / (1 - abar_prev) * x0 + math.sqrt(1 - beta) / beta * x_t) / precision
    ours_mean, ours_var = d.q_posterior(x0, x_t, d.alphas_cumprod[ti].float(), d.alphas_cumprod[ti - 1].float())
    torch.testing.assert_close(ours_mean, mean, atol=1e-5, rtol=1e-4)
    assert ours_var.item() == pytest.approx(1 / precision, rel=1e-4)
    assert d.posterior_variance[ti].item() == pytest.approx(1 / precision, rel=1e-9)


def target_of(prediction, x0, eps, abar):
    """What a perfect network outputs for each prediction target."""
    return {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[prediction]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_targets_recover_x0_and_eps(prediction):
    d = dit.GaussianDiffusion(prediction=prediction, schedule="cosine")
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([10, 900])
    x_t = d.q_sample(x0, t, eps)
    abar = d._at(d.alphas_cumprod, t)
    got_x0, got_eps = d.predict_x0_eps(target_of(prediction, x0, eps, abar), x_t, abar)
    torch.testing.assert_close(got_x0, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_eps, eps, atol=2e-4, rtol=1e-4)


def test_vb_term_vanishes_for_the_true_posterior():
    """With the exact noise and the posterior variance (v = -1), L_t is zero and grows otherwise."""
    d = dit.GaussianDiffusion(learn_sigma=True)
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 3, 4, 4).clamp(-1, 1), torch.randn(4, 3, 4, 4)
    t = torch.tensor([1, 10, 400, 999])
    x_t = d.q_sample(x0, t, eps)
    vb = d.vb_term(eps, -torch.ones_like(eps), x0, x_t, t)
    assert vb.abs().max() < 1e-4
    # at small t, beta_t and the posterior variance differ most: the wrong end of the range costs
    assert (d.vb_term(eps, torch.ones_like(eps), x0, x_t, t)[:2] > 1e-3).all()
    assert (d.vb_term(eps + 0.3, -torch.ones_like(eps), x0, x_t, t) > vb + 1e-4).all()


def test_posterior_keeps_float64_digits_at_small_t():
    """The variational term against float64 closed forms (posterior coefficients written with
    beta_t directly, as in DDPM): float32 cancellation in 1 - abar_t / abar_prev was 7.5e-4 off."""
    torch.manual_seed(0)
    diffusion = dit.GaussianDiffusion(schedule="linear", prediction="eps", learn_sigma=True)
    betas = dit.make_betas("linear", 1000).double()
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    noise, pred, var_out = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.rand(3, 3, 4, 4) * 2 - 1
    t = torch.tensor([0, 1, 10])
    x_t = diffusion.q_sample(x0, t, noise)
    got = diffusion.vb_term(pred, var_out, x0, x_t, t)

    def posterior(x_start):
        b, ab, abp = (v[t].view(-1, 1, 1, 1) for v in (betas, abar, abar_prev))
        mean = b * abp.sqrt() / (1 - ab) * x_start + (1 - abp) * (1 - b).sqrt() / (1 - ab) * x_t.double()
        return mean, b * (1 - abp) / (1 - ab)

    true_mean, true_var = posterior(x0.double())
    true_log_var = torch.log(torch.where(t.view(-1, 1, 1, 1) == 0, posterior(x0.double())[1][1:2].new_tensor(
        (betas[1] * (1 - abar[0]) / (1 - abar[1])).item()), true_var))
    ab = abar[t].view(-1, 1, 1, 1)
    model_x0 = (x_t.double() - (1 - ab).sqrt() * pred.double()) / ab.sqrt()
    model_mean, _ = posterior(model_x0)
    frac = (var_out.double() + 1) / 2
    model_log_var = frac * betas[t].view(-1, 1, 1, 1).log() + (1 - frac) * true_log_var
    kl = dit.mean_flat(dit.normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2)
    nll = -dit.mean_flat(dit.discretized_gaussian_log_likelihood(x0.double(), model_mean, 0.5 * model_log_var))
    expected = torch.where(t == 0, nll / math.log(2), kl)
    # float32 images leave ~8e-5 (the means' difference over a tiny variance); the float32
    # schedule left 7e-4 at t = 1 and 5e-4 at t = 10.
    torch.testing.assert_close(got.double(), expected, rtol=2e-4, atol=0)


def test_vb_term_trains_the_variance_and_only_the_variance():
    """L_hybrid = MSE + L_vb (Improved DDPM): the vb term reaches the loss and the variance
    channels, and its gradient stops at the mean, which the MSE alone trains."""
    d = dit.GaussianDiffusion(learn_sigma=True, schedule="linear", prediction="eps")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(3, 3, 4, 4, generator=gen)
    out = (0.5 * torch.randn(3, 6, 4, 4, generator=gen)).requires_grad_()
    losses = d.training_losses(lambda x, t, y: out, x0, torch.tensor([0, 10, 500]), None, noise)
    assert (losses["vb"] > 1e-3).all()
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"], rtol=0, atol=0)
    losses["loss"].sum().backward()
    mean_grad, var_grad = out.grad.chunk(2, dim=1)
    torch.testing.assert_close(mean_grad, 2 * (out[:, :3] - noise).detach() / 48)  # d/dpred mean((pred - eps)^2)
    assert (var_grad != 0).float().mean() > 0.99


def test_vb_term_at_t0_is_the_discretised_decoder_nll():
    """L_0 (Ho et al. 2020, Sec. 3.3): -log of the Gaussian's mass on each pixel's 8-bit bin (half
    width 1/255; the end bins reach to infinity), in bits per dimension. At t = 0 the posterior
    mean is the predicted x_0; v = +1 makes the variance beta_0. Reference: torch's exact normal
    CDF (the loss uses the tanh approximation, hence rtol 1e-2; a bin of twice the width is far off)."""
    d = dit.GaussianDiffusion(learn_sigma=True, schedule="linear", prediction="x0")
    levels = torch.tensor([[0, 1, 77], [128, 254, 255]])
    x0 = (levels / 127.5 - 1).float().expand(2, 3, 2, 3)
    guess = x0 + 0.006 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    out = torch.cat([guess, torch.ones_like(guess)], dim=1)
    losses = d.training_losses(lambda x, t, y: out, x0, torch.zeros(2, dtype=torch.long), None,
                               torch.randn_like(x0))
    normal = torch.distributions.Normal(guess.double(), d.betas[0].sqrt())
    upper = torch.where(x0 > 0.999, 1.0, normal.cdf(x0.double() + 1 / 255))
    lower = torch.where(x0 < -0.999, 0.0, normal.cdf(x0.double() - 1 / 255))
    expected = -(upper - lower).log().mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(losses["vb"].double(), expected, rtol=1e-2, atol=0)


def test_min_snr_weights():
    d = dit.GaussianDiffusion(prediction="eps", loss_weighting="min_snr", learn_sigma=False)
    x0 = torch.zeros(2, 1, 2, 2)
    t = torch.tensor([0, 999])
    model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731  mse = mean(eps^2)
    noise = torch.ones_like(x0)
    losses = d.training_losses(model, x0, t, None, noise=noise)
    snr = d.alphas_cumprod[[0, 999]] / (1 - d.alphas_cumprod[[0, 999]])
    torch.testing.assert_close(losses["loss"], (snr.clamp(max=5) / snr).float())


@pytest.mark.parametrize("weighting, floor", [("min_snr", None), ("min_snr_floor", 1.0)])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_gives_every_target_the_same_x0_weighting(prediction, weighting, floor):
    """Whatever the network predicts, min-SNR weighting makes the loss min(SNR, 5) * MSE on x_0,
    and with the floor clamp(SNR, 1, 5) * MSE on x_0 (t = 999 and 500 lie below SNR 1)."""
    d = dit.GaussianDiffusion(prediction=prediction, schedule="cosine", loss_weighting=weighting,
                              learn_sigma=False)
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 100, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    abar = d._at(d.alphas_cumprod, t)
    x0_guess = x0 + 0.1 * torch.randn_like(x0)  # a wrong x_0, and the output that claims it
    eps_guess = (x_t - abar.sqrt() * x0_guess) / (1 - abar).sqrt()
    model = lambda x, t, y: target_of(prediction, x0_guess, eps_guess, abar)  # noqa: E731
    losses = d.training_losses(model, x0, t, None, noise)
    snr = (d.alphas_cumprod / (1 - d.alphas_cumprod))[t]
    assert snr[-1] < 1e-3 and snr[0] > 5                     # both ends of the clamp are exercised
    expected = snr.clamp(min=floor, max=5) * ((x0_guess - x0) ** 2).mean(dim=(1, 2, 3)).double()
    torch.testing.assert_close(losses["loss"].double(), expected, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_l1_loss_is_the_mean_absolute_error_and_leaves_the_vb_term_alone(objective):
    torch.manual_seed(0)
    x0, noise = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8)
    out = torch.randn(3, 6 if objective == "ddpm" else 3, 8, 8)
    t = torch.tensor([0, 10, 500]) if objective == "ddpm" else torch.tensor([0.2, 0.5, 0.9])
    args = dict(prediction="eps", learn_sigma=True, schedule="linear") if objective == "ddpm" else {}
    l2 = dit.make_diffusion(objective=objective, **args).training_losses(lambda *a: out, x0, t, None, noise=noise)
    l1 = dit.make_diffusion(objective=objective, loss="l1", **args).training_losses(lambda *a: out, x0, t, None,
                                                                                    noise=noise)
    target = noise if objective == "ddpm" else noise - x0
    err = target - out[:, :3]
    torch.testing.assert_close(l1["mse"], l2["mse"])  # the logged mse stays the mse
    torch.testing.assert_close(l2["loss"] - l2.get("vb", 0), err.square().mean((1, 2, 3)))
    torch.testing.assert_close(l1["loss"] - l1.get("vb", 0), err.abs().mean((1, 2, 3)))
    if objective == "ddpm":
        torch.testing.assert_close(l1["vb"], l2["vb"])
    with pytest.raises(ValueError, match="unknown loss 'l3'; choose 'l2' or 'l1'"):
        dit.make_diffusion(objective=objective, loss="l3")


@pytest.mark.parametrize("conditioning", dit.CONDITIONINGS)
def test_tiny_model_overfits_one_batch(conditioning):
    torch.manual_seed(0)
    model = dit.DiT_models["DiT-Mi/2"](input_size=8, in_channels=3, num_classes=2, learn_sigma=True,
                                       class_dropout_prob=0.0, conditioning=conditioning)
    d = dit.GaussianDiffusion(learn_sigma=True)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise, t, y = torch.randn_like(x0), torch.tensor([100, 300, 600, 900]), torch.tensor([0, 1, 0, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = d.training_losses(model, x0, t, y, noise=noise)["mse"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < first / 20, (first, loss.item())


# -----------------------------------------------------------------------------
# Diffusion: samplers (DDPM, DDIM, respacing)
# -----------------------------------------------------------------------------

def test_ddim_with_eta_one_matches_ddpm():
    """Song et al. 2021: DDIM with eta = 1 over every step is the DDPM ancestral sampler."""
    d = dit.GaussianDiffusion(num_timesteps=50, schedule="linear", learn_sigma=False)
    model_fn = lambda x, t: 0.5 * torch.sin(x + t[:, None, None, None] / 10)  # noqa: E731
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    samples = [d.sample(model_fn, noise, sampler=s, steps=50, eta=1.0, generator=torch.Generator().manual_seed(1))
               for s in ("ddpm", "ddim")]
    torch.testing.assert_close(samples[1], samples[0], atol=1e-5, rtol=1e-5)
    deterministic = d.sample(model_fn, noise, sampler="ddim", steps=50, eta=0.0,
                             generator=torch.Generator().manual_seed(1))
    assert (deterministic - samples[0]).abs().mean() > 0.3  # 1.03 measured: eta really adds noise


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_with_an_oracle_model_return_the_single_training_image(prediction, sampler):
    """For a data set of one image the ideal network is known in closed form; both samplers, with
    any of the three targets and respaced to 20 steps, must then land exactly on that image."""
    d = dit.GaussianDiffusion(prediction=prediction, schedule="cosine", learn_sigma=False)
    image = torch.rand(1, 3, 4, 4) * 2 - 1

    def oracle(x, t):
        abar = d._at(d.alphas_cumprod, t)
        eps = (x - abar.sqrt() * image) / (1 - abar).sqrt()
        return target_of(prediction, image, eps, abar)
    out = d.sample(oracle, torch.randn(3, 3, 4, 4), sampler=sampler, steps=20, eta=0.5)
    torch.testing.assert_close(out, image.expand(3, -1, -1, -1), atol=1e-5, rtol=0)


def test_respaced_sampler_visits_evenly_spaced_timesteps():
    d = dit.GaussianDiffusion(learn_sigma=False)
    seen = []
    d.sample(lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x), torch.randn(1, 3, 2, 2), steps=5)
    assert seen == [999, 749, 500, 250, 0]


def test_ddpm_samples_with_the_learned_variance():
    """Improved DDPM Eq. 15: v in [-1, 1] interpolates log sigma^2 between the posterior variance
    (v = -1) and beta (v = +1). Two respaced steps, 999 -> 0, where the two differ 10^4-fold."""
    d = dit.GaussianDiffusion(schedule="linear", learn_sigma=True)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def first_step(v):
        model_fn = lambda x, t: torch.cat([0.3 * x, torch.full_like(x, v)], dim=1)  # noqa: E731
        steps = d.denoise_steps(model_fn, noise, steps=2, sampler="ddpm", clip_denoised=False,
                                generator=torch.Generator().manual_seed(1))
        return next(steps)[1]
    z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    abar, abar_prev = d.alphas_cumprod[999], d.alphas_cumprod[0]
    beta = 1 - abar / abar_prev
    posterior = beta * (1 - abar_prev) / (1 - abar)
    mean = first_step(-1.0) - posterior.sqrt().float() * z
    for v, variance in ((1.0, beta), (0.0, (beta * posterior).sqrt())):
        torch.testing.assert_close(first_step(v), mean + variance.sqrt().float() * z, atol=1e-5, rtol=1e-5)


def test_clip_denoised_clamps_x0_and_the_step_follows_the_clamped_x0():
    d = dit.GaussianDiffusion(prediction="x0", learn_sigma=False, schedule="linear")
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    model_fn = lambda x, t: torch.full_like(x, 3.0)  # noqa: E731  an x_0 far outside [-1, 1]
    (t, x, x0), *_, (_, last, _) = list(d.denoise_steps(model_fn, noise, steps=3))
    assert torch.equal(x0, torch.ones_like(noise))
    # DDIM (eta 0) towards x_0 = 1, with the eps that x_0 = 1 implies for x_T
    abar, abar_prev = d.alphas_cumprod[t].float(), d.alphas_cumprod[d.sample_timesteps(3)[1]].float()
    eps = (noise - abar.sqrt()) / (1 - abar).sqrt()
    torch.testing.assert_close(x, abar_prev.sqrt() + (1 - abar_prev).sqrt() * eps)
    assert torch.equal(last, torch.ones_like(noise))
    unclipped = d.sample(model_fn, noise, steps=3, clip_denoised=False)
    torch.testing.assert_close(unclipped, torch.full_like(noise, 3.0))


# -----------------------------------------------------------------------------
# Flow matching (RectifiedFlow)
# -----------------------------------------------------------------------------

def test_both_processes_share_one_sampling_interface_and_flow_refuses_eta():
    """sample() is written once (DiffusionProcess) and takes the same explicit arguments for both;
    flow matching's samplers integrate an ODE, so DDIM's eta is refused in one line, not ignored."""
    noise = torch.randn(2, 3, 4, 4)
    model_fn = lambda x, t: 0.5 * x  # noqa: E731
    for process in (dit.GaussianDiffusion(learn_sigma=False), dit.RectifiedFlow()):
        assert type(process).sample is dit.DiffusionProcess.sample
        out = process.sample(model_fn, noise, steps=3, sampler=None, eta=0.0, generator=torch.Generator())
        assert out.shape == noise.shape and torch.isfinite(out).all()
        with pytest.raises(ValueError, match=r"unknown sampler 'nope'; choose"):
            process.sample(model_fn, noise, steps=3, sampler="nope")
    with pytest.raises(ValueError, match=r"^eta 0.5: flow matching's samplers integrate an ODE and add no noise; use eta 0$"):
        dit.RectifiedFlow().sample(model_fn, noise, steps=3, eta=0.5)


def test_flow_interpolates_and_regresses_the_velocity():
    torch.manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.1, 0.3, 0.6, 0.95])
    seen = {}

    def oracle(prediction):
        def model(x_t, t_model, y):
            seen.update(x_t=x_t, t=t_model)
            return (noise - x0) if prediction == "v" else x0
        return model

    for prediction in ("v", "x0"):
        flow = dit.RectifiedFlow(prediction=prediction)
        losses = flow.training_losses(oracle(prediction), x0, t, None, noise=noise)
        t4 = t.view(-1, 1, 1, 1)
        torch.testing.assert_close(seen["x_t"], (1 - t4) * x0 + t4 * noise)
        torch.testing.assert_close(seen["t"], t * 1000)       # the DDPM's time scale
        assert losses["loss"].abs().max() < 1e-8              # the exact answer costs nothing
    # Any other prediction pays the squared velocity error; x0 is turned into (x_t - x0_pred) / t.
    wrong = torch.randn(4, 3, 8, 8)
    flow = dit.RectifiedFlow(prediction="x0")
    got = flow.training_losses(lambda x_t, tm, y: wrong, x0, t, None, noise=noise)["loss"]
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    v = (x_t - wrong) / t.view(-1, 1, 1, 1)
    torch.testing.assert_close(got, ((noise - x0 - v) ** 2).mean((1, 2, 3)))


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_samplers_return_the_image_an_oracle_knows(prediction, sampler):
    """For data that is one image x*, the exact velocity is (x - x*) / t and x0-prediction is x*:
    both samplers land on x* from any noise (the straight path is followed exactly)."""
    torch.manual_seed(0)
    target, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    flow = dit.RectifiedFlow(prediction=prediction, noise_shift=2.0)
    model_fn = lambda x, tm: (x - target) / (tm / 1000).view(-1, 1, 1, 1) if prediction == "v" else target  # noqa: E731
    out = flow.sample(model_fn, noise, steps=7, sampler=sampler)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_flow_euler_and_heun_steps_are_the_textbook_ones():
    """On dx/dt = a x (a linear velocity), Euler multiplies by (1 + a dt) and Heun by
    (1 + a dt + (a dt)^2 / 2) each step; the last Heun step, to t = 0, is Euler."""
    a, x = 0.7, torch.ones(1, 1, 2, 2)
    flow = dit.RectifiedFlow(prediction="v")
    times = flow.sample_times(4)
    assert times[0] == 1 and times[-1] == 0
    for sampler in ("euler", "heun"):
        out = flow.sample(lambda x, tm: a * x, x, steps=4, sampler=sampler, clip_denoised=False)
        expected = 1.0
        for t, t_next in zip(times[:-1], times[1:]):
            h = a * (t_next - t)
            expected *= 1 + h + (h * h / 2 if sampler == "heun" and t_next > 0 else 0)
        torch.testing.assert_close(out, torch.full_like(x, expected), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown sampler 'ddim'; choose 'euler' or 'heun'"):
        flow.sample(lambda x, tm: x, x, sampler="ddim")


def test_flow_shift_divides_the_snr_and_t_is_logit_normal():
    flow = dit.RectifiedFlow(noise_shift=2.0)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    snr = lambda t: ((1 - t) / t) ** 2  # noqa: E731
    torch.testing.assert_close(snr(flow.shift(t)), snr(t) / 4)
    torch.manual_seed(0)
    drawn = dit.RectifiedFlow().draw_timesteps(20000, "cpu")
    logit = torch.log(drawn / (1 - drawn))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    assert isinstance(dit.make_diffusion(), dit.GaussianDiffusion)
    assert dit.make_diffusion(objective="flow", prediction="x0", noise_shift=2.0).prediction == "x0"
    with pytest.raises(ValueError, match="unknown objective 'edm'"):
        dit.make_diffusion(objective="edm")
    with pytest.raises(ValueError, match="flow matching predicts 'v' or 'x0', not 'eps'"):
        dit.RectifiedFlow(prediction="eps")


# -----------------------------------------------------------------------------
# Classifier-free guidance: the mix, its interval, the colour scale, captions
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("conditioning", dit.CONDITIONINGS)
def test_guidance_is_the_guided_mix(conditioning):
    torch.manual_seed(0)
    model = randomize(tiny_model(learn_sigma=True, conditioning=conditioning)).eval()
    x = torch.randn(3, 3, 8, 8)
    t, y = torch.tensor([5, 50, 500]), torch.tensor([0, 2, 4])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.num_classes))
    scale = 3.5
    out = dit.guided_model_fn(model, y, scale)(x, t)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 3:], cond[:, 3:], atol=1e-6, rtol=0)  # variance: the conditional one
    # The null label is a different condition for every sample: measured 0.011 to 0.039 mean absolute
    # change per sample. Per sample, because a max over the batch passed when one label was the null
    # one (y = 4 is num_classes - 1, where an off-by-one null index would land).
    assert ((cond - uncond).abs().mean(dim=(1, 2, 3)) > 3e-3).all()
    assert torch.equal(dit.guided_model_fn(model, y, 1.0)(x, t), cond)  # scale 1: purely conditional


def test_guidance_without_a_null_label_is_a_clear_error():
    model = tiny_model(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null label.*cfg scale of 1"):
        dit.guided_model_fn(model, torch.tensor([1]), 4.0)
    dit.guided_model_fn(model, torch.tensor([1]), 1.0)  # no guidance needs no null label


def test_guidance_interval_mixes_inside_and_skips_the_null_pass_outside():
    torch.manual_seed(0)
    model = randomize(tiny_model(learn_sigma=True)).eval()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    rows = []
    model.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
    guided = dit.guided_model_fn(model, y, 4.0, interval=(100, 600))
    for step in (99, 100, 599, 600):
        t = torch.full((2,), step)
        rows.clear()
        out = guided(x, t)
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.num_classes))
        if 100 <= step < 600:
            assert rows[0] == 4  # one pass for [y; null]
            torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4 * (cond[:, :3] - uncond[:, :3]),
                                       atol=1e-5, rtol=0)
        else:
            assert rows[0] == 2  # the conditional pass alone: the null label is never evaluated
            assert torch.equal(out, cond)
    # A batch straddling the edge mixes only its rows inside.
    t = torch.tensor([599, 600])
    out = guided(x, t)
    full = dit.guided_model_fn(model, y, 4.0)(x, t)
    torch.testing.assert_close(out[0], full[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], model(x, t, y)[1], atol=1e-6, rtol=0)
    assert (full[1] - out[1]).abs().max() > 1e-3


def test_colour_scale_guides_the_grey_image_and_leaves_colour_to_its_own_scale():
    torch.manual_seed(0)
    model = randomize(tiny_model(learn_sigma=True)).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([50, 500]), torch.tensor([1, 3])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.num_classes))
    grey = lambda z: z.mean(1, keepdim=True)  # noqa: E731  (a pixel's grey level: its RGB mean)
    for colour in (1.0, 0.0, 2.0):
        out = dit.guided_model_fn(model, y, 4.0, colour_scale=colour)(x, t)
        # The grey image is guided at 4; the colour (offset from grey) at its own scale.
        torch.testing.assert_close(grey(out[:, :3]), grey(uncond[:, :3] + 4 * (cond - uncond)[:, :3]),
                                   atol=1e-5, rtol=0)
        mix = uncond[:, :3] + colour * (cond - uncond)[:, :3]
        torch.testing.assert_close(out[:, :3] - grey(out[:, :3]), mix - grey(mix), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 3:], cond[:, 3:], atol=1e-6, rtol=0)
    # The same scale for both is plain guidance, bit for bit; the split changes the output.
    plain = dit.guided_model_fn(model, y, 4.0)(x, t)
    assert torch.equal(dit.guided_model_fn(model, y, 4.0, colour_scale=4.0)(x, t), plain)
    assert (dit.guided_model_fn(model, y, 4.0, colour_scale=1.0)(x, t) - plain).abs().max() > 1e-3
    # Colour alone guided (cfg 1) still needs the null pass, so it is not the conditional model.
    assert not torch.equal(dit.guided_model_fn(model, y, 1.0, colour_scale=3.0)(x, t), cond)
    with pytest.raises(ValueError, match="null label"):
        dit.guided_model_fn(tiny_model(class_dropout_prob=0.0), y, 1.0, colour_scale=3.0)
    with pytest.raises(ConfigError, match=r"--cfg-colour-scale: expected a number >= 0, got '-1'"):
        parse_args(SampleConfig, ["--cfg-colour-scale", "-1"])


def test_text_guidance_extrapolates_from_the_empty_caption():
    model = randomize(tiny_text_model(learn_sigma=True)).eval()
    captions = dit.tokenize(["a red star", "an orange heart"])
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([100, 700])
    with torch.no_grad():
        cond = model(x, t, captions)
        uncond = model(x, t, dit.tokenize(["", ""]))
        guided = dit.guided_model_fn(model, captions, 3.0, colour_scale=3.0)(x, t)  # plain guidance
        torch.testing.assert_close(guided[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]))
        torch.testing.assert_close(guided[:, 3:], cond[:, 3:])  # the variance stays conditional
        assert torch.equal(dit.guided_model_fn(model, captions, 1.0)(x, t), cond)
        # A text model's default guides the grey image alone: colour keeps the caption's own.
        grey = dit.guided_model_fn(model, captions, 3.0)(x, t)
        assert torch.equal(grey, dit.guided_model_fn(model, captions, 3.0, colour_scale=1.0)(x, t))
        assert (grey - guided).abs().max() > 1e-3
        # The interval: guided where lo <= t < hi, the caption's own prediction elsewhere.
        half = dit.guided_model_fn(model, captions, 3.0, interval=(0, 500), colour_scale=3.0)(x, t)
        torch.testing.assert_close(half[0], guided[0])
        torch.testing.assert_close(half[1], cond[1])
    with pytest.raises(ValueError, match="needs the empty caption of a model trained with caption dropout"):
        dit.guided_model_fn(tiny_text_model(caption_dropout_prob=0.0), captions, 3.0)


# -----------------------------------------------------------------------------
# FlashAttention kernel (flash_attn_triton.py): against a float64 reference
# -----------------------------------------------------------------------------

def _tolerance(dtype):
    """Largest allowed error, relative to the largest reference magnitude."""
    if dtype == torch.float32:
        # Compiled kernels use TF32 tensor cores when PyTorch's fp32 matmul precision allows it.
        tf32 = DEVICE == "cuda" and torch.get_float32_matmul_precision() != "highest"
        return 5e-3 if tf32 else 1e-4
    return {torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]


def _rel_err(got, ref):
    # Floor of 0.1 on the magnitude (every nonzero reference here is above 0.5): dQ and dK
    # are zero by construction when N_kv = 1 (a softmax over one key is constant), and
    # rounding noise around zero must not count as a 100% relative error.
    return ((got.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(0.1)).item()


def _reference(q, k, v, do, scale, key_lengths=None):
    """Output and gradients of softmax(q k^T * scale) v, computed in float64. With key_lengths (B,),
    sample b sees only its first key_lengths[b] keys: the padding keys' scores are set to -inf."""
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    attn = (qd @ kd.transpose(-2, -1)) * scale  # (B, H, N_q, N_kv)
    if key_lengths is not None:
        padding = torch.arange(k.shape[2], device=k.device) >= key_lengths[:, None, None, None]  # (B, 1, 1, N_kv)
        attn = attn.masked_fill(padding, float("-inf"))
    o = attn.softmax(dim=-1) @ vd  # (B, H, N_q, D)
    o.backward(do.double())
    return o.detach(), qd.grad, kd.grad, vd.grad


def _inputs(B, H, N_q, N_kv, D, dtype, layout):
    """Leaf tensors to differentiate, and q (B, H, N_q, D), k, v (B, H, N_kv, D) derived from them."""
    def leaf(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=True)

    if layout == "fused_qkv":
        # Self-attention in a transformer block: one projection produces (B, N, 3, H, D); q, k,
        # v are strided views of it, none of them contiguous.
        qkv = leaf(B, N_q, 3, H, D)
        return [qkv], qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
    if layout == "fused_kv":
        # Cross-attention: q from the image tokens (B, N_q, H, D), k and v from one projection
        # of the condition tokens (B, N_kv, 2, H, D).
        q, kv = leaf(B, N_q, H, D), leaf(B, N_kv, 2, H, D)
        return [q, kv], (q.transpose(1, 2), *kv.permute(2, 0, 3, 1, 4).unbind(0))
    q, k, v = leaf(B, H, N_q, D), leaf(B, H, N_kv, D), leaf(B, H, N_kv, D)
    return [q, k, v], (q, k, v)


def _leaf_grads(leaves, layout):
    """dq, dk, dv in (B, H, N, D) order, read back from the leaves' gradients."""
    if layout == "fused_qkv":
        return leaves[0].grad.permute(2, 0, 3, 1, 4).unbind(0)
    if layout == "fused_kv":
        return (leaves[0].grad.transpose(1, 2), *leaves[1].grad.permute(2, 0, 3, 1, 4).unbind(0))
    return tuple(t.grad for t in leaves)


# Each length, head dim and dtype appears several times; the full cross product would be too
# slow under the interpreter (blocks of 32 and 64 there). Self-attention first: N = 1 and 7
# are shorter than every block, 196 (14 x 14 patches) and 257 (one past a power of two)
# leave ragged tails on both the query and the key side; D = 72 is not a power of two.
# Then cross-attention: 16 or 257 image tokens attending to the 2 condition tokens of DiT's
# cross-attention variant (a single key block, mostly padding), a lone key, and more keys
# than queries with ragged tails on both sides.
CASES = [  # (B, H, N_q, N_kv, D, dtype, layout)
    (1, 2, 1, 1, 16, torch.float32, "contiguous"),
    (2, 2, 1, 1, 128, torch.bfloat16, "contiguous"),
    (2, 3, 7, 7, 64, torch.float32, "contiguous"),
    (1, 2, 7, 7, 72, torch.float16, "contiguous"),
    (2, 1, 7, 7, 16, torch.bfloat16, "fused_qkv"),
    (1, 2, 196, 196, 72, torch.float32, "contiguous"),
    (2, 1, 196, 196, 128, torch.float16, "contiguous"),
    (1, 2, 196, 196, 64, torch.bfloat16, "fused_qkv"),
    (1, 2, 257, 257, 128, torch.float32, "fused_qkv"),
    (2, 1, 257, 257, 16, torch.float16, "fused_qkv"),
    (1, 2, 257, 257, 72, torch.bfloat16, "contiguous"),
    (2, 2, 16, 2, 64, torch.bfloat16, "contiguous"),
    (1, 2, 257, 2, 72, torch.float16, "fused_kv"),
    (2, 1, 7, 1, 16, torch.float32, "contiguous"),
    (1, 2, 64, 200, 32, torch.bfloat16, "fused_kv"),
    (1, 1, 100, 33, 128, torch.float32, "fused_kv"),
]


@pytest.mark.parametrize("B,H,N_q,N_kv,D,dtype,layout", CASES,
                         ids=[f"B{c[0]}H{c[1]}N{c[2]}x{c[3]}D{c[4]}-{str(c[5])[6:]}-{c[6]}" for c in CASES])
def test_flash_attention_matches_float64_reference(B, H, N_q, N_kv, D, dtype, layout):
    torch.manual_seed(0)
    leaves, (q, k, v) = _inputs(B, H, N_q, N_kv, D, dtype, layout)
    # A non-contiguous upstream gradient for the fused cases, as a (B, N, H, D) -> (B, H, N, D)
    # transpose in the model would produce; exercises the dO strides.
    if layout == "contiguous":
        do = torch.randn(B, H, N_q, D, device=DEVICE, dtype=dtype)
    else:
        do = torch.randn(B, N_q, H, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    scale = D ** -0.5
    ref_o, ref_dq, ref_dk, ref_dv = _reference(q, k, v, do, scale)

    o = flash_attention(q, k, v)
    o.backward(do)
    dq, dk, dv = _leaf_grads(leaves, layout)

    assert o.dtype == dtype and o.shape == (B, H, N_q, D)
    tol = _tolerance(dtype)
    for name, got, ref in (("o", o, ref_o), ("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        assert torch.isfinite(got).all(), name
        err = _rel_err(got, ref)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def test_wrong_scale_fails_the_check():
    # The comparison above must be able to fail: a 10% wrong softmax scale is far outside
    # even the loosest tolerance.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, device=DEVICE) for _ in range(3))
    do = torch.randn(1, 2, 64, 16, device=DEVICE)
    ref_o = _reference(q, k, v, do, 16 ** -0.5)[0]
    assert _rel_err(flash_attention(q, k, v), ref_o) < _tolerance(torch.float32)
    assert _rel_err(flash_attention(q, k, v, scale=1.1 * 16 ** -0.5), ref_o) > _tolerance(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_default_scale_dtype_and_shape(dtype):
    torch.manual_seed(0)
    B, H, N, D = 2, 3, 9, 40
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE, dtype=dtype) for _ in range(3))
    o_default = flash_attention(q, k, v)
    o_explicit = flash_attention(q, k, v, scale=D ** -0.5)
    assert o_default.dtype == dtype and o_default.shape == (B, H, N, D)
    assert o_default.device == q.device
    assert torch.equal(o_default, o_explicit)
    assert not torch.allclose(o_default, flash_attention(q, k, v, scale=1.0))
    # Same meaning as PyTorch's SDPA (evaluated in fp32 so it runs on any device).
    sdpa = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert _rel_err(o_default, sdpa.double()) < _tolerance(dtype)


def test_logsumexp_is_stored_in_base_2():
    torch.manual_seed(0)
    q = torch.randn(2, 2, 7, 16, device=DEVICE)
    k, v = (torch.randn(2, 2, 3, 16, device=DEVICE) for _ in range(2))  # 3 keys for 7 queries
    scale = 0.3
    _, lse = flash_attn_triton._flash_attn_forward(q, k, v, scale)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 7)
    ref = torch.logsumexp(scale * (q.double() @ k.double().transpose(-2, -1)), dim=-1)  # (B, H, N_q)
    torch.testing.assert_close(lse.double() * torch.log(torch.tensor(2.0, dtype=torch.float64)), ref,
                               rtol=1e-5, atol=1e-5)


def test_large_logits_stay_finite():
    # Scores around +-1e3: exp() would overflow without the running-max subtraction.
    torch.manual_seed(0)
    q = (30 * torch.randn(1, 2, 50, 32, device=DEVICE)).requires_grad_(True)
    k, v = (torch.randn(1, 2, 50, 32, device=DEVICE, requires_grad=True) for _ in range(2))
    do = torch.randn(1, 2, 50, 32, device=DEVICE)
    ref = _reference(q, k, v, do, 32 ** -0.5)
    o = flash_attention(q, k, v)
    got = (o, *torch.autograd.grad(o, (q, k, v), do))
    for g, r in zip(got, ref):
        assert torch.isfinite(g).all()
        assert _rel_err(g, r) < 10 * _tolerance(torch.float32)


# The dK/dV kernel does compute the padded keys' rows (where this overflows, as numpy warns
# under the interpreter) but never stores them; keys do not mix there.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_padded_keys_stay_masked_when_every_score_is_very_negative():
    # Every query scores about -24 against every real key, so lse is far below 0. A padded key
    # (zero row past N_kv = 40) would score 0 and get P = exp(24) > fp16's maximum if the dQ
    # kernel did not mask it: inf * 0 = NaN in dS K. The softmax itself is shift-invariant,
    # so the reference is unremarkable.
    torch.manual_seed(0)
    k = (1 + 0.1 * torch.randn(1, 2, 40, 16, device=DEVICE)).half().requires_grad_(True)
    q = (-6 + 0.1 * torch.randn(1, 2, 9, 16, device=DEVICE)).half().requires_grad_(True)
    v = torch.randn(1, 2, 40, 16, device=DEVICE, dtype=torch.float16, requires_grad=True)
    do = torch.randn(1, 2, 9, 16, device=DEVICE, dtype=torch.float16)
    ref = _reference(q, k, v, do, 16 ** -0.5)
    o = flash_attention(q, k, v)
    got = (o, *torch.autograd.grad(o, (q, k, v), do))
    for name, g, r in zip(("o", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(g).all(), name
        assert _rel_err(g, r) < _tolerance(torch.float16), name


def test_autotune_keeps_only_blocks_that_fit_the_sequences():
    # GPU-only code, but plain Python: BLOCK_M must be capped by the queries and BLOCK_N by the
    # keys, in the dK/dV kernel too, where a program owns keys and loops over queries.
    for tuned in (flash_attn_triton._attn_fwd_tuned, flash_attn_triton._attn_bwd_dkdv_tuned):
        blocks_m = {c.kwargs["BLOCK_M"] for c in tuned.configs}
        blocks_n = {c.kwargs["BLOCK_N"] for c in tuned.configs}
        cross = flash_attn_triton._prune_by_length(tuned.configs, {"N_Q": 1024, "N_KV": 2})
        assert {c.kwargs["BLOCK_N"] for c in cross} == {min(blocks_n)}  # 2 keys: the smallest block
        assert {c.kwargs["BLOCK_M"] for c in cross} == blocks_m  # 1024 queries: any query block
        long = flash_attn_triton._prune_by_length(tuned.configs, {"N_Q": 4096, "N_KV": 4096})
        assert len(long) == len(tuned.configs)


def test_backward_is_deterministic():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 24, device=DEVICE, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    do = torch.randn(2, 2, 40, 24, device=DEVICE, dtype=torch.float16)
    first = torch.autograd.grad(flash_attention(q, k, v), (q, k, v), do)
    second = torch.autograd.grad(flash_attention(q, k, v), (q, k, v), do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_rejects_invalid_inputs():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    kv = torch.randn(1, 2, 3, 16, device=DEVICE)
    assert flash_attention(q, kv, kv).shape == q.shape  # fewer keys than queries is fine
    for k, v, what in ((kv, q, "k and v must have the same shape"),
                       (kv[:1, :1], kv[:1, :1], "match q in batch, heads and head dim"),  # heads
                       (kv.expand(2, -1, -1, -1), kv.expand(2, -1, -1, -1), "match q"),  # batch
                       (kv[..., :8], kv[..., :8], "match q"),  # head dim
                       (kv[:, :, :0], kv[:, :, :0], "at least one key"),
                       (q[0], q[0], "4-D")):
        with pytest.raises(ValueError, match=what):
            flash_attention(q, k, v)
    with pytest.raises(ValueError, match="4-D"):
        flash_attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="must share a dtype"):
        flash_attention(q, q.half(), q)  # mixed dtypes
    with pytest.raises(TypeError, match="supports float16, bfloat16 and float32, not torch.float64"):
        flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="head dim 256 > 128 is not supported"):
        big = torch.randn(1, 1, 4, 256, device=DEVICE)
        flash_attention(big, big, big)  # head dim above the supported maximum


# -----------------------------------------------------------------------------
# FlashAttention kernel: per-sample key lengths (captions of different lengths in one batch)
# -----------------------------------------------------------------------------

# Under the interpreter the forward and dQ kernels step through keys 32 at a time, and a dK/dV
# program owns 64 keys. N_kv = 40 and 70 leave ragged tails for both; lengths of 1 and N_kv are
# the extremes; 33 stops one key into the second forward block, and with 33 or 64 of 70 keys the
# dK/dV block [64, 70) is all padding (skipped). Self-attention over a padded caption (fused qkv,
# N_q = N_kv), then image tokens attending to short captions (fused kv, D = 72 and 64).
KEY_LENGTH_CASES = [  # (B, H, N_q, N_kv, D, dtype, layout, key lengths)
    (3, 2, 9, 40, 16, torch.float32, "contiguous", (1, 40, 17)),
    (2, 2, 70, 70, 32, torch.float16, "fused_qkv", (33, 64)),
    (3, 1, 100, 7, 72, torch.float16, "fused_kv", (7, 1, 4)),
    (2, 2, 16, 77, 64, torch.float32, "fused_kv", (77, 20)),
]


@pytest.mark.parametrize("B,H,N_q,N_kv,D,dtype,layout,lengths", KEY_LENGTH_CASES,
                         ids=[f"B{c[0]}N{c[2]}x{c[3]}D{c[4]}-{str(c[5])[6:]}-{c[6]}" for c in KEY_LENGTH_CASES])
def test_flash_attention_with_key_lengths_matches_float64_reference(B, H, N_q, N_kv, D, dtype, layout, lengths):
    torch.manual_seed(0)
    leaves, (q, k, v) = _inputs(B, H, N_q, N_kv, D, dtype, layout)
    do = torch.randn(B, N_q, H, D, device=DEVICE, dtype=dtype).transpose(1, 2)  # (B, H, N_q, D), strided
    key_lengths = torch.tensor(lengths, device=DEVICE)
    ref = _reference(q, k, v, do, D ** -0.5, key_lengths)

    o = flash_attention(q, k, v, key_lengths=key_lengths)
    o.backward(do)
    got = (o, *_leaf_grads(leaves, layout))

    tol = _tolerance(dtype)
    for name, g, r in zip(("o", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(g).all(), name
        err = _rel_err(g, r)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
    for b, n in enumerate(lengths):  # padding keys: no gradient at all, not merely a small one
        assert not got[2][b, :, n:].any() and not got[3][b, :, n:].any(), f"sample {b}"


# The interpreter's numpy warns where exp2 overflows for the (zero-filled) padding keys in the
# dK/dV kernel; those entries of P are replaced by 0 right after.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("scores", ["ordinary", "very negative"])
def test_keys_past_the_lengths_are_never_read(scores):
    """Filling the padding keys and values with NaN and inf changes no bit of the output or of
    any gradient. With every real score very negative (about -24, as in the test of the ragged
    tail above), a padding key left in the backward would get P = exp(24): inf in fp16."""
    torch.manual_seed(0)
    B, H, N_q, N_kv, D = 2, 2, 20, 50, 16
    key_lengths = torch.tensor([13, 37], device=DEVICE)
    q = torch.randn(B, H, N_q, D, device=DEVICE)
    k = torch.randn(B, H, N_kv, D, device=DEVICE)
    if scores == "very negative":
        q, k = -6 + 0.1 * q, 1 + 0.1 * k
    q, k = q.half(), k.half()
    v = torch.randn(B, H, N_kv, D, device=DEVICE, dtype=torch.float16)
    do = torch.randn(B, H, N_q, D, device=DEVICE, dtype=torch.float16)
    padding = torch.arange(N_kv, device=DEVICE) >= key_lengths[:, None]  # (B, N_kv)

    results = []
    for fill in (None, float("nan")):
        kp, vp = k.clone(), v.clone()
        if fill is not None:
            kp.masked_fill_(padding[:, None, :, None], fill)
            vp.masked_fill_(padding[:, None, :, None], float("inf"))
        kp.requires_grad_(True)
        vp.requires_grad_(True)
        qp = q.clone().requires_grad_(True)
        o = flash_attention(qp, kp, vp, key_lengths=key_lengths)
        results.append((o, *torch.autograd.grad(o, (qp, kp, vp), do)))

    ref = _reference(q, k, v, do, D ** -0.5, key_lengths)
    for name, clean, poisoned, r in zip(("o", "dq", "dk", "dv"), *results, ref):
        assert torch.isfinite(poisoned).all(), name
        assert torch.equal(clean, poisoned), name
        assert _rel_err(clean, r) < _tolerance(torch.float16), name
    for grad in results[1][2:]:  # dk, dv
        assert not grad[padding[:, None, :, None].expand_as(grad)].any()


def _bad_key_lengths():
    """(lengths, error) pairs for 2 samples attending to 6 keys."""
    return [
        (torch.tensor([3]), r"shape \(B,\) = \(2,\), one length per sample; got \(1,\)"),
        (torch.tensor([[3, 3]]), r"shape \(B,\) = \(2,\)"),
        (torch.tensor([3.0, 2.0]), "must be an integer tensor, not torch.float32"),
        (torch.tensor([True, True]), "must be an integer tensor, not torch.bool"),
        ([3, 2], "must be an integer tensor, not list"),
        (torch.tensor([0, 6]), r"in \[1, \w+\] = \[1, 6\]; got values in \[0, 6\] \(a length of 0 masks "
                               r"every key: that softmax row is 0 / 0 = NaN\)"),
        (torch.tensor([3, 7]), r"in \[1, \w+\] = \[1, 6\]; got values in \[3, 7\]"),
    ]


def test_key_lengths_are_checked_by_the_kernel_and_every_backend():
    q = torch.randn(2, 2, 5, 16, device=DEVICE)
    kv = torch.randn(2, 2, 6, 16, device=DEVICE)
    for lengths, message in _bad_key_lengths():
        lengths = lengths.to(DEVICE) if isinstance(lengths, torch.Tensor) else lengths
        with pytest.raises(ValueError, match=message):
            flash_attention(q, kv, kv, key_lengths=lengths)
        for backend in dit.ATTENTION_BACKENDS:
            with pytest.raises(ValueError, match=message):
                dit.attention(q, kv, kv, backend, key_lengths=lengths)
    # Any integer dtype is accepted, and the extremes 1 and N_kv are valid lengths.
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        lengths = torch.tensor([1, 6], device=DEVICE, dtype=dtype)
        torch.testing.assert_close(flash_attention(q, kv, kv, key_lengths=lengths),
                                   dit.attention(q, kv, kv, "math", key_lengths=lengths), atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# FlashAttention kernel: compiled for the H100 (sm_90) without a GPU
# -----------------------------------------------------------------------------

def _compile_kernels_for_sm90():
    """Compile kernels for sm_90 (H100) without a GPU; (name, dtype, D, VEC, shared bytes, scalar loads) each.

    Runs in a fresh process without TRITON_INTERPRET (see the test below), so everything
    it needs is imported here.
    """
    sys.path.insert(0, "assets")
    import flash_attn_triton as fa
    from gpu_check import compile_for_sm90, resources

    assert not fa._INTERPRET
    # One configuration from each autotune list at the largest head dim (BLOCK_D = 128):
    # big bf16 tiles as training uses them, and the fp32 forward (TF32 tensor cores) in
    # small tiles. The preprocess kernel has no tl.dot and is not autotuned. The three
    # attention kernels again with per-sample key lengths (text conditioning), and at
    # DiT-XL/2's head dim of 72, which Triton's JIT alone cannot prove aligned. Last, a
    # launch whose tensors the host could not prove aligned (VEC = 1) at D = 64.
    cases = [  # (kernel, dtype, D, block sizes, warps, stages, key lengths, VEC: None for the launcher's)
        (fa._attn_fwd_kernel, "bf16", 128, {"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3, False, None),
        (fa._attn_bwd_dkdv_kernel, "bf16", 128, {"BLOCK_M": 64, "BLOCK_N": 128}, 8, 3, False, None),
        (fa._attn_bwd_dq_kernel, "bf16", 128, {"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3, False, None),
        (fa._attn_bwd_preprocess_kernel, "bf16", 128, {"BLOCK_M": 64}, 4, 1, False, None),
        (fa._attn_fwd_kernel, "fp32", 128, {"BLOCK_M": 64, "BLOCK_N": 32}, 4, 3, False, None),
        (fa._attn_fwd_kernel, "bf16", 128, {"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3, True, None),
        (fa._attn_bwd_dkdv_kernel, "bf16", 128, {"BLOCK_M": 64, "BLOCK_N": 128}, 8, 3, True, None),
        (fa._attn_bwd_dq_kernel, "bf16", 128, {"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3, True, None),
        (fa._attn_fwd_kernel, "bf16", 72, {"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3, False, None),
        (fa._attn_bwd_dkdv_kernel, "bf16", 72, {"BLOCK_M": 64, "BLOCK_N": 128}, 8, 3, False, None),
        (fa._attn_bwd_dq_kernel, "bf16", 72, {"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3, False, None),
        (fa._attn_fwd_kernel, "bf16", 64, {"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3, False, 1),
    ]
    results = []
    for kernel, dtype, D, blocks, warps, stages, lengths, vec in cases:
        r = resources(compile_for_sm90(kernel, dtype, D, blocks, warps, stages, lengths, vec))
        results.append((kernel.__name__ + (" with key lengths" if lengths else ""), dtype, D, vec,
                        r["shared"], r["scalar_loads"]))
    return results


def test_kernels_compile_for_hopper():
    # The interpreter runs the kernels as Python, so it never meets what only the compiler
    # checks: types, tl.dot shapes, the constexpr branch in _mma, shared memory, whether a
    # tile is loaded in 16-byte vectors or one element at a time. Triton can compile for a
    # GPU it does not have. That needs a process where neither Triton nor the kernels were
    # set up for the interpreter, so the function above runs in a fresh one.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = inspect.getsource(_compile_kernels_for_sm90) + "\nprint(json.dumps(_compile_kernels_for_sm90()))"
    proc = subprocess.run([sys.executable, "-c", "import json, sys\n" + code], env=env, cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 12
    for name, dtype, d, vec, shared, scalar_loads in results:
        # 227 KiB is the most shared memory one thread block may use on an H100.
        assert 0 < shared <= 227 * 1024, (name, dtype, d, shared)
        # bf16 tiles move in 16-byte vectors: at D = 72 only through _vector_width's hint, and a
        # hint of VEC = 1 must not take from D = 64 the vectors the compiler finds by itself.
        assert not (dtype == "bf16" and scalar_loads), (name, dtype, d, vec, "loads one bf16 element at a time")


def test_vector_width_divides_every_row_start_and_the_head_dim():
    # The kernels tell the compiler that every tile row starts on a multiple of VEC elements:
    # a VEC too large would make misaligned vector loads on a GPU (wrong values or a fault).
    vw = flash_attn_triton._vector_width
    bf16 = dict(dtype=torch.bfloat16)
    assert vw(torch.empty(2, 16, 256, 72, **bf16)) == 8  # DiT-XL/2: 16 bytes
    assert vw(torch.empty(2, 16, 256, 72)) == 4  # fp32: 16 bytes are 4 elements
    assert vw(torch.empty(2, 4, 10, 100, **bf16)) == 4  # 100 = 4 * 25
    assert vw(torch.empty(2, 4, 10, 36, **bf16), torch.empty(2, 4, 10, 64, **bf16)) == 4  # the weakest tensor
    qkv = torch.empty(2, 256, 3, 16, 72, **bf16).permute(2, 0, 3, 1, 4)  # dit.py's fused projection
    assert vw(qkv[0], qkv[1], qkv[2]) == 8
    x = torch.empty(2, 4, 10, 80, **bf16)
    assert vw(x[..., 1:73]) == 1  # the pointer is one element past an aligned address
    assert vw(x[..., 2:74]) == 2
    assert vw(x.transpose(-1, -2)) == 1  # a strided head dim: no vectors
    assert vw(torch.empty(2, 4, 10, 1, **bf16).expand(2, 4, 10, 72)) == 1  # expanded gradient, stride 0
    assert vw(torch.empty(2, 4, 9, 72, **bf16)[:, :, ::3]) == 8  # row stride 216 = 8 * 27
    assert vw(torch.empty(3, 4, 10, 72, **bf16)[:, 1:]) == 8


# -----------------------------------------------------------------------------
# Data (dataset.py): class folders and bad input
# -----------------------------------------------------------------------------

def stripes(path, size, colours, vertical=True):
    """Equal bands of colour, left to right (or top to bottom if not vertical)."""
    w, h = size
    image = Image.new("RGB", size)
    n = len(colours)
    for k, colour in enumerate(colours):
        box = (k * w // n, 0, (k + 1) * w // n, h) if vertical else (0, k * h // n, w, (k + 1) * h // n)
        image.paste(colour, box)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_webp_and_bmp_files_load(tmp_path):
    # Written by PIL and read back through ImageFolder (lossless WebP, so the colour is exact);
    # the suffix's case does not matter.
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8), RED).save(tmp_path / "a" / "pic.webp", lossless=True)
    solid(tmp_path / "b" / "pic.BMP", (6, 10), GREEN)
    data = ImageFolder(tmp_path, image_size=4)
    assert data.classes == ["a", "b"] and len(data) == 2
    assert rgb(data[0][0]) == pytest.approx(list(RED), abs=1)
    assert rgb(data[1][0]) == pytest.approx(list(GREEN), abs=1)


def test_loads_classes_labels_shapes_and_range(tmp_path):
    # Folders made out of sorted order; mixed sizes, formats and extension case.
    solid(tmp_path / "zebra" / "b.png", (20, 12), BLUE)
    solid(tmp_path / "zebra" / "a.JPG", (9, 30), (128, 128, 128))
    solid(tmp_path / "apple" / "x.png", (8, 8), RED)
    solid(tmp_path / "mango" / "m.jpeg", (40, 40), GREEN)
    solid(tmp_path / "mango" / "n.bmp", (5, 7), (255, 255, 255))
    # Ignored: hidden files and folders, non-image files, nested folders.
    solid(tmp_path / "apple" / ".hidden.png", (8, 8), BLUE)
    solid(tmp_path / ".cache" / "c.png", (8, 8), BLUE)
    solid(tmp_path / "apple" / "nested" / "n.png", (8, 8), BLUE)
    (tmp_path / "apple" / "notes.txt").write_text("not an image")

    data = ImageFolder(tmp_path, image_size=6)
    assert data.classes == ["apple", "mango", "zebra"]
    assert len(data) == 5
    # Files are sorted within a class ("a.JPG" < "b.png").
    assert [data[i][1] for i in range(5)] == [0, 1, 1, 2, 2]
    for i in range(5):
        x, y = data[i]
        assert isinstance(y, int)
        assert x.shape == (3, 6, 6) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    # Exact scaling: red -> (1, -1, -1), white -> all ones.
    assert torch.allclose(data[0][0], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 6, 6))
    assert torch.equal(data[2][0], torch.ones(3, 6, 6))
    assert rgb(data[4][0]) == pytest.approx([0, 0, 255], abs=1)


def test_non_square_images_are_centre_cropped(tmp_path):
    # Squashing instead of cropping would keep all three bands; a crop keeps green.
    stripes(tmp_path / "a" / "wide.png", (48, 16), [RED, GREEN, BLUE])
    stripes(tmp_path / "a" / "tall.png", (16, 48), [RED, GREEN, BLUE], vertical=False)
    data = ImageFolder(tmp_path, image_size=8)
    for i in range(2):
        x = data[i][0]
        assert x.shape == (3, 8, 8)
        # The filter may blend a little of the cut-off bands into the border.
        assert rgb(x) == pytest.approx([0, 255, 0], abs=8)
        assert rgb(x[:, 2:6, 2:6]) == pytest.approx([0, 255, 0], abs=1)


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder(tmp_path / "nope", image_size=8)


def test_path_is_a_file(tmp_path):
    solid(tmp_path / "x.png", (8, 8), RED)
    with pytest.raises(DatasetError, match="not a folder"):
        ImageFolder(tmp_path / "x.png", image_size=8)


def test_no_class_folders(tmp_path):
    solid(tmp_path / "loose.png", (8, 8), RED)  # images but no sub-folders
    with pytest.raises(DatasetError, match="no class sub-folders"):
        ImageFolder(tmp_path, image_size=8)


def test_empty_class_is_named(tmp_path):
    solid(tmp_path / "full" / "a.png", (8, 8), RED)
    (tmp_path / "hollow").mkdir()
    (tmp_path / "hollow" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="hollow.*no readable images"):
        ImageFolder(tmp_path, image_size=8)


def test_check_batch_size(tmp_path):
    for i in range(3):
        solid(tmp_path / "a" / f"{i}.png", (8, 8), RED)
    data = ImageFolder(tmp_path, image_size=8)
    check_batch_size(data, 3)  # exactly one batch is fine
    with pytest.raises(DatasetError, match="only 3 images but the batch size is 4"):
        check_batch_size(data, 4)


def test_corrupt_file_is_skipped_with_one_warning(tmp_path):
    solid(tmp_path / "a" / "good.png", (8, 8), RED)
    (tmp_path / "a" / "bad.png").write_bytes(b"definitely not a png" * 10)
    solid(tmp_path / "b" / "fine.png", (8, 8), BLUE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ImageFolder(tmp_path, image_size=8)
    assert len(caught) == 1 and "bad.png" in str(caught[0].message)
    assert len(data) == 2 and [data[i][1] for i in range(2)] == [0, 1]
    assert rgb(data[1][0]) == pytest.approx([0, 0, 255], abs=1)  # no slot left behind


def test_class_with_only_corrupt_files_is_empty(tmp_path):
    solid(tmp_path / "a" / "good.png", (8, 8), RED)
    (tmp_path / "broken" / "bad.jpg").parent.mkdir()
    (tmp_path / "broken" / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.warns(UserWarning, match="bad.jpg"):
        with pytest.raises(DatasetError, match="broken"):
            ImageFolder(tmp_path, image_size=8)


def test_16_bit_grey_png_keeps_its_grey_levels(tmp_path):
    # PIL's convert("RGB") clips 16-bit values above 255 to white: mid-grey came out solid white.
    import numpy as np
    levels = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16).repeat(4, 0).repeat(4, 1)  # (8, 8)
    (tmp_path / "a").mkdir()
    Image.fromarray(levels).save(tmp_path / "a" / "deep.png")
    assert Image.open(tmp_path / "a" / "deep.png").mode == "I;16"
    x = ImageFolder(tmp_path, image_size=8)[0][0]
    pixels = ((x[0] + 1) * 127.5).round()                      # back to 0..255, one channel
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey stays grey
    assert pixels[:4, :4].unique().tolist() == [0.0]
    assert pixels[:4, 4:].unique().tolist() == [64.0]          # 16384 / 257, rounded
    assert pixels[4:, :4].unique().tolist() == [128.0]
    assert pixels[4:, 4:].unique().tolist() == [255.0]


def test_lazy_decoding_matches_cache(tmp_path, monkeypatch):
    solid(tmp_path / "a" / "1.png", (10, 6), RED)
    stripes(tmp_path / "b" / "2.png", (30, 10), [RED, GREEN, BLUE])
    cached = ImageFolder(tmp_path, image_size=8)
    monkeypatch.setattr(dataset, "CACHE_LIMIT_BYTES", 0)
    lazy = ImageFolder(tmp_path, image_size=8)
    assert cached.cache is not None and lazy.cache is None
    for i in range(2):
        assert torch.equal(cached[i][0], lazy[i][0]) and cached[i][1] == lazy[i][1]


# -----------------------------------------------------------------------------
# Data (dataset.py): the built-in shapes set
# -----------------------------------------------------------------------------

def files_of(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_make_shapes_dataset_is_deterministic(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", images_per_class=4, image_size=16, seed=7)
    b = make_shapes_dataset(tmp_path / "b", images_per_class=4, image_size=16, seed=7)
    c = make_shapes_dataset(tmp_path / "c", images_per_class=4, image_size=16, seed=8)
    assert files_of(a) == files_of(b)
    assert files_of(a).keys() == files_of(c).keys() and files_of(a) != files_of(c)
    data = ImageFolder(a, image_size=16)
    assert data.classes == sorted(dataset.SHAPES) and len(data.classes) == 8
    assert [data.labels.count(k) for k in range(8)] == [4] * 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp left


def test_shapes_images_vary(tmp_path):
    root = make_shapes_dataset(tmp_path / "s", images_per_class=4, image_size=16)
    data = ImageFolder(root, image_size=16)
    images = torch.stack([data[i][0] for i in range(len(data))])
    assert len({tuple(x.flatten().tolist()) for x in images}) == len(data)
    # Every image has a clearly visible shape: two distinct colours, not flat.
    assert all(x.std() > 0.05 for x in images)


def test_make_shapes_refuses_to_overwrite_other_data(tmp_path):
    solid(tmp_path / "mine" / "holiday" / "1.png", (8, 8), RED)
    with pytest.raises(DatasetError, match="refusing"):
        make_shapes_dataset(tmp_path / "mine", images_per_class=1, image_size=8)
    assert (tmp_path / "mine" / "holiday" / "1.png").exists()


def test_ensure_builtin_dataset_regenerates_only_when_incomplete(tmp_path, monkeypatch):
    calls = []
    real = dataset.make_shapes_dataset
    monkeypatch.setattr(dataset, "make_shapes_dataset", lambda *a: calls.append(a) or real(*a))
    root = tmp_path / "shapes"
    small = dict(images_per_class=2, image_size=8)

    # A run killed midway leaves only the hidden temp folder: not mistaken for data.
    (tmp_path / ".shapes.partial" / "circle").mkdir(parents=True)
    assert ensure_builtin_dataset(root, **small) == root
    assert len(calls) == 1 and not (tmp_path / ".shapes.partial").exists()
    assert len(ImageFolder(root, image_size=8)) == 16

    stamp = (root / "circle" / "0000.png").stat().st_mtime_ns
    ensure_builtin_dataset(root, **small)  # complete: left alone
    assert len(calls) == 1
    assert (root / "circle" / "0000.png").stat().st_mtime_ns == stamp

    (root / dataset.MARKER).unlink()  # incomplete (no marker): regenerated
    (root / "star" / "0001.png").unlink()
    ensure_builtin_dataset(root, **small)
    assert len(calls) == 2 and (root / dataset.MARKER).exists()
    assert (root / "star" / "0001.png").exists()

    ensure_builtin_dataset(root, images_per_class=3, image_size=8)  # other settings
    assert len(calls) == 3 and len(ImageFolder(root, image_size=8)) == 24


class Killed(Exception):
    """Stands in for the process being killed midway."""

    def __init__(self):
        super().__init__("killed while drawing")


def test_interrupted_generation_never_looks_complete(tmp_path, monkeypatch):
    real, budget = dataset.draw_shape, {"images": 5}

    def dies_midway(*args):
        if budget["images"] == 0:
            raise Killed
        budget["images"] -= 1
        return real(*args)

    root, small = tmp_path / "shapes", dict(images_per_class=2, image_size=8)
    monkeypatch.setattr(dataset, "draw_shape", dies_midway)
    with pytest.raises(Killed, match="killed while drawing"):
        ensure_builtin_dataset(root, **small)
    assert not root.exists()  # nothing half-written under the real name

    budget["images"] = 8
    ensure_builtin_dataset(root, images_per_class=1, image_size=8)  # a complete set...
    budget["images"] = 5
    with pytest.raises(Killed, match="killed while drawing"):  # ...survives a killed regeneration
        ensure_builtin_dataset(root, **small)
    assert (root / dataset.MARKER).exists() and len(ImageFolder(root, image_size=8)) == 8

    budget["images"] = 16  # and the next full run completes and replaces it
    ensure_builtin_dataset(root, **small)
    assert len(ImageFolder(root, image_size=8)) == 16


def test_main_prints_classes_and_counts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dataset, "ensure_builtin_dataset",
                        lambda out: make_shapes_dataset(out, images_per_class=3))
    monkeypatch.setattr(sys, "argv", ["dataset.py", "--out", str(tmp_path / "s")])
    dataset.main()
    out = capsys.readouterr().out
    assert "24 images" in out
    for name in dataset.SHAPES:
        assert f"{name:<10} 3 images" in out


# -----------------------------------------------------------------------------
# Data (dataset.py): captions (metadata.jsonl, the held-out pairs)
# -----------------------------------------------------------------------------

def palette_colour(x):
    """The colour name of a built-in shape image (3, S, S) in [-1, 1], from its pixels alone: its
    brightest pixel lies wholly inside the shape, so it is exactly a palette colour."""
    pixels = ((x.flatten(1) + 1) * 127.5).round().T                     # (S*S, 3)
    brightest = pixels[pixels.sum(dim=1).argmax()]                       # (3,)
    distances = (torch.tensor(dataset.PALETTE, dtype=torch.float) - brightest).abs().amax(dim=1)
    assert distances.min() <= 1, f"{brightest.tolist()} is no palette colour"
    return dataset.COLOUR_NAMES[distances.argmin()]


@pytest.fixture(scope="module")
def captioned_shapes(tmp_path_factory):
    """A built-in set large enough for every (colour, shape) pair, at 16 px (the smallest size at
    which every shape has a pixel wholly inside it)."""
    return make_shapes_dataset(tmp_path_factory.mktemp("text") / "shapes", images_per_class=30, image_size=16)


def test_text_holdout_pairs_cover_every_shape_and_colour():
    colours, shapes = zip(*dataset.TEXT_HOLDOUT)
    assert len(dataset.TEXT_HOLDOUT) >= 8 and len(set(dataset.TEXT_HOLDOUT)) == len(dataset.TEXT_HOLDOUT)
    assert sorted(shapes) == sorted(dataset.SHAPES)                      # one per shape
    assert set(colours) == set(dataset.COLOUR_NAMES)                     # every colour at least once
    assert len(dataset.COLOUR_NAMES) == len(dataset.PALETTE)


def test_shapes_metadata_names_each_image_truly(captioned_shapes):
    root = captioned_shapes
    lines = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 8 * 30
    full = ImageFolder(root, image_size=16)
    assert [root / line["file_name"] for line in lines] == full.paths    # every image, once
    wordings, plain, shapeless = set(), 0, 0
    for line, x, label in zip(lines, (full[i][0] for i in range(len(full))), full.labels):
        shape, colour, text = full.classes[label], palette_colour(x), line["text"]
        assert (line["shape"], line["colour"]) == (shape, colour)        # checked against the pixels
        assert "a orange" not in text                                    # "an orange star"
        colours = [name for name in dataset.COLOUR_NAMES if name in text.split()]
        shapes = [name for name in dataset.SHAPES if name in text.split()]
        assert colours in ([colour], []) and shapes in ([shape], []) and (colours or shapes)
        plain += not colours
        shapeless += not shapes
        wordings.add(text.replace(colour, "C").replace(shape, "S"))
    # The four coloured wordings, the colourless and the shapeless ones all occur, each kind as
    # often as dataset.py says (two fifths without the colour, a fifth without the shape).
    assert {"C S", "a S in C", "a S", "S", "C", "something C"} <= wordings
    assert {"a C S", "an C S"} & wordings and {"a C S on black", "an C S on black"} & wordings
    assert {"a C shape", "an C shape"} & wordings
    assert abs(plain / len(lines) - dataset.NO_COLOUR_FRACTION) < 0.1
    assert abs(shapeless / len(lines) - dataset.NO_SHAPE_FRACTION) < 0.1
    # Deterministic: the same seed writes the same captions, another seed others.
    again = make_shapes_dataset(root.parent / "again", images_per_class=30, image_size=16)
    other = make_shapes_dataset(root.parent / "other", images_per_class=30, image_size=16, seed=1)
    assert (again / "metadata.jsonl").read_bytes() == (root / "metadata.jsonl").read_bytes()
    assert (other / "metadata.jsonl").read_bytes() != (root / "metadata.jsonl").read_bytes()
    assert dataset.shape_prompt("star", "orange") == "an orange star" and dataset.shape_prompt("star") == "a star"


def test_held_out_pairs_never_reach_a_training_batch(captioned_shapes):
    # Which image is which, from an independent loader: the folder gives the shape, the pixels the colour.
    full = ImageFolder(captioned_shapes, image_size=16)
    truth = {full[i][0].numpy().tobytes(): (palette_colour(full[i][0]), full.classes[full.labels[i]])
             for i in range(len(full))}
    assert len(truth) == len(full) and set(dataset.TEXT_HOLDOUT) <= set(truth.values())  # all present
    train_set = dataset.CaptionFolder(captioned_shapes, image_size=16)  # split="train" by default
    seen = []
    for _ in range(2):  # two shuffled epochs, in the trainer's batches: (N, 3, S, S), (N, L)
        for x, tokens in torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=True):
            for image, caption in zip(x, decode_captions(tokens)):
                colour, shape = truth[image.numpy().tobytes()]
                assert (colour, shape) not in dataset.TEXT_HOLDOUT, caption
                colours = [name for name in dataset.COLOUR_NAMES if name in caption.split()]
                shapes = [name for name in dataset.SHAPES if name in caption.split()]
                assert colours in ([colour], []) and shapes in ([shape], [])  # captions stay with their images
                assert colours or shapes
                seen.append((colour, shape))
    assert len(seen) == 2 * len(train_set)
    held_out = dataset.CaptionFolder(captioned_shapes, image_size=16, split="holdout")
    assert {truth[held_out[i][0].numpy().tobytes()] for i in range(len(held_out))} == set(dataset.TEXT_HOLDOUT)
    assert len(train_set) + len(held_out) == len(full) == len(dataset.CaptionFolder(captioned_shapes, 16, split="all"))
    with pytest.raises(ValueError, match=r"unknown split 'test'; choose from \('train', 'holdout', 'all'\)"):
        dataset.CaptionFolder(captioned_shapes, 16, split="test")


def test_old_shapes_set_without_captions_is_regenerated(tmp_path):
    root = make_shapes_dataset(tmp_path / "shapes", images_per_class=1, image_size=8)
    (root / "metadata.jsonl").unlink()  # what a v3 set looks like
    (root / dataset.MARKER).write_text((root / dataset.MARKER).read_text().replace("v6", "v3"))
    ensure_builtin_dataset(root, images_per_class=1, image_size=8)
    assert len(dataset.CaptionFolder(root, 8, split="all")) == 8


def write_captioned(root, lines):
    """A captioned folder of one red image at the root and one blue in a class folder."""
    solid(root / "red.png", (8, 8), RED)
    solid(root / "blue" / "b.png", (10, 8), BLUE)
    (root / "metadata.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_caption_folder_loads_any_folder_with_metadata(tmp_path):
    write_captioned(tmp_path, ['{"file_name": "red.png", "text": "un cœur ♥"}', "",
                               '{"file_name": "blue/b.png", "text": "blue", "extra": 1}'])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with open(tmp_path / "metadata.jsonl", "a", encoding="utf-8") as f:
        f.write('{"file_name": "broken.png", "text": "lost"}\r\n')
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.png"):
        data = dataset.CaptionFolder(tmp_path, image_size=4)
    assert len(data) == 2 and data.captions == ["un cœur ♥", "blue"] and data.pairs == [None, None]
    (x0, t0), (x1, t1) = data[0], data[1]
    assert x0.shape == (3, 4, 4) and rgb(x0) == pytest.approx([255, 0, 0], abs=1)
    assert rgb(x1) == pytest.approx([0, 0, 255], abs=1)
    # Non-ASCII is bytes: 9 characters, 12 bytes; rows padded to the longest caption plus BOS.
    assert t0.shape == t1.shape == (13,) and dit.caption_lengths(torch.stack([t0, t1])).tolist() == [13, 5]
    assert decode_captions(torch.stack([t0, t1])) == ["un cœur ♥", "blue"]
    with pytest.raises(DatasetError, match="names no image of a held-out pair"):
        dataset.CaptionFolder(tmp_path, image_size=4, split="holdout")


@pytest.mark.parametrize("line,message", [
    ("not json", r"metadata.jsonl:2: not JSON \(Expecting value\); each line is one object such as"),
    ('["red.png", "a cat"]', r"metadata.jsonl:2: not a JSON object"),
    ('{"text": "a cat"}', r'metadata.jsonl:2: "file_name" is missing or empty'),
    ('{"file_name": "red.png"}', r'metadata.jsonl:2: "text" is missing or empty; every image needs a caption'),
    ('{"file_name": "red.png", "text": "  "}', r'metadata.jsonl:2: "text" is missing or empty'),
    ('{"file_name": "red.png", "text": 7}', r'metadata.jsonl:2: "text" is missing or empty'),
    ('{"file_name": "gone.png", "text": "a cat"}', r"metadata.jsonl:2: image 'gone.png' not found in"),
    ('{"file_name": "../red.png", "text": "a cat"}', r"metadata.jsonl:2: file_name '../red.png' points outside"),
    ('{"file_name": "red.png", "text": "' + "é" * 33 + '"}',
     r"metadata.jsonl:2: the caption is 66 bytes in UTF-8, over the limit of 64; shorten it"),
])
def test_caption_folder_names_the_bad_line(tmp_path, line, message):
    write_captioned(tmp_path, ['{"file_name": "blue/b.png", "text": "a blue thing"}', line])
    with pytest.raises(DatasetError, match=message) as caught:
        dataset.CaptionFolder(tmp_path, image_size=4)
    assert "\n" not in str(caught.value)


def test_caption_folder_without_metadata_says_what_to_write(tmp_path):
    solid(tmp_path / "a" / "x.png", (8, 8), RED)
    with pytest.raises(DatasetError, match=r"has no metadata.jsonl; .* such as \{\"file_name\""):
        dataset.CaptionFolder(tmp_path, image_size=4)
    with pytest.raises(DatasetError, match="does not exist"):
        dataset.CaptionFolder(tmp_path / "nope", image_size=4)


# -----------------------------------------------------------------------------
# Configuration (config.py): one typed parser for train.py and sample.py
# -----------------------------------------------------------------------------

def test_config_parses_types_dashes_and_flags():
    cfg = parse_args(TrainConfig, ["--batch-size", "32", "--lr=3e-4", "--compile", "--no-hflip",
                                   "--no-grad-checkpointing", "--steps=2e3", "--attn", "math"], TRAIN_PRESETS)
    assert (cfg.batch_size, cfg.lr, cfg.compile, cfg.hflip, cfg.grad_checkpointing, cfg.steps, cfg.attn) == (
        32, 3e-4, True, False, False, 2000, "math")
    assert isinstance(cfg.batch_size, int) and isinstance(cfg.lr, float)
    cfg = parse_args(SampleConfig, ["--label", "3", "star", "--num", "2"])
    assert cfg.label == ["3", "star"] and cfg.num == 2


def test_config_presets_apply_before_overrides():
    cfg = parse_args(TrainConfig, ["--lr", "1e-2", "--preset", "gpu"], TRAIN_PRESETS)
    assert cfg.model == TRAIN_PRESETS["gpu"]["model"] and cfg.lr == 1e-2
    assert parse_args(TrainConfig, [], TRAIN_PRESETS) == TrainConfig()


@pytest.mark.parametrize("argv,message", [
    (["--bach-size", "3"], "unknown option --bach-size (did you mean --batch-size?); valid options: --preset"),
    (["--batch-size", "3.5"], "argument --batch-size: expected an integer >= 1, got '3.5'"),
    (["--lr", "fast"], "argument --lr: expected a number > 0, got 'fast'"),
    (["--attn", "flash"], "argument --attn: invalid choice: 'flash'"),
    (["--steps"], "argument --steps: expected one argument"),
    (["--no-lr"], "unknown option --no-lr (did you mean --lr?)"),
    (["--compile=maybe"], "--compile/--no-compile: ignored explicit argument 'maybe'"),
    (["steps=3"], "unexpected argument 'steps=3'"),
    # Values outside their range: each used to pass the parser and fail later, or not at all.
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["--batch-size", "-2"], "argument --batch-size: expected an integer >= 1, got '-2'"),
    (["--lr", "-1"], "argument --lr: expected a number > 0, got '-1'"),
    (["--lr", "nan"], "argument --lr: expected a number > 0, got 'nan'"),
    (["--image-size", "-16"], "argument --image-size: expected an integer >= 1, got '-16'"),
    (["--image-size", "0"], "argument --image-size: expected an integer >= 1, got '0'"),
    (["--log-every", "0"], "argument --log-every: expected an integer >= 1, got '0'"),
    (["--ckpt-every", "0"], "argument --ckpt-every: expected an integer >= 1, got '0'"),
    (["--workers", "-1"], "argument --workers: expected an integer >= 0, got '-1'"),
    (["--class-dropout", "1.5"], "argument --class-dropout: expected a number in [0, 1), got '1.5'"),
    (["--ema-decay", "inf"], "argument --ema-decay: expected a number in [0, 1], got 'inf'"),
    (["--adam-beta2", "1"], "argument --adam-beta2: expected a number in [0, 1), got '1'"),
    (["--noise-shift", "0"], "argument --noise-shift: expected a number in [0.1, 100], got '0'"),
    (["--seed", "1e30"], "argument --seed: expected an integer in [0, 4294967295], got '1e30'"),
    (["--prediction", "x"], "argument --prediction: invalid choice: 'x'"),
])
def test_config_errors_name_the_problem(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(TrainConfig, argv, TRAIN_PRESETS)


@pytest.mark.parametrize("argv,message", [
    (["--num", "0"], "argument --num: expected an integer >= 1, got '0'"),
    (["--num", "-1"], "argument --num: expected an integer >= 1, got '-1'"),
    (["--zoom", "0"], "argument --zoom: expected an integer in [1, 64], got '0'"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["--eta", "2"], "argument --eta: expected a number in [0, 1], got '2'"),
])
def test_sample_config_ranges(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(SampleConfig, argv)


def test_cfg_interval_flag_is_validated():
    assert parse_args(SampleConfig, ["--cfg-interval", "100", "600"]).cfg_interval == (100, 600)
    with pytest.raises(ConfigError, match=r"--cfg-interval: expected LO < HI, got 600 100"):
        parse_args(SampleConfig, ["--cfg-interval", "600", "100"])
    with pytest.raises(ConfigError, match=r"--cfg-interval: expected a number in \[0, 1000\], got '-5'"):
        parse_args(SampleConfig, ["--cfg-interval", "-5", "100"])
    with pytest.raises(ConfigError, match="--cfg-interval: expected 2 arguments"):
        parse_args(SampleConfig, ["--cfg-interval", "100"])


def test_every_default_and_preset_is_in_its_declared_range():
    import config
    for name, preset in TRAIN_PRESETS.items():
        cfg = dataclasses.replace(TrainConfig(), **preset)
        for f in dataclasses.fields(TrainConfig):
            if f.type in (int, float) and getattr(cfg, f.name) is not None:  # None: chosen later (auto)
                assert config.in_range(f, getattr(cfg, f.name)), (name, f.name)


def test_every_preset_names_real_fields():
    fields = set(TrainConfig.__dataclass_fields__)
    for preset in TRAIN_PRESETS.values():
        assert set(preset) <= fields
        assert preset.get("model", TrainConfig.model) in {**dit.DiT_models, **dit.TextDiT_models}


# -----------------------------------------------------------------------------
# Training (train.py): one step (schedules, EMA, optimizer, clipping, accumulation, flips)
# Unit tests of the trainer's functions where they suffice, each asserting a closed form or an
# invariant that a one-line bug breaks; one short run checks the loop's wiring (next section).
# -----------------------------------------------------------------------------

def test_learning_rate_warms_up_then_decays_to_a_tenth_of_the_peak():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, steps=104, lr_schedule="cosine")
    # Warm-up: (step + 1) / 4 of the peak, so the very first step already learns. Then
    # 0.1 + 0.9 (1 + cos(pi p)) / 2 at progress p = (step - 4) / 100: 1 at p = 0, 0.55 at
    # p = 1/2, 0.1 at p = 1 and for ever after (the floor).
    expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 29: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 54: 0.55,
                104: 0.1, 105: 0.1, 10**6: 0.1}
    for step, fraction in expected.items():
        assert train.learning_rate(cfg, step) == pytest.approx(1e-3 * fraction, rel=1e-12, abs=0), step
    lrs = [train.learning_rate(cfg, s) for s in range(110)]
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:4])) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    constant = dataclasses.replace(cfg, lr_schedule="constant")
    assert [train.learning_rate(constant, s) for s in (0, 3, 4, 104, 10**6)] == pytest.approx(
        [0.25e-3, 1e-3, 1e-3, 1e-3, 1e-3], rel=1e-12)
    assert train.learning_rate(dataclasses.replace(cfg, warmup_steps=0), 0) == pytest.approx(1e-3, rel=1e-12)


def test_ema_decay_warms_up_to_its_ceiling():
    cfg = TrainConfig(ema_decay=0.9)
    # (1 + step) / (20 + step) until it reaches --ema-decay: early on the average forgets the
    # random initialisation quickly.
    assert [train.ema_decay(cfg, s) for s in (0, 10, 70, 169, 170, 10**6)] == pytest.approx(
        [1 / 20, 11 / 30, 71 / 90, 170 / 189, 0.9, 0.9], rel=1e-12)


def test_update_ema_is_the_closed_form_weighted_average():
    """After updates with decays d_0 .. d_{N-1} towards weights w_0 .. w_{N-1}, the EMA is
    prod_k d_k * e_init + sum_j (1 - d_j) prod_{k > j} d_k * w_j: old weights fade geometrically."""
    ema, model = nn.Linear(3, 2), nn.Linear(3, 2)
    start = [p.detach().double().clone() for p in ema.parameters()]
    cfg, gen, seen = TrainConfig(ema_decay=0.3), torch.Generator().manual_seed(0), []
    for step in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        seen.append([p.detach().double().clone() for p in model.parameters()])
        train.update_ema(ema, model, train.ema_decay(cfg, step))
    decays = [1 / 20, 2 / 21, 3 / 22, 4 / 23, 5 / 24, 6 / 25, 7 / 26, 8 / 27, 0.3, 0.3]  # min(0.3, (1 + k) / (20 + k))
    for i, p in enumerate(ema.parameters()):
        expected = math.prod(decays) * start[i] + sum(
            (1 - d) * math.prod(decays[j + 1:]) * w[i] for j, (d, w) in enumerate(zip(decays, seen)))
        torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=1e-6)


SMALL = dict(model="DiT-Mi/4", image_size=16, device="cpu")


def one_train_step(cfg, lr=None, seed=0, proc=None, batch=None):
    """A fresh TrainState for cfg on proc (by default one CPU process), its weights randomised past
    the zero-initialised output layer so that every weight gets a gradient, then one train_step at
    lr (by default cfg.lr) on batch, the caller's (x, y), with the timesteps and noise that cfg.seed
    and the rank give; or, without a batch, on 4 images of 4 classes with the timesteps, noise and
    label dropout fixed by seed, whatever cfg says.
    Returns (state, weights before, the step's grad norm, its loss, the step function)."""
    proc = proc or train.Process(0, 1, torch.device("cpu"))
    state = train.build_state(cfg, [str(i) for i in range(4)], proc)
    randomize(state.model, seed=seed)
    before = {name: p.detach().clone() for name, p in state.model.named_parameters()}
    step = train.make_train_step(cfg, state, proc)
    if batch is None:
        gen = torch.Generator().manual_seed(seed)
        batch = torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1, torch.tensor([0, 1, 2, 3])
        torch.manual_seed(seed)  # the same timesteps, noise and label dropout whatever cfg says
    loss, _, grad_norm = step(*batch, cfg.lr if lr is None else lr)
    return state, before, grad_norm, loss, step


def trained(state):
    return [(name, p) for name, p in state.model.named_parameters() if p.requires_grad]


def global_norm(tensors):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])).item()


def accumulating(grad_accum, world=1):
    """The gradient accumulation tests' config: 8 images per process, label dropout off (its draws
    happen inside the forward, per micro-batch), clipping off (the gradients themselves are
    compared: AdamW would hide a wrong scale, it divides it out)."""
    return TrainConfig(**SMALL, batch_size=8 * world, grad_accum=grad_accum, class_dropout=0.0, attn="math",
                       seed=7, grad_clip=0)


def gaussian_batch(seed):
    """8 Gaussian images and labels of 3 classes, from a generator of their own."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def test_each_weight_moves_by_the_learning_rate_the_step_is_given():
    """Adam's first step moves a weight by lr * g / (|g| + eps): by lr, wherever |g| >> eps. The
    step is given 2.5e-4, not --lr (1e-3): the schedule's value must reach the optimizer."""
    state, before, *_ = one_train_step(TrainConfig(**SMALL, lr=1e-3, grad_clip=0.0), lr=2.5e-4)
    checked = 0
    for name, p in trained(state):
        big = p.grad.abs() > 1e-5  # eps 1e-8: within 1e-3 of lr
        moved = before[name] - p.detach()
        torch.testing.assert_close(moved[big], 2.5e-4 * p.grad[big].sign(), rtol=2e-3, atol=0)
        checked += int(big.sum())
    assert checked > 0.7 * sum(p.numel() for _, p in trained(state))  # 78%: most weights are checked


def test_gradient_clipping_bounds_what_the_optimizer_sees():
    clipped, _, norm, *_ = one_train_step(TrainConfig(**SMALL, grad_clip=1e-3))
    free, _, free_norm, *_ = one_train_step(TrainConfig(**SMALL, grad_clip=0.0))  # 0: off
    assert norm.item() == pytest.approx(free_norm.item(), rel=1e-6) and norm > 10 * 1e-3  # the clip acts
    # Clipping rescales the whole gradient to norm 1e-3, keeping its direction ...
    assert global_norm([p.grad for _, p in trained(clipped)]) == pytest.approx(1e-3, rel=1e-4)
    for (name, p), (_, q) in zip(trained(clipped), trained(free)):
        torch.testing.assert_close(p.grad, q.grad * (1e-3 / free_norm), rtol=1e-4, atol=1e-12)
    # ... before the optimizer reads it: Adam's first moment after one step is (1 - beta1) g.
    assert global_norm([clipped.opt.state[p]["exp_avg"] for _, p in trained(clipped)]) == pytest.approx(
        0.1 * 1e-3, rel=1e-4)
    assert global_norm([p.grad for _, p in trained(free)]) == pytest.approx(free_norm.item(), rel=1e-5)


def test_weight_decay_shrinks_every_weight_by_lr_times_decay():
    """AdamW decouples the decay: a step with decay wd lands at the step without it, minus lr wd p."""
    lr, wd = 1e-3, 1.0
    plain, before, *_ = one_train_step(TrainConfig(**SMALL, lr=lr, weight_decay=0.0))
    decayed, *_ = one_train_step(TrainConfig(**SMALL, lr=lr, weight_decay=wd))
    for (name, p), (_, q) in zip(trained(plain), trained(decayed)):
        torch.testing.assert_close(q.detach() - p.detach(), -lr * wd * before[name], rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("beta2", [0.95, 0.999])
def test_adam_beta2_sets_the_second_moment_average(beta2):
    """After one step Adam's second moment is (1 - beta2) g^2: --adam-beta2 reaches the optimizer."""
    state, *_ = one_train_step(TrainConfig(**SMALL, adam_beta2=beta2))
    for _, p in trained(state):
        torch.testing.assert_close(state.opt.state[p]["exp_avg_sq"], (1 - beta2) * p.grad ** 2,
                                   rtol=1e-5, atol=1e-12)


def test_grad_accum_makes_the_same_update_as_one_batch():
    one, _, _, loss_one, _ = one_train_step(accumulating(1), lr=1e-3, batch=gaussian_batch(100))
    four, _, _, loss_four, _ = one_train_step(accumulating(4), lr=1e-3, batch=gaussian_batch(100))
    assert min(p.grad.abs().max().item() for _, p in trained(one)) > 0  # every weight has a gradient to compare
    for (_, a), (_, b) in zip(trained(one), trained(four)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss_one, loss_four, atol=1e-7, rtol=1e-6)  # the logged loss is the batch's


def test_hflip_mirrors_about_half_of_each_batch():
    import types
    x, y = torch.randn(400, 3, 4, 5), torch.arange(400)
    state = types.SimpleNamespace(flip_gen=torch.Generator().manual_seed(0))
    out, out_y = train.next_batch(iter([(x, y)]), TrainConfig(hflip=True), state, torch.device("cpu"))
    mirrored = torch.tensor([torch.equal(o, xi[..., torch.arange(4, -1, -1)]) for o, xi in zip(out, x)])
    unchanged = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (mirrored ^ unchanged).all()  # each image is itself or its left-right mirror image
    assert 0.4 < mirrored.float().mean() < 0.6  # 400 fair coins: 0.5 +- 0.025
    assert torch.equal(out_y, y)
    same, _ = train.next_batch(iter([(x, y)]), TrainConfig(hflip=False), state, torch.device("cpu"))
    assert torch.equal(same, x)


# -----------------------------------------------------------------------------
# Training: the loop, its run folder and its sample grids
# -----------------------------------------------------------------------------

def copy_run(run, to):
    shutil.copytree(run, to)
    return to


def snapshot(folder):
    """Every file's bytes, except the lock file (each start writes its pid there)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != "train.lock"}


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_training_lowers_the_loss_and_writes_its_run(tiny_run):
    out, summary = tiny_run
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    assert summary["steps"] == 80 and strict_json(out / "summary.json") == summary
    assert [p.name for p in train.checkpoint_files(out)] == ["step_0000080.pt", "step_0000078.pt"]
    assert list(out.glob("events.out.tfevents.*"))
    # The grid for people, enlarged (nearest pixel) to >= 512 px, and the raw one for programs:
    # 8 classes x 8 samples of 16 px with 1 px of padding.
    assert Image.open(out / "samples" / "step_0000080_raw.png").size == (137, 137)
    assert Image.open(out / "samples" / "step_0000080.png").size == (4 * 137, 4 * 137)
    state = train.load_checkpoint(out)
    assert state["classes"] == dataset.ImageFolder(state["config"]["data"], 16).classes
    assert set(state) >= {"model", "ema", "opt", "step", "rng", "config", "model_args"}


def test_a_short_run_follows_its_schedules_step_by_step(tiny_data, tmp_path):
    """Every checkpoint kept (--keep-every 1), so each step's lr and EMA can be checked against the
    formulas; also the intermediate grids of --sample-every and the stale .pt.tmp cleanup."""
    import csv
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale, users = run / "checkpoints" / "step_0000009.pt.tmp", run / "checkpoints" / "step_best.pt.tmp"
    stale.write_bytes(b"the first half of a checkpoint that a kill interrupted")
    users.write_bytes(b"not a name the trainer writes")
    train.main(tiny_args(tiny_data, run, 5, "--lr", "2e-3", "--warmup-steps", "3", "--ema-decay", "0.2",
                         "--ckpt-every", "1", "--keep-every", "1", "--sample-every", "2"))
    assert not stale.exists() and users.exists()
    states = [train.load_checkpoint(p) for p in reversed(train.checkpoint_files(run))]
    assert [s["step"] for s in states] == [1, 2, 3, 4, 5]
    # Step k (from 0) trains at 2e-3 * (k + 1) / 3 while warming up, then the cosine over the two
    # steps left: 1, then 0.55. The optimizer keeps the last lr it was given.
    lrs = [2e-3 * f for f in (1 / 3, 2 / 3, 1.0, 1.0, 0.55)]
    assert [s["opt"]["param_groups"][0]["lr"] for s in states] == pytest.approx(lrs, rel=1e-12)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 5]
    assert [float(r["lr"]) for r in rows] == pytest.approx([lrs[1], lrs[3], lrs[4]], rel=1e-12)
    # The EMA after step n: d * EMA before it + (1 - d) * weights after it, d = min(0.2, n / (19 + n)):
    # below the ceiling for n = 2 .. 4, at it for n = 5.
    for prev, now in zip(states, states[1:]):
        n = now["step"]
        d = min(0.2, n / (19 + n))
        for key, value in now["ema"].items():
            expected = d * prev["ema"][key].double() + (1 - d) * now["model"][key].double()
            torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=1e-5)
        assert not torch.equal(now["ema"]["final_layer.linear.weight"], now["model"]["final_layer.linear.weight"])
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == [f"step_000000{n}{raw}.png" for n in (2, 4, 5) for raw in ("", "_raw")]
    pixels = [Image.open(run / "samples" / f"step_000000{n}_raw.png").tobytes() for n in (2, 4)]
    assert pixels[0] != pixels[1]  # drawn from the EMA of their own step


def test_open_metrics_drops_the_rows_a_killed_run_wrote_past_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.csv"
    header = "step,loss,mse,grad_norm,lr,img_per_s,elapsed_s"
    rows = [f"{s},0.{s},0.0{s},1.{s},0.001,5{s}.5,{s}.25" for s in (2, 4, 6, 8)]
    path.write_text("\n".join([header, *rows]) + "\n")
    f = train.open_metrics(path, 4)  # the checkpoint is at step 4: rows 6 and 8 never happened
    f.write("appended\n")
    f.close()
    assert path.read_text().splitlines() == [header, rows[0], rows[1], "appended"]


def test_a_garbage_row_in_metrics_csv_is_dropped_with_a_warning(tiny_run, tiny_data, tmp_path):
    run = copy_run(tiny_run[0], tmp_path / "run")
    with open(run / "metrics.csv", "a") as f:
        f.write("garbage\nten,1,2,3,4,5,6\n")
    with pytest.warns(UserWarning, match="dropped 2 row"):
        train.main(tiny_args(tiny_data, run, 82, *TINY_RUN))
    steps = [int(r.split(",")[0]) for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [20, 40, 60, 80, 82]


def test_the_model_graph_is_in_tensorboard_and_a_failed_trace_warns(tiny_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tiny_run[0]))
    events.Reload()
    graph = events.Graph()
    ops = {node.op for node in graph.node}
    assert any("aten::linear" in op or "aten::addmm" in op for op in ops), ops  # the network's layers

    class Refuses:
        def add_graph(self, model, inputs):
            raise RuntimeError("cannot trace this\nsecond line")

        def add_text(self, tag, text):
            self.text = (tag, text)
    writer = Refuses()
    with pytest.warns(UserWarning, match=r"could not be traced \(RuntimeError: cannot trace this\); TensorBoard"):
        train.write_graph(writer, tiny_model().eval(), ["a"])
    assert writer.text[0] == "model" and "DiTBlock" in writer.text[1]


class RecordingWriter:
    def __init__(self):
        self.histograms = {}

    def add_image(self, *args):
        pass

    def add_histogram(self, tag, values, step):
        self.histograms[tag] = values


def test_prediction_histogram_is_the_output_on_fresh_noise(tmp_path):
    # It used to be fed the finished samples, whatever its comment said.
    model = randomize(tiny_model(input_size=8, num_classes=3)).eval()
    diffusion = dit.GaussianDiffusion(schedule="cosine", prediction="v")
    writer, cfg = RecordingWriter(), TrainConfig(sample_steps=2, cfg_scale=1.0)
    train.write_samples(model, diffusion, cfg, ["a", "b", "c"], torch.device("cpu"), tmp_path, writer, 7)
    noise = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    t = torch.full((8,), diffusion.num_timesteps - 1)
    with torch.no_grad():
        expected = model(noise, t, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    torch.testing.assert_close(writer.histograms["ema/prediction"], expected)


def test_training_grids_take_the_colour_scale(tmp_path):
    """write_samples hands --cfg-colour-scale to dit.draw: dropped, every setting would draw the
    same grid. A class model's default (None) is plain guidance: the cfg scale for colour too."""
    model = randomize(tiny_model(input_size=8, num_classes=3)).eval()
    diffusion = dit.GaussianDiffusion(schedule="cosine", prediction="v")
    grids = {}
    for colour in (None, 3.0, 0.0):
        out = tmp_path / str(colour)
        out.mkdir()
        cfg = TrainConfig(sample_steps=2, cfg_scale=3.0, cfg_interval=(0, 1000), cfg_colour_scale=colour)
        train.write_samples(model, diffusion, cfg, ["a", "b", "c"], torch.device("cpu"), out, RecordingWriter(), 7)
        grids[colour] = png_pixels(out / "samples" / "step_0000007_raw.png").int()
    assert torch.equal(grids[None], grids[3.0])
    assert (grids[0.0] - grids[3.0]).abs().max() > 10


def test_a_flow_run_trains_samples_and_carries_its_objective(tiny_data, tmp_path, capsys):
    out = tmp_path / "flow"
    train.main(tiny_args(tiny_data, out, 4, "--objective", "flow", "--loss", "l1", "--log-every", "2"))
    saved = train.load_checkpoint(out)
    assert saved["diffusion_args"]["objective"] == "flow" and saved["diffusion_args"]["loss"] == "l1"
    _, diffusion, _ = sample.load_model(out, torch.device("cpu"))
    assert isinstance(diffusion, dit.RectifiedFlow) and diffusion.prediction == "x0"
    assert run_sample(out, tmp_path / "euler", "--label", "0").shape == (2, 3, 16, 16)
    assert "(euler, 4 steps" in capsys.readouterr().out  # auto is Euler for a flow run
    run_sample(out, tmp_path / "heun", "--label", "0", "--sampler", "heun")
    with pytest.raises(SystemExit, match="--sampler ddim does not fit this flow matching run: choose euler or heun"):
        run_sample(out, tmp_path / "ddim", "--sampler", "ddim")
    with pytest.raises(SystemExit, match="trained with --objective flow, but this run asks for ddpm"):
        train.main(tiny_args(tiny_data, out, 6))


def test_a_text_run_trains_draws_its_prompts_and_sample_py_draws_the_same(tiny_data, tmp_path, capsys):
    out = tmp_path / "text"
    train.main(tiny_args(tiny_data, out, 4, "--model", "TextDiT-Mi/4", "--cfg-scale", "2"))
    saved = train.load_checkpoint(out)
    assert saved["model_args"]["name"] == "TextDiT-Mi/4" and saved["classes"] is None
    assert saved["model_args"]["caption_dropout_prob"] == 0.1
    prompts = train.grid_prompts(dataset.CaptionFolder(tiny_data, 16))
    assert prompts[0] == "a green circle" and prompts[2] == "a blue heart"  # held-out pairs: rows 0, 2, ...
    assert all(shape in p for p, shape in zip(prompts, dataset.SHAPES))
    grid = png_pixels(out / "samples" / "step_0000004_raw.png")
    assert grid.shape == (3, 8 * 17 + 1, 8 * 17 + 1)  # 8 prompts x 8 samples of 16 px, 1 px padding
    # Row 2 of the training grid is what sample.py draws for its prompt, with the run's settings.
    run_sample(out, tmp_path / "s", "--prompt", prompts[2], "a red star", "--num", "8", "--steps", "2",
               "--cfg-scale", "2")
    assert "16 samples of a blue heart, a red star" in capsys.readouterr().out
    row = tile(grid, 2, 0)
    drawn = png_pixels(tmp_path / "s" / "a_blue_heart_000.png")
    assert (row.int() - drawn.int()).abs().max() <= 1 and drawn.float().std() > 0
    # evaluate.py judges all 48 "a <colour> <shape>" prompts, the never-seen pairs apart.
    result = evaluate.main(["--ckpt", str(out), "--num", "2", "--steps", "2", "--grid", str(tmp_path / "g.png")])
    assert len(result["per_pair"]) == 48
    grid = Image.open(tmp_path / "g.png").convert("RGB")
    assert grid.size == (8 * 4 * 20, 6 * 4 * 20)  # 6 colours x 8 shapes, 16 px framed by 2, 4x
    assert grid.getpixel((1, 3 * 80 + 1)) == (255, 255, 255)  # green circle: held out, framed white
    assert grid.getpixel((1, 1)) == (0, 0, 0)                  # red circle: seen in training
    held = [dataset.shape_prompt(shape, colour) for colour, shape in dataset.TEXT_HOLDOUT]
    for key, index, prompts_of in (("held_shape", 0, held), ("held_colour", 1, held),
                                   ("seen_colour", 1, [p for p in result["per_pair"] if p not in held])):
        mean = sum(result["per_pair"][p][index] for p in prompts_of) / len(prompts_of)
        assert result[key] == pytest.approx(mean)
    assert sum(result["plain_colours"]) == pytest.approx(1.0)
    tvs = result["plain_shape_tvs"]
    assert len(tvs) >= 6 and result["plain_shape_tv"] == pytest.approx(sum(tvs.values()) / len(tvs))
    with pytest.raises(SystemExit, match='--label is for class runs; this run was trained on captions'):
        run_sample(out, tmp_path / "l", "--label", "1")
    with pytest.raises(SystemExit, match="this run was trained on captions: say what to draw"):
        run_sample(out, tmp_path / "n")
    with pytest.raises(SystemExit, match=r"--prompt: caption 'x+\.\.\.' is 65 bytes in UTF-8, over the limit of 64"):
        run_sample(out, tmp_path / "x", "--prompt", "x" * 65)


def test_two_first_runs_generate_the_built_in_data_together_safely(tmp_path):
    import threading
    root, barrier, errors = tmp_path / "data" / "shapes", threading.Barrier(2), []

    def first_run():  # a thread has its own lock file descriptor, so it contends like a process
        barrier.wait()
        try:
            train.prepare_builtin_data(root, images_per_class=40, image_size=16)
        except Exception as err:  # without the lock: FileExistsError from the shared temp folder
            errors.append(err)

    threads = [threading.Thread(target=first_run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(ImageFolder(root, image_size=16)) == 8 * 40
    assert sorted(p.name for p in root.parent.iterdir()) == [".shapes.lock", "shapes"]


# -----------------------------------------------------------------------------
# Training: refusals before anything runs (flags, data, --out)
# -----------------------------------------------------------------------------

def test_bad_flags_are_one_line_errors_before_anything_runs(tiny_data, tmp_path, monkeypatch):
    for extra, message in [(("--image-size", "0"), "argument --image-size: expected an integer >= 1"),
                           (("--batch-size", "-2"), "argument --batch-size: expected an integer >= 1"),
                           (("--image-size", "18"), "not a multiple of DiT-Mi/4's patch size 4")]:
        with pytest.raises(SystemExit, match=message):
            train.main(tiny_args(tiny_data, tmp_path / "run", 2, *extra))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU without the interpreter cannot run the kernel
    with pytest.raises(SystemExit, match="--attn triton on a CPU runs only in Triton's interpreter"):
        train.main(tiny_args(tiny_data, tmp_path / "run", 2, "--attn", "triton"))
    assert not (tmp_path / "run").exists()


def test_new_training_flags_are_checked_up_front(tiny_data, tmp_path):
    cases = [(("--grad-accum", "3"), "--batch-size 8 is not divisible by 1 process.es. x --grad-accum 3"),
             (("--objective", "flow", "--learn-sigma"), "--objective flow predicts v or x0 .* drop --learn-sigma"),
             (("--objective", "flow", "--prediction", "eps"), "drop --prediction eps"),
             (("--objective", "edm"), "argument --objective: invalid choice: 'edm'"),
             (("--loss", "l3"), "argument --loss: invalid choice: 'l3'"),
             (("--grad-accum", "0"), "argument --grad-accum: expected an integer >= 1, got '0'")]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            train.main(tiny_args(tiny_data, tmp_path / "run", 2, *extra))
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "nowhere", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no class"),
])
def test_bad_data_is_a_clear_error(tmp_path, make, message):
    with pytest.raises(SystemExit, match=message):
        train.main(tiny_args(make(tmp_path), tmp_path / "run", 2))


def test_batch_larger_than_data_is_a_clear_error(tiny_data, tmp_path):
    with pytest.raises(SystemExit, match="batch size"):
        train.main(tiny_args(tiny_data, tmp_path / "run", 2, "--batch-size", "64"))


@pytest.mark.parametrize("data,extra,message", [
    ("nowhere", (), "does not exist"), ("tiny", ("--batch-size", "64"), "batch size")])
def test_bad_data_leaves_no_run_directory_behind(tiny_data, tmp_path, data, extra, message):
    with pytest.raises(SystemExit, match=message):
        train.main(tiny_args(tiny_data if data == "tiny" else tmp_path / data, tmp_path / "run", 2, *extra))
    assert not (tmp_path / "run").exists()


def test_an_out_that_is_not_a_run_of_this_project_is_refused(tiny_data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own settings")
    (mine / "summary.json").write_text("my own notes")
    before = snapshot(mine)
    with pytest.raises(SystemExit, match="holds files that are not a run of this project"):
        train.main(tiny_args(tiny_data, mine, 2))
    assert snapshot(mine) == before and len(list(mine.iterdir())) == 2
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    for out, message in [("", "--out is empty"), (a_file, "is a file"), (a_file / "run", "cannot write there"),
                         ("/proc/dit-test-run", "cannot write there")]:   # /proc: read-only, even for root
        with pytest.raises(SystemExit, match=message):
            train.main(tiny_args(tiny_data, out, 2))


def test_a_finished_run_says_so_and_touches_nothing(tiny_run, tiny_data, tmp_path, capsys):
    run = copy_run(tiny_run[0], tmp_path / "run")
    before = snapshot(run)
    summary = train.main(tiny_args(tiny_data, run, 80, *TINY_RUN))
    printed = capsys.readouterr().out
    assert f"{run} already finished at step 80" in printed and "pass a larger --steps" in printed
    assert snapshot(run) == before and summary == strict_json(run / "summary.json")


# -----------------------------------------------------------------------------
# Training: checkpoints and exact resume
# -----------------------------------------------------------------------------

def final_weights(out):
    return train.load_checkpoint(out)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def start_training(args):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc, ready, timeout=120):
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def logged_rows(out):
    path = Path(out, "metrics.csv")
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


@pytest.mark.parametrize("grad_accum", ["1", "2"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tiny_data, tmp_path, grad_accum):
    extra = ("--lr-schedule", "constant", "--hflip", "--grad-accum", grad_accum)
    train.main(tiny_args(tiny_data, tmp_path / "full", 10, *extra))
    train.main(tiny_args(tiny_data, tmp_path / "split", 4, *extra))   # stops at step 4 ...
    train.main(tiny_args(tiny_data, tmp_path / "split", 10, *extra))  # ... and resumes there
    assert_same_weights(final_weights(tmp_path / "split"), final_weights(tmp_path / "full"))
    ema_a, ema_b = (train.load_checkpoint(tmp_path / r)["ema"] for r in ("split", "full"))
    assert_same_weights(ema_a, ema_b)
    steps = [int(r.split(",")[0]) for r in (tmp_path / "split" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [2, 4, 6, 8, 10]


def test_sigkill_then_restart_reaches_the_same_weights_and_the_lock_is_not_stale(tiny_data, tmp_path):
    extra = ("--lr-schedule", "constant")  # with a constant lr, --steps only says where to stop
    killed = tmp_path / "killed"
    proc = start_training(tiny_args(tiny_data, killed, 100_000, *extra))
    wait_for(proc, lambda: train.checkpoint_files(killed))
    # While it runs, a second trainer on the same --out is refused and told which process runs.
    with pytest.raises(SystemExit, match=rf"--out {killed} is in use by another train.py \(pid {proc.pid}\)"):
        train.main(tiny_args(tiny_data, killed, 100_000, *extra))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The kernel dropped the dead process's lock, so the restart is not blocked by it.
    target = train.load_checkpoint(killed)["step"] + 4
    train.main(tiny_args(tiny_data, killed, target, *extra))
    train.main(tiny_args(tiny_data, tmp_path / "full", target, *extra))
    assert_same_weights(final_weights(killed), final_weights(tmp_path / "full"))


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_exits_with_128_plus_its_number(tiny_data, tmp_path, sig, status, capsys):
    # A stopped run must not look finished to a script: SIGINT used to exit 0. In-process (the
    # signal goes to this very process once training logs), which saves starting a Python.
    import threading

    def signal_once_training():
        deadline = time.time() + 120
        while logged_rows(tmp_path) < 1 and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), sig)

    threading.Thread(target=signal_once_training, daemon=True).start()
    with pytest.raises(SystemExit, match=f"^{status}$") as exited:  # SystemExit's text is its code
        train.main(tiny_args(tiny_data, tmp_path, 100_000, "--ckpt-every", "1000"))
    assert exited.value.code == status
    printed = capsys.readouterr().out
    assert f"stopped by {sig.name}" in printed and "checkpoint saved" in printed
    state, summary = train.load_checkpoint(tmp_path), strict_json(tmp_path / "summary.json")
    assert state["step"] >= 2 and summary["interrupted"] and summary["steps"] == state["step"]
    assert math.isfinite(summary["final_loss"])


def test_save_checkpoint_keeps_the_two_newest_and_every_multiple_of_keep_every(tmp_path):
    for step in range(1, 11):
        train.save_checkpoint({"step": step}, tmp_path, keep_every=4)
    steps = lambda: [int(p.name[5:12]) for p in train.checkpoint_files(tmp_path)]  # noqa: E731
    assert steps() == [10, 9, 8, 4]
    train.save_checkpoint({"step": 11}, tmp_path)  # keep_every 0: only the two newest stay
    assert steps() == [11, 10]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000010.pt", "step_0000011.pt"]


def test_only_the_checkpoint_names_the_trainer_writes_count(tiny_run, tmp_path):
    run = copy_run(tiny_run[0], tmp_path / "run")
    ckpts = run / "checkpoints"
    strays = ["step_best.pt", "step_0000012 copy.pt", "step_00000090.pt", "notes.txt"]
    for name in strays:  # a user's copies: they once rolled a run back, crashed saves, got deleted
        shutil.copy(ckpts / "step_0000078.pt", ckpts / name)
    assert [p.name for p in train.checkpoint_files(run)] == ["step_0000080.pt", "step_0000078.pt"]
    assert train.load_checkpoint(run)["step"] == 80
    # Ordered by number, not by name: step 10,000,000 sorts before 9,999,999 as text.
    state = train.load_checkpoint(run)
    for step in (9_999_999, 10_000_000, 10_000_001):
        train.save_checkpoint({**state, "step": step}, run)
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(["step_10000001.pt", "step_10000000.pt", *strays])
    assert train.load_checkpoint(run)["step"] == 10_000_001


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tiny_run, tmp_path):
    out = copy_run(tiny_run[0], tmp_path / "run")
    newest, previous = train.checkpoint_files(out)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="unreadable.*falling back"):
        state = train.load_checkpoint(out)
    assert state["step"] == 78
    with pytest.raises(train.CheckpointError, match="unreadable"):
        train.load_checkpoint(newest)


class RunsCode:
    """Unpickling this calls open(path, "w"): any function a hostile checkpoint names would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_that_would_run_code_is_never_loaded(tiny_run, tiny_data, tmp_path):
    marker = tmp_path / "code_ran"
    hostile = {key: RunsCode(marker) for key in ("model", "ema", "opt", "step", "wall_time", "rng", "config",
                                                 "model_args", "diffusion_args", "classes")}
    torch.save(hostile, tmp_path / "shared.pt")
    with pytest.raises(SystemExit, match=r"shared.pt is not a checkpoint of this project \(it asks to run .*open\)"):
        run_sample(tmp_path / "shared.pt", tmp_path / "samples")
    # Planted in a run as its newest checkpoint: skipped with a warning, and the run resumes.
    run = copy_run(tiny_run[0], tmp_path / "run")
    torch.save(hostile, run / "checkpoints" / "step_9999999.pt")
    with pytest.warns(UserWarning, match="step_9999999.pt is not a checkpoint of this project.*falling back"):
        summary = train.main(tiny_args(tiny_data, run, 82, *TINY_RUN))
    assert summary["steps"] == 82 and not marker.exists()
    # Our own format with keys missing: named, not a KeyError.
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"other.pt is not a checkpoint of this project \(it lacks model, ema"):
        run_sample(tmp_path / "other.pt", tmp_path / "samples")


def test_a_full_disk_leaves_no_partial_file_and_says_so(tiny_run, tiny_data, tmp_path, monkeypatch):
    import errno
    run = copy_run(tiny_run[0], tmp_path / "run")

    def disk_fills_up(obj, f):
        f.write(b"the first half of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train.torch, "save", disk_fills_up)
    with pytest.raises(SystemExit, match=r"could not write .*step_0000082.pt \(No space left on device\); "
                                         r"the older checkpoints are intact"):
        train.main(tiny_args(tiny_data, run, 82, *TINY_RUN))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000078.pt", "step_0000080.pt"]


def test_resuming_with_another_model_is_a_clear_error(tiny_run, tiny_data):
    with pytest.raises(SystemExit, match="trained with --model DiT-Mi/4, but this run asks for DiT-Mi/2"):
        train.main(tiny_args(tiny_data, tiny_run[0], 50, "--model", "DiT-Mi/2"))


def test_noise_shift_travels_in_the_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    train.main(tiny_args(tiny_data, run, 2, "--noise-shift", "3"))
    diffusion = sample.load_model(run, torch.device("cpu"))[1]  # the sampler runs the trained schedule
    torch.testing.assert_close(diffusion.alphas_cumprod,
                               dit.GaussianDiffusion(schedule="cosine", noise_shift=3.0).alphas_cumprod)
    with pytest.raises(SystemExit, match="trained with --noise-shift 3.0, but this run asks for 2.0"):
        train.main(tiny_args(tiny_data, run, 4))


@pytest.mark.parametrize("conditioning", dit.CONDITIONINGS)
def test_conditioning_travels_in_the_checkpoint(conditioning, tiny_data, tmp_path):
    """train.py --conditioning NAME saves it in model_args; sampling rebuilds that design, guided."""
    train.main(tiny_args(tiny_data, tmp_path / "run", 2, "--conditioning", conditioning))
    model, _, _ = sample.load_model(tmp_path / "run", torch.device("cpu"))
    assert model.conditioning == conditioning
    images = sample.main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "samples"), "--label", "0",
                          "--num", "2", "--steps", "2", "--cfg-scale", "4", "--device", "cpu"])
    assert images.shape == (2, 3, 16, 16)


def test_checkpoints_drop_data_batches_and_old_files_with_it_still_load(tiny_run, tmp_path):
    state = train.load_checkpoint(tiny_run[0])
    assert "data_batches" not in state  # written once, never read
    torch.save({**state, "data_batches": state["step"]}, tmp_path / "old.pt")
    assert train.load_checkpoint(tmp_path / "old.pt")["step"] == 80
    model, _, _ = sample.load_model(tmp_path / "old.pt", torch.device("cpu"))
    assert_same_weights(model.state_dict(), state["ema"])


def test_weights_of_an_older_layout_are_a_one_line_error():
    """A text checkpoint from before the word-level encoder has caption_encoder.layers.* where
    the model now has caption_encoder.spell.*: refused in one line, not a state_dict traceback."""
    model = tiny_text_model()
    old = {k.replace(".spell.", ".layers.9."): v for k, v in model.state_dict().items()}
    with pytest.raises(train.CheckpointError, match=r"do not fit the model its arguments build \(\d+ names "
                       r"differ, e.g. caption_encoder\.layers\.9\..*\): an older version of dit.py saved it"):
        train.load_weights(model, old)
    fresh = tiny_text_model()
    train.load_weights(fresh, randomize(model).state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_a_checkpoint_from_before_adam_beta2_reads_as_the_beta2_it_was_trained_with(tiny_data, tmp_path):
    """Runs saved before --adam-beta2 existed trained with PyTorch's 0.999, not today's default."""
    out = tmp_path / "old"
    train.main(tiny_args(tiny_data, out, 2))
    path = train.checkpoint_files(out)[0]
    saved = torch.load(path, weights_only=True)
    assert saved["config"]["adam_beta2"] == TrainConfig.adam_beta2 != 0.999
    del saved["config"]["adam_beta2"]
    torch.save(saved, path)
    assert train.load_checkpoint(out)["config"]["adam_beta2"] == 0.999


def test_an_older_text_checkpoint_pools_as_it_was_trained(tiny_data, tmp_path):
    """Text runs saved before caption_pool existed pooled mean_then_mlp: the loader says so, so
    sample.py draws from them as they were trained, and resuming one with this dit.py (which
    builds mlp_then_mean, and no flag changes that) is a one-line error, not a silent switch."""
    out = tmp_path / "text"
    train.main(tiny_args(tiny_data, out, 2, "--model", "TextDiT-Mi/4"))
    path = train.checkpoint_files(out)[0]
    saved = torch.load(path, weights_only=True)
    assert saved["model_args"]["caption_pool"] == "mlp_then_mean"
    del saved["model_args"]["caption_pool"]
    torch.save(saved, path)
    assert train.load_checkpoint(out)["model_args"]["caption_pool"] == "mean_then_mlp"
    model = sample.load_model(out, torch.device("cpu"))[0]
    assert model.caption_encoder.pool_order == "mean_then_mlp"
    with pytest.raises(SystemExit, match=r"holds a text run whose caption encoder pools mean_then_mlp \(an older "
                                         r"dit.py\); this one pools mlp_then_mean: sample it as it is"):
        train.main(tiny_args(tiny_data, out, 4, "--model", "TextDiT-Mi/4"))


# -----------------------------------------------------------------------------
# Training: two processes (DDP on gloo)
# -----------------------------------------------------------------------------

def free_port():
    """A port the OS just said is free (a fixed one collides)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args):
    """Two processes on gloo, on a free port."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def rank_pid(out, rank):
    """The pid of the training process of `rank` whose command line names `out` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            if (str(out) in (proc / "cmdline").read_text() and "train.py" in (proc / "cmdline").read_text()
                    and f"\0RANK={rank}\0" in "\0" + (proc / "environ").read_text()):
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no rank {rank} process for {out}")


def test_two_process_gloo_run_stops_together_and_resumes_bitwise(tiny_data, tmp_path):
    extra = ("--lr-schedule", "constant", "--hflip")
    split, full = tmp_path / "split", tmp_path / "full"
    proc = torchrun(tiny_args(tiny_data, split, 100_000, *extra))
    wait_for(proc, lambda: logged_rows(split) >= 1, timeout=180)
    # A signal that only rank 1 sees: every rank must stop at the same step (not hang), and save.
    os.kill(rank_pid(split, 1), signal.SIGTERM)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode != 0 and "stopped by SIGTERM" in output, output
    state = train.load_checkpoint(split)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["cpu"], state["rng"][1]["cpu"])
    target = state["step"] + 4
    # Resumed, every rank continues its own random stream: bitwise the uninterrupted run.
    for out in (split, full):
        proc = torchrun(tiny_args(tiny_data, out, target, *extra))
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output
    assert_same_weights(final_weights(split), final_weights(full))
    assert_same_weights(*(train.load_checkpoint(r)["ema"] for r in (split, full)))
    # The last two checkpoints: the final step's, and the last multiple of --ckpt-every (2) before it
    # (the signal may land on an odd step, so target may be odd).
    names = [p.name for p in train.checkpoint_files(full)]
    assert names == [train.checkpoint_name(target), train.checkpoint_name((target - 1) // 2 * 2)]
    assert len(list(full.glob("events.out.tfevents.*"))) == 1  # only rank 0 writes
    assert strict_json(full / "summary.json")["steps"] == target


def _grad_accum_rank(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    torch.set_num_threads(1)
    nets = []  # the DDP-wrapped network each train step trains, to hook its all-reduce

    class RecordedDDP(train.DDP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            nets.append(self)
    train.DDP = RecordedDDP
    with train.distributed("cpu") as proc:
        result = {}
        for k in (1, 2):
            calls = []
            first, _, _, _, step = one_train_step(accumulating(k, proc.world), lr=1e-3, proc=proc,
                                                  batch=gaussian_batch(100 + proc.rank))
            grads = [p.grad.clone() for _, p in trained(first)]
            nets[-1].register_comm_hook(None, lambda state, bucket: (calls.append(1), allreduce_hook(state, bucket))[1])
            # A second step with the hook in place: count the all-reduces of one optimizer step.
            step(*gaussian_batch(200 + proc.rank), 1e-3)
            result[k] = {"grads": grads, "allreduces": len(calls)}
        torch.save(result, Path(out) / f"rank{rank}.pt")


def test_grad_accum_under_ddp_all_reduces_once_per_step(tmp_path):
    import torch.multiprocessing as mp
    mp.start_processes(_grad_accum_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        assert r[2]["allreduces"] == r[1]["allreduces"] >= 1  # no_sync: not once per micro-batch
        for a, b in zip(r[1]["grads"], r[2]["grads"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(ranks[0][2]["grads"], ranks[1][2]["grads"]):
        assert torch.equal(a, b)  # all-reduced: the same averaged gradient on both ranks


# -----------------------------------------------------------------------------
# Training: --benchmark
# -----------------------------------------------------------------------------

def test_benchmark_prints_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bench"
    result = train.main(["--benchmark", "--model", "DiT-Mi/4", "--image-size", "16", "--batch-size", "4",
                         "--out", str(out), "--device", "cpu"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("benchmark | DiT-Mi/4 16px | batch 4") and "img/s" in line and "ms/step" in line
    assert result["img_per_s"] > 0 and result["tflops"] > 0
    assert not out.exists()


def test_benchmark_counts_flops_and_parameters_as_the_paper(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "time_steps", lambda *args: 0.25)  # a step of 250 ms: only the accounting runs
    result = train.main(["--benchmark", "--model", "DiT-Mi/4", "--image-size", "16", "--batch-size", "4",
                         "--out", str(tmp_path / "bench"), "--device", "cpu"])
    model = dit.DiT_models["DiT-Mi/4"](input_size=16, in_channels=3, num_classes=10, learn_sigma=False)
    # dit.forward_gmacs per image, 2 flops a multiply-add, and a backward pass of twice the forward.
    assert result["tflops"] == pytest.approx(3 * 2 * dit.forward_gmacs(model) * 4 / 0.25 / 1e3, rel=1e-12)
    assert result["params"] == sum(p.numel() for p in model.parameters())  # frozen positions included


# -----------------------------------------------------------------------------
# Training: divergence
# -----------------------------------------------------------------------------

def test_divergence_stops_the_run_before_anything_non_finite_is_saved(tiny_data, tmp_path):
    # A huge learning rate without clipping: the loss explodes within a few steps.
    args = tiny_args(tiny_data, tmp_path, 30, "--lr", "1e5", "--grad-clip", "0", "--warmup-steps", "0",
                     "--lr-schedule", "constant", "--log-every", "5")
    with pytest.raises(SystemExit, match=r"training diverged .*Lower --lr \(now 100000\) or keep --grad-clip"):
        train.main(args)
    assert train.checkpoint_files(tmp_path)  # the good ones stay
    for path in train.checkpoint_files(tmp_path):
        state = train.load_checkpoint(path)
        tensors = [*state["model"].values(), *state["ema"].values(),
                   *(v for s in state["opt"]["state"].values() for v in s.values())]
        assert all(torch.isfinite(t).all() for t in tensors), path
    assert all(math.isfinite(float(v)) for row in (tmp_path / "metrics.csv").read_text().splitlines()[1:]
               for v in row.split(","))


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_gradient_norm_stops_the_run_though_the_loss_is_finite(bad, tiny_data, tmp_path, monkeypatch):
    """The common first sign of divergence (bf16, a learning rate too high): the loss is still
    finite, the gradient's norm is not, and the step after it would write NaN weights. Step 3's
    norm is made non-finite (its loss and weights stay finite): the check at step 4 stops the run
    with the one-line message, exit status 1, and step 2's checkpoint is the newest, intact."""
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_with_a_bad_third_step(params, max_norm):
        norm = clip(params, max_norm)
        calls.append(1)
        return torch.full_like(norm, bad) if len(calls) == 3 else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_with_a_bad_third_step)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny_data, tmp_path, 10, "--log-every", "4"))
    message = stop.value.code  # a string: Python prints it and exits with status 1
    assert isinstance(message, str) and "\n" not in message
    assert re.fullmatch(r"train.py: error: training diverged between steps 1 and 4 \(mean loss [0-9.]+, summed "
                        r"gradient norm (inf|nan)\): stopped before saving, the newest checkpoint is intact\. .*",
                        message), message
    assert [p.name for p in train.checkpoint_files(tmp_path)] == ["step_0000002.pt"]
    state = train.load_checkpoint(tmp_path)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())


# -----------------------------------------------------------------------------
# Sampling (sample.py)
# -----------------------------------------------------------------------------

def test_sample_and_evaluate_start_on_a_platform_without_fcntl():
    """Windows has no fcntl: only train.py's run-directory lock needs it, so sample.py and
    assets/evaluate.py, which import train.py, must import without it."""
    code = ("import sys; sys.modules['fcntl'] = None; sys.path[:0] = ['.', 'assets']; "  # None: ImportError
            "import sample, evaluate; print('imported')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stderr[-2000:]


def test_sample_writes_grid_and_one_file_per_sample(tiny_run, tmp_path, capsys):
    images = run_sample(tiny_run[0], tmp_path, "--label", "0", "star", "--show-steps")
    assert images.shape == (4, 3, 16, 16)
    printed = capsys.readouterr().out
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == ["circle_000.png", "circle_001.png", "grid.png", "star_000.png", "star_001.png", "steps.png"]
    assert all(str(tmp_path / f) in printed for f in files)
    assert Image.open(tmp_path / "star_000.png").size == (16, 16)          # the raw images, for programs
    # The grids, for people, enlarged to at least 512 px wide: 2 per row and 2 rows of 17 px + 1
    # (x15); one row per label and min(10, steps) snapshots of x_t, the last one the sample (x8).
    assert Image.open(tmp_path / "grid.png").size == (15 * 35, 15 * 35)
    assert Image.open(tmp_path / "steps.png").size == (8 * 69, 8 * 35)
    run_sample(tiny_run[0], tmp_path / "zoom", "--label", "0", "--zoom", "3")  # an explicit zoom wins
    assert Image.open(tmp_path / "zoom" / "grid.png").size == (3 * 35, 3 * 18)


def as_png(image):
    """What torchvision's save_image writes for an image in [0, 1]: rounded to 8 bits."""
    return (image * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def test_sample_files_hold_the_samples_and_steps_png_the_trajectory(tiny_run, tmp_path):
    out = tmp_path / "out"
    images = sample.main(["--ckpt", str(tiny_run[0]), "--out", str(out), "--label", "1", "3", "--num", "2",
                          "--steps", "3", "--show-steps", "--zoom", "1", "--cfg-scale", "1", "--seed", "4"])
    model, diffusion, classes = sample.load_model(tiny_run[0], torch.device("cpu"))
    grid = png_pixels(out / "grid.png")
    for i in range(4):
        label, k = (1, 3)[i // 2], i % 2
        assert torch.equal(png_pixels(out / f"{classes[label]}_{k:03d}.png"), as_png(images[i]))
        assert torch.equal(tile(grid, i // 2, k), as_png(images[i]))  # one row per label
    # steps.png: a row per label (its first sample), x_t after each of the 3 steps, left to right;
    # the last one is the sample itself. Reference: the same noise denoised alone.
    strip = png_pixels(out / "steps.png")
    assert strip.shape == (3, 2 * 17 + 1, 3 * 17 + 1)
    for row, (label, first) in enumerate([(1, 0), (3, 2)]):
        noise = dit.initial_noise(4, label, 0, (3, 16, 16))[None]
        y = torch.tensor([label])
        with torch.no_grad():
            xs = [x for _, x, _ in diffusion.denoise_steps(lambda x, t: model(x, t, y), noise, steps=3)]
        for col, x in enumerate(xs):
            diff = tile(strip, row, col).int() - as_png((x[0].clamp(-1, 1) + 1) / 2).int()
            assert diff.abs().max() <= 1, (row, col)  # batched vs alone: rounding only
        assert torch.equal(tile(strip, row, 2), as_png(images[first]))


def test_training_grid_rows_are_what_sample_py_draws(tiny_run, tmp_path):
    """Row c of the run's last grid is `sample.py --label c` with the run's --sample-steps (2) and
    --cfg-scale (3, sample.py's default too) at sample.py's default seed, wherever c stands in --label."""
    run = tiny_run[0]
    classes = train.load_checkpoint(run)["classes"]
    grid = png_pixels(run / "samples" / "step_0000080_raw.png").int()  # 8 rows of 8 images of 16 px, 1 px apart
    run_sample(run, tmp_path, "--label", "5", "0", "--num", "8", "--steps", "2", "--device", "cpu")
    for c in (5, 0):
        for j in range(8):
            ours = tile(grid, c, j)
            theirs = png_pixels(tmp_path / f"{classes[c]}_{j:03d}.png").int()
            # One level of slack: a matmul may round differently at another batch size.
            assert (ours - theirs).abs().max() <= 1, (c, j)
    assert (tile(grid, 0, 0) - tile(grid, 5, 0)).abs().max() > 50  # not one blank image


def test_same_seed_same_images_other_label_other_images(tiny_run, tmp_path):
    a = run_sample(tiny_run[0], tmp_path / "a", "--label", "2", "--seed", "7")
    b = run_sample(tiny_run[0], tmp_path / "b", "--label", "2", "--seed", "7")
    c = run_sample(tiny_run[0], tmp_path / "c", "--label", "5", "--seed", "7")
    assert torch.equal(a, b)
    # Another label moves each pixel by 0.071 on average (against 0.25 for another seed); the old
    # bound, max > 1e-3 over all pixels, also passed a model whose labels barely matter.
    assert (a - c).abs().mean() > 0.02


def test_images_do_not_depend_on_the_batch_size(tiny_run):
    model, diffusion, _ = sample.load_model(tiny_run[0], torch.device("cpu"))
    seen = []  # the batch each network call sees (guidance may double it)
    model.x_embedder.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    one_go, _ = sample.generate(model, diffusion, torch.tensor([1, 4]), SampleConfig(num=3, steps=3, seed=5), torch.device("cpu"))
    assert max(seen) > 2 * 4
    seen.clear()
    batched, _ = sample.generate(model, diffusion, torch.tensor([1, 4]), SampleConfig(num=3, steps=3, seed=5, batch_size=4),
                                 torch.device("cpu"))
    assert max(seen) <= 2 * 4
    torch.testing.assert_close(batched, one_go, rtol=0, atol=1e-6)


def test_cfg_scale_one_is_the_conditional_model(tiny_run):
    model, diffusion, _ = sample.load_model(tiny_run[0], torch.device("cpu"))
    cfg = SampleConfig(num=2, steps=4, cfg_scale=1.0, seed=3)
    ours, _ = sample.generate(model, diffusion, torch.tensor([1]), cfg, torch.device("cpu"))
    y = torch.tensor([1, 1])
    noise = torch.stack([dit.initial_noise(3, 1, i, (3, 16, 16)) for i in range(2)])
    ref = diffusion.sample(lambda x, t: model(x, t, y), noise, steps=4)
    torch.testing.assert_close(ours, (ref.clamp(-1, 1) + 1) / 2)
    guided, _ = sample.generate(model, diffusion, torch.tensor([1]), SampleConfig(num=2, steps=4, cfg_scale=4.0, seed=3),
                                torch.device("cpu"))
    assert (guided - ours).abs().mean() > 0.01  # 0.031 measured


def test_sample_draws_with_the_ema_weights(tiny_run, tmp_path):
    state = train.load_checkpoint(tiny_run[0])
    raw_zeroed = {**state, "model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}
    torch.save(raw_zeroed, tmp_path / "raw_zeroed.pt")
    a = run_sample(tiny_run[0], tmp_path / "a", "--label", "1", "--num", "1", "--steps", "2")
    b = run_sample(tmp_path / "raw_zeroed.pt", tmp_path / "b", "--label", "1", "--num", "1", "--steps", "2")
    assert torch.equal(a, b)  # the raw weights play no part (zeroed, they would draw flat grey)
    assert a.std() > 0.1


def test_sample_main_passes_the_sampler_and_eta_on(tiny_run, tmp_path):
    """DDIM at eta 1 is DDPM (Song et al. 2021), respaced too, drawing the same z: so --sampler
    ddpm must give what --eta 1 gives, and both differ from the default deterministic DDIM."""
    common = ("--label", "3", "--num", "1", "--steps", "3", "--seed", "2")
    ddpm = run_sample(tiny_run[0], tmp_path / "ddpm", *common, "--sampler", "ddpm")
    eta1 = run_sample(tiny_run[0], tmp_path / "eta1", *common, "--eta", "1")
    ddim = run_sample(tiny_run[0], tmp_path / "ddim", *common)
    # Equal formulas evaluated differently in float32 (the posterior vs DDIM's sigma): 6e-5 apart.
    torch.testing.assert_close(ddpm, eta1, atol=2e-4, rtol=0)
    assert (ddpm - ddim).abs().mean() > 0.04  # 0.12 measured


def test_sample_precision_has_train_py_meaning(tiny_run, tmp_path):
    draw = {p: run_sample(tiny_run[0], tmp_path / p, "--label", "1", "--precision", p, "--device", "cpu")
            for p in ("auto", "fp32", "bf16")}
    assert torch.equal(draw["auto"], draw["fp32"])  # auto on a CPU: fp32, as in train.py
    assert 1e-4 < (draw["bf16"] - draw["fp32"]).abs().max() < 0.05  # autocast on, and still the same images
    assert train.use_bf16(SampleConfig(precision="auto"), torch.device("cuda"))
    with pytest.raises(SystemExit, match="argument --precision: invalid choice: 'fp16'"):
        run_sample(tiny_run[0], tmp_path, "--precision", "fp16")


def test_ckpt_may_name_the_checkpoints_folder(tiny_run, tmp_path):
    a = run_sample(tiny_run[0], tmp_path / "a", "--label", "1")
    b = run_sample(tiny_run[0] / "checkpoints", tmp_path / "b", "--label", "1")
    assert torch.equal(a, b)


def test_sample_errors_are_clear(tiny_run, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"unknown label 'dragon'; valid labels: 0 \(circle\), 1 \(cross\)"):
        run_sample(tiny_run[0], tmp_path, "--label", "dragon")
    with pytest.raises(SystemExit, match="run `python train.py` first"):
        run_sample(tmp_path / "no_run", tmp_path)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="broken.pt is not a checkpoint of this project"):
        run_sample(broken, tmp_path)
    for bad, expected in ((["--num", "0"], ">= 1"), (["--zoom", "0"], r"in \[1, 64\]")):
        with pytest.raises(SystemExit, match=f"argument {bad[0]}: expected an integer {expected}"):
            run_sample(tiny_run[0], tmp_path, *bad)
    with pytest.raises(SystemExit, match=r"argument --steps: expected an integer in \[1, 1000\] \(the trained"):
        run_sample(tiny_run[0], tmp_path, "--steps", "1001")
    # --out is checked before any sampling, not after it.
    taken = tmp_path / "taken.png"
    taken.write_text("a file")
    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: pytest.fail("sampled before checking --out"))
    with pytest.raises(SystemExit, match=f"--out {taken} is a file"):
        run_sample(tiny_run[0], taken)


def test_prompt_on_a_class_run_is_a_clear_error(tiny_run, tmp_path):
    with pytest.raises(SystemExit, match=r"--prompt is for runs trained on captions \(train.py --preset text\)"):
        run_sample(tiny_run[0], tmp_path, "--prompt", "a red star")


# -----------------------------------------------------------------------------
# assets/evaluate.py: the distribution figures
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--cfg-colour-scale", "-1"], "argument --cfg-colour-scale: expected a number >= 0, got '-1'"),
    (["--cfg-scale", "nan"], "argument --cfg-scale: expected a number >= 0, got 'nan'"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--cfg-interval", "-5", "100"], "argument --cfg-interval: expected a number in [0, 1000], got '-5'"),
    (["--cfg-interval", "600", "100"], "argument --cfg-interval: expected LO < HI, got 600 100"),
])
def test_evaluate_checks_its_sampling_flags_as_sample_py_does(argv, message, capsys):
    """Before anything is loaded: --ckpt names no run here, and the flag is the first error."""
    with pytest.raises(SystemExit) as caught:
        evaluate.main(["--ckpt", "no/such/run", *argv])
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 5, generator=gen, dtype=torch.float64)
    assert abs(evaluate.frechet_distance(a, a)) < 1e-9
    # A shift moves only the mean term: FD = |c|^2 exactly, whatever the covariance.
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert evaluate.frechet_distance(a, a + c) == pytest.approx(c.square().sum().item(), abs=1e-8)
    # Diagonal covariances: Tr(Sa + Sb - 2 (Sa Sb)^1/2) = sum (sd_a - sd_b)^2; a scale of each
    # coordinate keeps the samples' correlations, so the closed form holds for the sample covariance.
    s = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    sd = a.std(0)
    expected = ((sd - s * sd) ** 2).sum().item()
    assert evaluate.frechet_distance(a, a * s) == pytest.approx(expected, rel=1e-3)


def test_palette_colours_finds_each_drawn_colour():
    import random
    from torchvision.transforms.functional import pil_to_tensor
    images, truth = [], []
    for i in range(24):
        rng = random.Random(i)
        state = rng.getstate()
        colour = rng.choice(dataset.PALETTE)  # draw_shape's first draw is the foreground colour
        rng.setstate(state)
        image = dataset.draw_shape(dataset.SHAPES[i % 8], 32, rng)
        images.append(pil_to_tensor(image).float() / 255)
        truth.append(dataset.PALETTE.index(colour))
    found = evaluate.palette_colours(torch.stack(images))
    assert found.tolist() == truth
    hist = evaluate.colour_histogram(torch.stack(images))
    assert hist.sum().item() == pytest.approx(1.0) and len(hist) == len(dataset.PALETTE)
    assert evaluate.total_variation(hist, hist) == 0
    assert evaluate.total_variation(torch.tensor([1.0, 0]), torch.tensor([0, 1.0])) == 1


def test_one_colour_tells_a_painted_shape_from_a_patchwork():
    """A drawn shape is one colour; the same shape with its left half repainted in another palette
    colour is not (palette_colours would give it one colour: that of its mean)."""
    import random
    from torchvision.transforms.functional import pil_to_tensor
    shapes = torch.stack([pil_to_tensor(dataset.draw_shape(name, 32, random.Random(i), colour=i % 6)).float() / 255
                          for i, name in enumerate(dataset.SHAPES)])                   # (8, 3, 32, 32)
    assert evaluate.one_colour(shapes).all()
    patchwork = shapes.clone()
    lit = patchwork[:, :, :, :16].amax(1, keepdim=True) > 0.25                          # (8, 1, 32, 16)
    other = torch.tensor(dataset.PALETTE[3], dtype=torch.float32)[:, None, None] / 255  # green
    patchwork[:, :, :, :16] = torch.where(lit, other, patchwork[:, :, :, :16])
    assert not evaluate.one_colour(patchwork[[0, 1, 2, 4, 5]]).any()  # palette colours other than green


def test_per_shape_spread_sees_what_pooling_hides():
    """Data whose shape k comes in colours 2k and 2k+1 alone: samples that give every shape all six
    colours match the pooled colours exactly, yet per shape they are 2/3 off; samples drawn from
    each shape's own colours are near the counting floor; a shape with no real image is NaN."""
    real_shapes = torch.arange(3).repeat_interleave(100)                         # (300,)
    real_colours = 2 * real_shapes + torch.arange(2).repeat(150)                 # (300,) shape k: 2k, 2k+1
    everywhere = torch.arange(6).repeat(3, 8)                                    # (3, 48)
    pooled = torch.bincount(everywhere.flatten(), minlength=6) / everywhere.numel()
    assert evaluate.total_variation(pooled, torch.bincount(real_colours, minlength=6) / 300) == 0
    draws = torch.Generator().manual_seed(0)
    tvs, floor = evaluate.per_shape_tv(everywhere, real_colours, real_shapes, draws)
    assert tvs.tolist() == pytest.approx([2 / 3] * 3) and 0.02 < floor < 0.2
    own = 2 * torch.arange(3)[:, None] + torch.randint(0, 2, (3, 48), generator=draws)  # (3, 48)
    tvs, _ = evaluate.per_shape_tv(own, real_colours, real_shapes, draws)
    assert tvs.max() < 0.25
    tvs, _ = evaluate.per_shape_tv(own, real_colours, torch.where(real_shapes == 2, 0, real_shapes), draws)
    assert tvs[2].isnan() and not tvs[:2].isnan().any()


def test_real_reference_sets_are_disjoint_balanced_and_held_out_first(tmp_path):
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(20):
            Image.new("RGB", (4, 4), (10 * i, 100 * c, 0)).save(tmp_path / f"c{c}" / f"{i}.png")
    data = ImageFolder(tmp_path, 4)
    a, b, borrowed = evaluate.real_reference(data, 3)
    assert a.shape == b.shape == (6, 3, 4, 4)
    keys = lambda s: {tuple(x.flatten().tolist()) for x in s}  # noqa: E731  (every image differs)
    assert not keys(a) & keys(b)
    held, _ = evaluate.split(len(data))
    assert borrowed == sum(max(0, 6 - sum(data.labels[i] == c for i in held.tolist())) for c in range(2))
    with pytest.raises(ValueError, match="has 20 images; the real reference needs 22"):
        evaluate.real_reference(data, 11)


# -----------------------------------------------------------------------------
# assets/gpu_check.sh: the prepared GPU check, dry-run on the CPU
# -----------------------------------------------------------------------------

def test_gpu_check_runs_every_stage_at_toy_sizes_on_the_cpu(tmp_path):
    # A GPU session is short and rare, so its one command must work the first time: every stage
    # runs here at toy sizes through the same code (the kernel interpreted), passes its checks,
    # and leaves its result within what a device run returns (8 plain files, simple names).
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "assets/gpu_check.sh", "--cpu-smoke", str(out)], cwd=Path(__file__).parent,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text().splitlines()
    stages = {line[0]: line for line in summary if line[:2] in ("a ", "b ", "c ", "d ", "e ")}
    results = {"a": "a_kernel.txt", "b": "b_step.txt", "c": "c_attention.md", "d": "d_train.md",
               "e": "e_preset.txt"}
    assert sorted(stages) == sorted(results)
    for letter, name in results.items():
        assert stages[letter].startswith(f"{letter} ok |") and f"| {name} |" in stages[letter]
    for name in ("a_kernel.txt", "b_step.txt", "e_preset.txt"):  # each check said so itself
        assert (out / name).read_text().splitlines()[-1] == "RESULT: ok", name
    kernel = (out / "a_kernel.txt").read_text()
    shapes = 3 + ("takes none yet" not in kernel)  # self, fused qkv, cross; key lengths once the kernel takes them
    assert " 0 failed," in kernel and kernel.count("| ok (tolerance") == shapes
    assert "| toy | B=1 H=2 N=33 D=72 | ours (Triton) |" in (out / "c_attention.md").read_text()
    assert (out / "d_train.md").read_text().count("| DiT-Mi/2 |") == 2  # batch 2, then the doubled batch
    assert Image.open(out / "e_grid.png").width >= 512  # the enlarged sample grid
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.parent == out for p in files)
    assert all(c.isalnum() or c in "._-" for p in files for c in p.name)


# -----------------------------------------------------------------------------
# assets/prepare_cifar10.py: CIFAR-10 as class folders
# -----------------------------------------------------------------------------

def test_prepare_cifar10_writes_class_folders_from_the_official_format(tmp_path, capsys):
    import pickle
    import numpy as np
    import prepare_cifar10
    source = tmp_path / "cifar-10-batches-py"
    source.mkdir()
    names = [b"airplane", b"automobile", b"bird"]
    with open(source / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    rng = np.random.default_rng(0)
    batches = []
    for file in [f"data_batch_{i}" for i in range(1, 6)]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": rng.integers(0, 3, 2).tolist()}
        batches.append(batch)
        with open(source / file, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    out = tmp_path / "cifar"
    prepare_cifar10.main([str(out), "--from", str(source)])
    written = sorted(out.glob("*/*.png"))
    assert len(written) == 10 and {p.parent.name for p in written} <= {n.decode() for n in names}
    # Image 3 is the second image of data_batch_2: channel-major rows of 1024 values, R then G then B.
    third = batches[1]
    path = out / names[third[b"labels"][1]].decode() / "train_00003.png"
    expected = third[b"data"][1].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(Image.open(path)), expected)
    assert ImageFolder(out, 32).classes == sorted({p.parent.name for p in written})  # train.py can read it

    # A tampered batch is refused without running anything, and nothing is written.
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))
    (tmp_path / "victim").mkdir()
    with open(source / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=2)
    with pytest.raises(SystemExit, match=r"data_batch_3 is not a CIFAR-10 batch \(it asks to load shutil.rmtree"):
        prepare_cifar10.main([str(tmp_path / "again"), "--from", str(source)])
    assert (tmp_path / "victim").is_dir() and not (tmp_path / "again").exists()
    with pytest.raises(SystemExit) as stop:
        prepare_cifar10.main([str(out), "--from", str(source)])
    assert stop.value.code == 2 and "already exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot read .*nowhere/batches.meta"):
        prepare_cifar10.main([str(tmp_path / "third"), "--from", str(tmp_path / "nowhere")])
