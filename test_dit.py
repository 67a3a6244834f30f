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

import math

import pytest
import torch.nn as nn

import dit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


@pytest.mark.parametrize("name,count", [
    ("DiT-S/2", 32_963_360), ("DiT-B/2", 130_512_416), ("DiT-XL/2", 675_129_632)])
def test_parameter_count_matches_paper(name, count):
    with torch.device("meta"):  # no memory, no initialisation cost
        model = dit.DiT_models[name](input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert sum(p.numel() for p in model.parameters()) == count


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
    np = pytest.importorskip("numpy")
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


def test_attention_layout_matches_torch_multihead_attention():
    """Fused q;k;v with heads split as reshape(B, N, 3, H, D) is exactly nn.MultiheadAttention's layout."""
    torch.manual_seed(0)
    ours = dit.Attention(32, 4, backend="math")
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(3, 10, 32)
    assert torch.allclose(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-5)


# -----------------------------------------------------------------------------
# Model: adaLN-Zero initialisation and guidance
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
    # and not because the model ignores its input: one optimizer step makes it depend on x
    assert model.final_layer.linear.weight.abs().sum() == 0


def test_forward_with_cfg_is_the_guided_mix():
    torch.manual_seed(0)
    model = randomize(tiny_model(learn_sigma=True)).eval()
    x = torch.randn(3, 3, 8, 8)
    t, y = torch.tensor([5, 50, 500]), torch.tensor([0, 2, 4])
    null = torch.full_like(y, model.num_classes)
    cond, uncond = model(x, t, y), model(x, t, null)
    scale = 3.5
    out = model.forward_with_cfg(torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]), torch.cat([y, null]), scale)
    guided = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
    assert torch.allclose(out[:3, :3], guided, atol=1e-5)
    assert torch.allclose(out[3:, :3], guided, atol=1e-5)
    assert torch.allclose(out[:3, 3:], cond[:, 3:], atol=1e-6)    # variance channels pass through
    assert torch.allclose(out[3:, 3:], uncond[:, 3:], atol=1e-6)
    # scale 1 is the purely conditional model
    fn = dit.guided_model_fn(model, y, 1.0)
    assert torch.equal(fn(x, t), cond)
    fn = dit.guided_model_fn(model, y, scale)
    assert torch.allclose(fn(x, t)[:, :3], guided, atol=1e-5)


def test_label_dropout_uses_null_class_only_in_training():
    model = tiny_model(class_dropout_prob=1.0)
    emb = model.y_embedder
    y = torch.tensor([0, 1, 2])
    assert torch.equal(emb(y, train=True), emb.embedding_table.weight[[5, 5, 5]])
    assert torch.equal(emb(y, train=False), emb.embedding_table.weight[[0, 1, 2]])
    assert tiny_model(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 5


# -----------------------------------------------------------------------------
# Model: attention backends and gradient checkpointing
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
    assert outputs["math"].abs().max() > 1e-2
    torch.testing.assert_close(outputs["sdpa"], outputs["math"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs["triton"], outputs["math"], atol=1e-4, rtol=1e-3)


def test_auto_backend_is_sdpa_on_cpu():
    q = k = v = torch.randn(1, 2, 5, 16)
    assert torch.equal(dit.attention(q, k, v, "auto"), torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = randomize(tiny_model(grad_checkpointing=checkpointing, class_dropout_prob=0.0))
        model(x, t, y).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0]["blocks.0.attn.qkv.weight"].abs().sum() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# Diffusion process
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


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_targets_recover_x0_and_eps(prediction):
    d = dit.GaussianDiffusion(prediction=prediction, schedule="cosine")
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([10, 900])
    x_t = d.q_sample(x0, t, eps)
    abar = d._at(d.alphas_cumprod, t)
    pred = eps if prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    got_x0, got_eps = d.predict_x0_eps(pred, x_t, abar)
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


def test_min_snr_weights():
    d = dit.GaussianDiffusion(prediction="eps", loss_weighting="min_snr", learn_sigma=False)
    x0 = torch.zeros(2, 1, 2, 2)
    t = torch.tensor([0, 999])
    model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731  mse = mean(eps^2)
    noise = torch.ones_like(x0)
    losses = d.training_losses(model, x0, t, None, noise=noise)
    snr = d.alphas_cumprod[[0, 999]] / (1 - d.alphas_cumprod[[0, 999]])
    torch.testing.assert_close(losses["loss"], (snr.clamp(max=5) / snr).float())


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
    assert (deterministic - samples[0]).abs().max() > 1e-2


def test_respaced_sampler_visits_evenly_spaced_timesteps():
    d = dit.GaussianDiffusion(learn_sigma=False)
    seen = []
    d.sample(lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x), torch.randn(1, 3, 2, 2), steps=5)
    assert seen == [999, 749, 500, 250, 0]


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = dit.DiT_models["DiT-Mi/2"](input_size=8, in_channels=3, num_classes=2, learn_sigma=True,
                                       class_dropout_prob=0.0)
    d = dit.GaussianDiffusion(learn_sigma=True)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise, t, y = torch.randn_like(x0), torch.tensor([100, 300, 600, 900]), torch.tensor([0, 1, 0, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = d.training_losses(model, x0, t, y, noise=noise)["mse"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < first / 5, (first, loss.item())
