"""
DiT: a Diffusion Transformer and the diffusion process it is trained with, in one file.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023), arXiv:2212.09748.
A DiT is a plain Vision Transformer that denoises: the noisy image is cut into patches (tokens),
the timestep t and the class label y are embedded, and every block is conditioned on them, in one
of the paper's four ways (Sec. 3.2, Table 4). A final layer turns tokens back into patches.

Read it top to bottom: attention -> embedders -> the block -> DiT, whose `condition` is the one place
where (t, y) becomes what the blocks see -> presets -> diffusion and flow matching, behind one interface
-> guidance and `draw` -> the text model, a DiT that overrides `condition` -> appendix: attention "auto".
With conditioning="adaln-zero" the state dict has the reference layout (facebookresearch/DiT):
its released checkpoints load strict. torch only: no timm, no numpy.

    python -c "import dit, torch; m = dit.DiT_models['DiT-S/2'](); print(m(torch.randn(1, 4, 32, 32), torch.tensor([10]), torch.tensor([3])).shape)"
"""

import functools
import hashlib
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.flop_counter import FlopCounterMode

ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "math")
CONDITIONINGS = ("adaln-zero", "adaln", "cross-attn", "in-context")


# -----------------------------------------------------------------------------
# Attention: softmax(Q K^T / sqrt(d)) V, three ways
# -----------------------------------------------------------------------------

def attention(q, k, v, backend="auto", key_lengths=None):
    """Non-causal attention: q (B, H, N, D) attends to k, v (B, H, M, D) -> (B, H, N, D); "auto": our Triton kernel
    on a GPU, else SDPA (appendix). key_lengths (B,), optional: sample b attends to its first key_lengths[b] keys."""
    if backend == "auto":
        backend = "triton" if _auto_uses_triton(q, k, v, key_lengths) else "sdpa"
    if backend == "triton":  # the kernel takes the lengths themselves (and checks them)
        kernel = _flash_attention()  # plain calls stay kernel(q, k, v)
        return kernel(q, k, v) if key_lengths is None else kernel(q, k, v, key_lengths=key_lengths)
    mask = None
    if key_lengths is not None:  # SDPA and "math" take a boolean mask, True where a key is attended to
        check_key_lengths(key_lengths, q, k)
        mask = (torch.arange(k.shape[2], device=k.device) < key_lengths[:, None])[:, None, None, :]  # (B, 1, 1, M)
    if backend == "math":
        # Written out for readers: the (N, M) scores are materialised (FlashAttention avoids that). Softmax in
        # fp32 keeps bf16/fp16 runs stable.
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, M)
        if mask is not None:  # padding keys score -inf: exp(-inf) = 0, no weight
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.float().softmax(dim=-1).to(v.dtype) @ v     # (B, H, N, D)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS}")


def check_key_lengths(key_lengths, q, k):
    """Key lengths: an integer tensor (B,) on q's device, each in [1, M]. Values are read on the host only:
    on a GPU a read would make each call wait, and the model's lengths are made on the host (CaptionEncoder)."""
    B, M = q.shape[0], k.shape[2]
    what = key_lengths.dtype if isinstance(key_lengths, torch.Tensor) else type(key_lengths).__name__
    if what not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise ValueError(f"key_lengths must be an integer tensor, not {what}")
    if key_lengths.shape != (B,):
        raise ValueError(f"key_lengths must have shape (B,) = ({B},), one length per sample; "
                         f"got {tuple(key_lengths.shape)}")
    if key_lengths.device != q.device:
        raise ValueError(f"key_lengths must be on q's device {q.device}, not {key_lengths.device}")
    if B > 0 and key_lengths.device.type == "cpu":
        shortest, longest = int(key_lengths.min()), int(key_lengths.max())
        if shortest < 1 or longest > M:
            raise ValueError(f"key_lengths must be in [1, M] = [1, {M}]; got values in [{shortest}, "
                             f"{longest}] (a length of 0 masks every key: that softmax row is 0 / 0 = NaN)")


class Attention(nn.Module):
    """Multi-head self-attention with a fused q;k;v projection (the ViT/timm layout)."""

    def __init__(self, dim, num_heads, backend="auto"):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by {num_heads} heads"
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_lengths=None):
        """key_lengths (B,), optional: tokens past a sample's length are padding, attended to by none."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)  # (B, N, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                         # 3 x (B, H, N, D)
        x = attention(q, k, v, self.backend, key_lengths)                      # (B, H, N, D)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))                   # (B, N, C)


class CrossAttention(nn.Module):
    """Multi-head attention from N query tokens to M key/value tokens: the image's read the condition's."""

    def __init__(self, dim, num_heads, backend="auto"):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, key_lengths=None):
        """key_lengths (B,), optional: context tokens past a sample's length are padding: no weight."""
        (B, N, C), M, H = x.shape, context.shape[1], self.num_heads
        q = self.q(x).reshape(B, N, H, C // H).transpose(1, 2)                       # (B, H, N, D)
        kv = self.kv(context).reshape(B, M, 2, H, C // H)                            # (B, M, 2, H, D)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)                                  # 2 x (B, H, M, D)
        x = attention(q, k, v, self.backend, key_lengths)                            # (B, H, N, D)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))                         # (B, N, C)


class Mlp(nn.Module):
    """Two-layer feed-forward network; GELU with the tanh approximation, as in the reference."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# -----------------------------------------------------------------------------
# Embedding layers: patches, timesteps, class labels, and the 2-D sin-cos positions
# -----------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Patchify: a p x p convolution with stride p is a Linear applied to each flattened patch."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, H/p, W/p) -> (N, T, D), T = (H/p) * (W/p)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of (possibly fractional) timesteps, cos half first then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # (dim/2,)
    args = t.float()[:, None] * freqs[None]                                                  # (N, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                              # (N, dim)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t -> 256 sinusoidal frequencies -> MLP -> (N, D)."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))           # (N, D)


class LabelEmbedder(nn.Module):
    """Class label -> (N, D). Row num_classes is the "null" label of classifier-free guidance: in training a
    label becomes it with probability dropout_prob, so the network also learns the unconditional model."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)  # + the null label's row
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)  # (N, D)


def sincos_pos_embed_1d(dim, pos):
    """(M,) positions -> (M, dim): sin of dim/2 geometric frequencies, then cos (as in MAE)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    out = pos.double()[:, None] * omega[None]                                         # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)                         # (M, dim)


def sincos_pos_embed_2d(dim, grid_size):
    """(grid_size**2, dim): half the channels encode the column, half the row (row-major tokens)."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")    # (G, G) each
    return torch.cat([sincos_pos_embed_1d(dim // 2, cols.flatten()),
                      sincos_pos_embed_1d(dim // 2, rows.flatten())], dim=1).float()  # (G*G, dim)


# -----------------------------------------------------------------------------
# The block, in the paper's four conditioning designs, and the final layer
# -----------------------------------------------------------------------------

def modulate(x, shift, scale):
    """Adaptive LayerNorm's affine part: x (N, T, D), shift and scale (N, D); None: x unchanged."""
    return x if shift is None else x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated(x, gate):
    """adaLN-Zero's gate on a residual branch: (N, T, D) times (N, D); None: no gate."""
    return x if gate is None else gate.unsqueeze(1) * x


class DiTBlock(nn.Module):
    """A pre-norm transformer block (self-attention, then an MLP), conditioned in one of the
    paper's four ways (Sec. 3.2, Fig. 3):
    "adaln-zero": c = t + y regresses six vectors, shift and scale for each LayerNorm (which has no
        weights of its own) and a gate on each residual branch, zero at first: the block is the identity.
    "adaln":      the same without the gates: four vectors, ordinary initialisation.
    "cross-attn": a standard ViT block plus cross-attention from the image tokens to [t; y].
    "in-context": a standard ViT block; t and y travel through it as two extra tokens of x.
    cross_attention=True adds that cross-attention to an adaLN block: PixArt-alpha's, whose image reads a caption."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_backend="auto",
                 conditioning="adaln-zero", cross_attention=False):
        super().__init__()
        self.conditioning = conditioning
        adaptive = conditioning in ("adaln-zero", "adaln")  # c supplies the norms' scale and shift
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, backend=attn_backend)
        cross = cross_attention or conditioning == "cross-attn"
        self.cross_attn = CrossAttention(hidden_size, num_heads, backend=attn_backend) if cross else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        if adaptive:
            num_vectors = 6 if conditioning == "adaln-zero" else 4
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_vectors * hidden_size))

    def forward(self, x, c=None, context=None, context_lengths=None):
        """x: (N, T, D) tokens, returned as (N, T, D). c: (N, D) for the adaLN designs, else None. context:
        (N, M, D) tokens to cross-attend to ([t; y], or a caption), of which context_lengths (N,) are real."""
        shift1 = scale1 = gate1 = shift2 = scale2 = gate2 = None  # "cross-attn", "in-context"
        if self.conditioning == "adaln-zero":
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        elif self.conditioning == "adaln":
            shift1, scale1, shift2, scale2 = self.adaLN_modulation(c).chunk(4, dim=1)                # 4 x (N, D)
        x = x + gated(self.attn(modulate(self.norm1(x), shift1, scale1)), gate1)      # (N, T, D)
        if self.cross_attn is not None:  # the image tokens read the context
            x = x + self.cross_attn(x, context, context_lengths)                      # (N, T, D)
        return x + gated(self.mlp(modulate(self.norm2(x), shift2, scale2)), gate2)    # (N, T, D)


class FinalLayer(nn.Module):
    """LayerNorm, then a Linear from each token to its p*p*C_out patch values. Adaptive where the
    blocks are (shift and scale from c, no gate), a plain LayerNorm in the other two designs."""

    def __init__(self, hidden_size, patch_size, out_channels, adaptive=True):
        super().__init__()
        self.adaptive = adaptive
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        x = self.norm_final(x)                                       # (N, T, D)
        if self.adaptive:
            x = modulate(x, *self.adaLN_modulation(c).chunk(2, dim=1))  # shift, scale: 2 x (N, D)
        return self.linear(x)                                        # (N, T, p*p*C_out)


def init_linear(module):
    """Xavier-uniform weights and zero biases for every Linear: the reference's basic init."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone; argument names as in the paper's code, plus ours (keyword only):
    conditioning and cross_attention (DiTBlock), attn_backend (attention()), grad_checkpointing (recompute each
    block in the backward). y is a class label: a subclass overrides `condition` and the three methods after it."""

    conditions_on, null_name, dropout_name = "labels", "null label", "label"  # what y is, and guidance's words
    guide_colour = True                          # guidance's default colour scale: cfg_scale (see guided_model_fn)

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 learn_sigma=True, *, conditioning="adaln-zero", attn_backend="auto",
                 grad_checkpointing=False, cross_attention=False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attn_backend!r}; choose from {ATTENTION_BACKENDS}")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}; choose from {CONDITIONINGS}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_heads, self.num_classes, self.learn_sigma = num_heads, num_classes, learn_sigma
        self.conditioning, self.grad_checkpointing = conditioning, grad_checkpointing
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # num_classes None: no labels (a subclass conditions on something else)
        self.y_embedder = None if num_classes is None else LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A parameter (not a buffer) only so that the reference checkpoints load strict; it is frozen.
        self.pos_embed = nn.Parameter(torch.zeros(1, (input_size // patch_size) ** 2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, attn_backend, conditioning,
                                              cross_attention) for _ in range(depth)])
        adaptive = conditioning in ("adaln-zero", "adaln")
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive)
        self.initialize_weights()

    def initialize_weights(self):
        self.apply(init_linear)
        grid_size = self.input_size // self.patch_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid_size)[None])
        # The patchify convolution is a Linear on flattened patches: initialise it like one.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Every design (not what Table 4 compares): a zero output layer, a fresh model predicts 0. adaLN-Zero:
        # zero gates make every block the identity (the paper's Fig. 5: it trains best), and the final shift
        # and scale and a cross-attention's output (PixArt-alpha) start at zero too. Plain adaLN: Xavier.
        zeroed = [self.final_layer.linear]
        if self.conditioning == "adaln-zero":
            zeroed.append(self.final_layer.adaLN_modulation[-1])
            for block in self.blocks:
                zeroed += [block.adaLN_modulation[-1]] + ([block.cross_attn.proj] if block.cross_attn else [])
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # --- the conditioning hook -------------------------------------------------

    def condition(self, t, y):
        """(t, y) -> (c, tokens, lengths), each None where unused: c (N, D) sets the adaLN norms and gates; tokens
        (N, M, D) are cross-attended to or join x (in-context); lengths (N,): how many count. Label dropout here."""
        t, y = self.t_embedder(t), self.y_embedder(y, self.training)  # (N, D) each
        if self.conditioning in ("adaln-zero", "adaln"):
            return t + y, None, None                                  # one vector for every LayerNorm
        return None, torch.stack([t, y], dim=1), None                 # (N, 2, D): two tokens

    def null_condition(self, y):
        """What guidance extrapolates from: the null label, or None if never learned (no dropout)."""
        return torch.full_like(y, self.num_classes) if self.y_embedder.dropout_prob > 0 else None

    def conditions(self, names):
        """A sample grid's rows as y: class names (every class, in order) -> indices (L,)."""
        return torch.arange(len(names))

    def condition_keys(self, y):
        """One plain value per condition of y, for seeding each sample's x_T (see draw)."""
        return y.tolist()

    # --- the forward pass --------------------------------------------------------

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W); the inverse of PatchEmbed's token order."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        """x: (N, C, H, W) noisy images or latents, t: (N,) timesteps, y: (N,) class labels."""
        x = self.x_embedder(x) + self.pos_embed                       # (N, T, D), T = H * W / p ** 2
        T = x.shape[1]
        c, tokens, lengths = self.condition(t, y)
        if self.conditioning == "in-context":  # two more tokens, like ViT's class token
            x, tokens = torch.cat([x, tokens], dim=1), None           # (N, T + 2, D)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, tokens, lengths, use_reentrant=False)
            else:
                x = block(x, c, tokens, lengths)                      # (N, T, D) or (N, T + 2, D)
        x = self.final_layer(x[:, :T], c)                             # (N, T, p * p * C_out): in-context tokens dropped
        return self.unpatchify(x)                                     # (N, C_out, H, W)


# -----------------------------------------------------------------------------
# Presets: the paper's twelve (Table 1), plus small ones of ours, and the paper's way to count cost
# -----------------------------------------------------------------------------

# (depth, hidden_size, num_heads) of each size, with patch sizes 2, 4 and 8 ("DiT-XL/2" and so on).
# "Ti" (tiny) trains on a laptop CPU in minutes; "Mi" (micro) is for the tests.
DiT_sizes = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
             "Ti": (6, 192, 3), "Mi": (2, 64, 2)}
DiT_configs = {f"DiT-{size}/{p}": (*dims, p) for size, dims in DiT_sizes.items() for p in (2, 4, 8)}
DiT_models = {name: functools.partial(DiT, depth=d, hidden_size=h, num_heads=n, patch_size=p)
              for name, (d, h, n, p) in DiT_configs.items()}


def forward_gmacs(model):
    """Forward GMACs of one image, as the paper counts "Gflops" (Tables 1, 4): every matrix product, plus one per
    LayerNorm element. Cheap on the meta device; attention runs as "math": the counter cannot see into a kernel."""
    p = model.pos_embed
    x = torch.zeros(1, model.in_channels, model.input_size, model.input_size, device=p.device, dtype=p.dtype)
    t = torch.zeros(1, dtype=torch.long, device=p.device)
    y = model.conditions(["a red star"])  # on the host: class 0, or a short caption (see CaptionEncoder)
    norm_elements = []
    hooks = [m.register_forward_hook(lambda m, inputs, out: norm_elements.append(out.numel()))
             for m in model.modules() if isinstance(m, nn.LayerNorm)]
    backends = {m: m.backend for m in model.modules() if isinstance(m, (Attention, CrossAttention))}
    try:
        for m in backends:
            m.backend = "math"
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, t, y)
    finally:
        for hook in hooks:
            hook.remove()
        for m, backend in backends.items():
            m.backend = backend
    return (counter.get_total_flops() / 2 + sum(norm_elements)) / 1e9


# -----------------------------------------------------------------------------
# Gaussian diffusion: the forward process, the training loss, and two samplers
#
# The paper's recipe (DiT Sec. 3.1, after ADM) is GaussianDiffusion's defaults and `--preset paper`: predict
# eps, linear betas, learned sigma, uniform weights. The default "cpu" preset predicts x_0 with cosine betas
# shifted for 32 px, min-SNR weights and fixed sigma: crisp images in minutes.
# -----------------------------------------------------------------------------

class DiffusionProcess:
    """What the trainer and samplers ask of a noise process: draw_timesteps(n, device) -> (n,) training times;
    training_losses(model, x0, t, y, noise) -> {"loss", "mse", ...} each (N,); denoise_steps(model_fn, noise, steps,
    sampler, eta, clip_denoised, generator) yields (t, x_t, x0_pred) per reverse step; t in [0, num_timesteps)."""

    name = "diffusion"
    num_timesteps = 1000
    samplers = ()  # the names denoise_steps takes, the first the default
    default_steps = 50

    def check_sampler(self, sampler, eta=0.0):
        """A one-line ValueError for a sampler this process does not have (or noise it cannot add)."""
        if sampler not in self.samplers:
            raise ValueError(f"unknown sampler {sampler!r}; choose {' or '.join(map(repr, self.samplers))}")

    def sample(self, model_fn, noise, steps=None, sampler=None, eta=0.0, clip_denoised=True, generator=None):
        """The final x_0 of denoise_steps(), with the same arguments."""
        for _, x, _ in self.denoise_steps(model_fn, noise, steps, sampler, eta, clip_denoised, generator):
            pass
        return x


def make_betas(schedule, num_timesteps, noise_shift=1.0):
    """beta_t for t = 0 .. T-1: DDPM's linear 1e-4..0.02 (scaled for T != 1000), or the cosine schedule of
    Nichol & Dhariwal (2021), which destroys small images less abruptly. noise_shift s divides every SNR
    abar / (1 - abar) by s ** 2 (Hoogeboom et al. 2023): averaging s x s pixels divides the noise's std by s,
    so at s times the resolution the same abar leaves the coarse shape far clearer; the shift undoes that."""
    if schedule == "linear":
        scale = 1000 / num_timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    elif schedule == "cosine":
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose 'linear' or 'cosine'")
    if not noise_shift > 0:
        raise ValueError(f"noise_shift must be > 0, got {noise_shift}")
    if noise_shift == 1:
        return betas
    alpha_bar = torch.cumprod(1 - betas, dim=0)                                  # (T,)
    alpha_bar = alpha_bar / (alpha_bar + (1 - alpha_bar) * noise_shift ** 2)     # SNR / s^2
    alpha_bar_prev = F.pad(alpha_bar[:-1], (1, 0), value=1.0)
    return (1 - alpha_bar / alpha_bar_prev).clamp(max=0.999)


def mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


def distance(name):
    """The per-sample loss (N,) between target and prediction: mean squared or mean absolute error."""
    if name not in ("l2", "l1"):
        raise ValueError(f"unknown loss {name!r}; choose 'l2' or 'l1'")
    return lambda target, pred: mean_flat((target - pred).abs() if name == "l1" else (target - pred) ** 2)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of 8-bit data in [-1, 1], a Gaussian integrated over each pixel's bin: L_0 (Ho et al. 2020, 3.3)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_minus = approx_standard_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_minus = (1 - cdf_minus).clamp(min=1e-12).log()
    log_probs = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_probs))


class GaussianDiffusion(DiffusionProcess):
    """The DDPM process q(x_t | x_0) and what learns and runs its reverse; abar_t = prod_{s<=t} (1 - beta_s).
    prediction: what the network's first in_channels outputs mean: "eps" (the noise; DDPM, DiT), "v" =
        sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022), or "x0" (Li & He 2025): a large pixel
        patch gives a token too few dimensions to carry noise through, but enough for the clean image.
    learn_sigma: the other in_channels outputs interpolate the reverse variance from beta_t to beta~_t (Improved DDPM).
    loss_weighting: "uniform" (the paper), "min_snr" (Hang et al. 2023: min(SNR, gamma) times the x_0
        error, so easy low-noise steps stop dominating) or "min_snr_floor", clamp(SNR, 1, gamma): min-SNR's
        weight vanishes at high noise, where a caption's colour is decided.
    loss: the elementwise distance, "l2" (DDPM) or "l1"; the variational term is the same either way."""

    name = "DDPM"
    samplers = ("ddim", "ddpm")

    def __init__(self, num_timesteps=1000, schedule="linear", prediction="eps",
                 learn_sigma=True, loss_weighting="uniform", min_snr_gamma=5.0, noise_shift=1.0, loss="l2"):
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unknown prediction target {prediction!r}; choose 'eps', 'v' or 'x0'")
        if loss_weighting not in ("uniform", "min_snr", "min_snr_floor"):
            raise ValueError(f"unknown loss weighting {loss_weighting!r}; choose 'uniform', 'min_snr' or "
                             f"'min_snr_floor'")
        self.loss = distance(loss)
        self.num_timesteps = self.default_steps = num_timesteps  # sampling: every step unless asked
        self.prediction, self.learn_sigma = prediction, learn_sigma
        self.loss_weighting, self.min_snr_gamma = loss_weighting, min_snr_gamma
        # Built in float64: a product of 1000 factors near 1 loses digits in float32.
        self.betas = make_betas(schedule, num_timesteps, noise_shift)     # (T,)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)        # (T,) abar_t
        self.alphas_cumprod_prev = F.pad(self.alphas_cumprod[:-1], (1, 0), value=1.0)  # abar_{t-1}
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)  # beta~_t
        # beta~_0 = 0, so its log is clipped to beta~_1 (only its use in the variance interpolation matters).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self._on_device = {}

    def _at(self, schedule, t, ndim=4, dtype=torch.float32):
        """schedule[t], shaped to broadcast over images; copied to a device once (a copy per step stalls a GPU)."""
        key = (id(schedule), t.device)
        if key not in self._on_device:
            self._on_device[key] = schedule.to(t.device)
        return self._on_device[key][t].to(dtype).view(-1, *([1] * (ndim - 1)))

    # --- the forward process -------------------------------------------------

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (Ho et al. 2020, Eq. 4)."""
        abar = self._at(self.alphas_cumprod, t, x0.ndim)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def q_posterior(self, x0, x_t, abar_t, abar_prev):
        """Mean and variance of q(x_prev | x_t, x_0) between any two steps (Eq. 7; a coarser pair: the respaced chain,
        Nichol & Dhariwal 2021). abar_t, abar_prev in float64: at small t, 1 - abar_t / abar_prev cancels float32."""
        beta = 1 - abar_t / abar_prev
        coef_x0 = abar_prev.sqrt() * beta / (1 - abar_t)
        coef_xt = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)
        variance = beta * (1 - abar_prev) / (1 - abar_t)
        return coef_x0.to(x0.dtype) * x0 + coef_xt.to(x_t.dtype) * x_t, variance.to(x_t.dtype)

    # --- reading the network's output ----------------------------------------

    def split_output(self, out):
        """(N, C_out, H, W) -> the prediction (N, C, H, W) and variance channels (or None)."""
        return out.chunk(2, dim=1) if self.learn_sigma else (out, None)

    def predict_x0_eps(self, pred, x_t, abar):
        """The network's prediction -> (x_0, eps): given x_t, each determines the other."""
        if self.prediction == "eps":
            return (x_t - (1 - abar).sqrt() * pred) / abar.sqrt(), pred
        if self.prediction == "x0":
            return pred, (x_t - abar.sqrt() * pred) / (1 - abar).sqrt()
        return abar.sqrt() * x_t - (1 - abar).sqrt() * pred, (1 - abar).sqrt() * x_t + abar.sqrt() * pred  # v

    def model_log_variance(self, var_out, beta, posterior_var):
        """Improved DDPM Eq. 15: log sigma^2 = v log beta + (1 - v) log beta~, with v in [0, 1]."""
        frac = (var_out + 1) / 2
        return frac * beta.log() + (1 - frac) * posterior_var.log()

    # --- training --------------------------------------------------------------

    def draw_timesteps(self, n, device):
        """Uniform integer timesteps, as in DDPM."""
        return torch.randint(0, self.num_timesteps, (n,), device=device)

    def training_losses(self, model, x0, t, y, noise=None):
        """Per-sample losses for a batch: {'loss', 'mse', 'vb'} each of shape (N,)."""
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)                       # (N, C, H, W)
        pred, var_out = self.split_output(model(x_t, t, y))     # (N, C, H, W) each
        abar = self._at(self.alphas_cumprod, t)
        target = {"eps": noise, "x0": x0, "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[self.prediction]
        mse = mean_flat((target - pred.float()) ** 2)           # (N,)
        losses = {"mse": mse, "loss": self.loss(target, pred.float())}  # the loss: (N,), mse for l2
        if self.loss_weighting != "uniform":
            snr = (abar / (1 - abar)).flatten()
            # MSE on eps equals SNR * MSE on x_0, MSE on v equals (SNR + 1) * it; all three are
            # reweighted to min(SNR, gamma) * MSE on x_0 (with the floor: max(that, 1) * it).
            per_x0_mse = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[self.prediction]
            floor = 1.0 if self.loss_weighting == "min_snr_floor" else None
            losses["loss"] = snr.clamp(min=floor, max=self.min_snr_gamma) / per_x0_mse * losses["loss"]
        if self.learn_sigma:
            # The variational-bound term trains only the variance: the mean is detached, so
            # the simple MSE keeps full control over it (Improved DDPM, Sec. 3.1, "L_hybrid").
            losses["vb"] = self.vb_term(pred.detach().float(), var_out.float(), x0, x_t, t)
            losses["loss"] = losses["loss"] + losses["vb"]
        return losses

    def vb_term(self, pred, var_out, x0, x_t, t):
        """L_t (t > 0: KL between true and model posteriors) or L_0 (decoder NLL), in bits/dim."""
        abar64 = self._at(self.alphas_cumprod, t, dtype=torch.float64)
        abar_prev64 = self._at(self.alphas_cumprod_prev, t, dtype=torch.float64)
        true_mean, _ = self.q_posterior(x0, x_t, abar64, abar_prev64)
        true_log_var = self._at(self.posterior_log_variance_clipped, t)
        model_x0, _ = self.predict_x0_eps(pred, x_t, abar64.float())
        model_mean, _ = self.q_posterior(model_x0, x_t, abar64, abar_prev64)
        model_log_var = self.model_log_variance(var_out, self._at(self.betas, t), true_log_var.exp())
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # --- sampling ---------------------------------------------------------------

    def sample_timesteps(self, steps):
        """`steps` timesteps evenly spread over [0, T-1], from the noisiest down to 0."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_timesteps}], got {steps}")
        return torch.linspace(self.num_timesteps - 1, 0, steps).round().long().tolist()

    def denoise_steps(self, model_fn, noise, steps=None, sampler=None, eta=0.0, clip_denoised=True, generator=None):
        """Run the reverse process from x_T = noise, yielding (t, x_t, x0_pred) after each step, the last the sample.
        model_fn(x, t): the network's output at integer t (guidance inside). "ddpm": ancestral sampling with the
        posterior (or learned) variance; "ddim" (default): Song et al. 2021 Eq. 12, deterministic at eta = 0."""
        sampler = sampler or self.samplers[0]
        self.check_sampler(sampler, eta)
        timesteps = self.sample_timesteps(steps or self.default_steps)
        abars = F.pad(self.alphas_cumprod[timesteps], (0, 1), value=1.0)      # abar of each step, then 1
        x = noise
        for i, t in enumerate(timesteps):
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            abar64, abar_prev64 = abars[i], abars[i + 1]                        # float64 scalars
            abar, abar_prev = abar64.float(), abar_prev64.float()
            pred, var_out = self.split_output(model_fn(x, t_batch).float())
            x0, eps = self.predict_x0_eps(pred, x, abar)
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
                eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
            z = torch.randn(x.shape, device=x.device, generator=generator) if i + 1 < len(timesteps) else 0
            if sampler == "ddpm":
                mean, variance = self.q_posterior(x0, x, abar64, abar_prev64)
                if var_out is not None:
                    beta = (1 - abar64 / abar_prev64).float()
                    variance = self.model_log_variance(var_out, beta, variance.clamp(min=1e-20)).exp()
                x = mean + variance.sqrt() * z
            else:
                sigma = (eta * ((1 - abar_prev64) / (1 - abar64) * (1 - abar64 / abar_prev64)).sqrt()).float()
                x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * z
            yield t, x, x0


# -----------------------------------------------------------------------------
# Flow matching: the same DiT, a straight path from data to noise
#
# Rectified flow (Liu et al. 2022; Lipman et al. 2022): the straight line x_t = (1 - t) x_0 + t eps, t in [0, 1],
# whose velocity eps - x_0 the network predicts; sampling integrates dx/dt = v from t = 1 to 0. SiT (Ma et al.
# 2024) trains DiT so; SD3 found logit-normal t best. The network sees t * 1000, the DDPM's scale.
# -----------------------------------------------------------------------------

class RectifiedFlow(DiffusionProcess):
    """The flow-matching counterpart of GaussianDiffusion, behind the same interface.
    prediction: "v", the velocity eps - x_0 (SiT, SD3), or "x0", the clean image, turned into the
        velocity (x_t - x_0) / t for the loss and the sampler (Li & He 2025, as for the DDPM's x0).
    noise_shift s: the same SNR / s^2 as make_betas. Here SNR = ((1 - t) / t)^2, so the shift is
        t -> s t / (1 + (s - 1) t) (SD3 Eq. 23), applied to training and sampling times alike."""

    name = "flow matching"
    learn_sigma = False
    samplers = ("euler", "heun")
    # x0-prediction divides by t: below this, a small x_0 error's velocity error explodes (JiT clips t alike).
    min_t = 0.05

    def __init__(self, prediction="v", noise_shift=1.0, loss="l2"):
        self.loss = distance(loss)
        if prediction not in ("v", "x0"):
            raise ValueError(f"flow matching predicts 'v' or 'x0', not {prediction!r}")
        if not noise_shift > 0:
            raise ValueError(f"noise_shift must be > 0, got {noise_shift}")
        self.prediction, self.noise_shift = prediction, noise_shift

    def shift(self, t):
        return self.noise_shift * t / (1 + (self.noise_shift - 1) * t)

    def draw_timesteps(self, n, device):
        """Logit-normal t (SD3): sigmoid of a standard normal, most weight in the middle, then shifted."""
        return self.shift(torch.sigmoid(torch.randn(n, device=device)))

    def velocity(self, pred, x_t, t):
        """The network's output as a velocity (N, C, H, W); t (N,) in [0, 1]."""
        if self.prediction == "v":
            return pred
        return (x_t - pred) / t.clamp(min=self.min_t).view(-1, 1, 1, 1)

    def training_losses(self, model, x0, t, y, noise=None):
        """Per-sample losses {'loss', 'mse'} (N,): the error of the velocity (squared for l2)."""
        noise = torch.randn_like(x0) if noise is None else noise
        t4 = t.view(-1, 1, 1, 1)
        x_t = (1 - t4) * x0 + t4 * noise                                 # (N, C, H, W)
        v = self.velocity(model(x_t, t * self.num_timesteps, y).float(), x_t, t)
        target = noise - x0                                              # dx_t / dt
        return {"loss": self.loss(target, v), "mse": mean_flat((target - v) ** 2)}

    def sample_times(self, steps):
        """steps + 1 times from 1 (noise) down to 0, evenly spaced before the shift."""
        return self.shift(torch.linspace(1, 0, steps + 1, dtype=torch.float64)).tolist()

    def check_sampler(self, sampler, eta=0.0):
        super().check_sampler(sampler, eta)
        if eta != 0:
            raise ValueError(f"eta {eta:g}: flow matching's samplers integrate an ODE and add no noise; use eta 0")

    def denoise_steps(self, model_fn, noise, steps=None, sampler=None, eta=0.0, clip_denoised=True, generator=None):
        """Integrate dx/dt = v from t = 1 to 0, yielding (t, x_t, x0_pred) after each step. "euler" (default): one
        network call per step; "heun": two, a trapezoid of the velocities at both ends (the last step, to t = 0 where
        x0-prediction is undefined, stays Euler, as in EDM). clip_denoised clamps x_0 = x_t - t v. eta must be 0."""
        sampler = sampler or self.samplers[0]
        self.check_sampler(sampler, eta)

        def velocity(x, t):
            t_batch = torch.full((x.shape[0],), t, device=x.device)
            v = self.velocity(model_fn(x, t_batch * self.num_timesteps).float(), x, t_batch)
            x0 = x - t * v
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
                v = (x - x0) / t
            return v, x0

        times = self.sample_times(steps or self.default_steps)
        x = noise
        for t, t_next in zip(times[:-1], times[1:]):
            v, x0 = velocity(x, t)
            x_next = x + (t_next - t) * v
            if sampler == "heun" and t_next > 0:
                v_next, _ = velocity(x_next, t_next)
                x_next = x + (t_next - t) * (v + v_next) / 2
            x = x_next
            yield t, x, x0


def make_diffusion(objective="ddpm", **args):
    """The process of a checkpoint's diffusion_args; runs from before flow matching have no objective: DDPM."""
    if objective == "flow":  # of a DDPM's arguments, only these three mean something here
        return RectifiedFlow(**{name: args[name] for name in ("prediction", "noise_shift", "loss") if name in args})
    if objective != "ddpm":
        raise ValueError(f"unknown objective {objective!r}; choose 'ddpm' or 'flow'")
    return GaussianDiffusion(**args)


# -----------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022; DiT Sec. 3.1) and drawing images
# -----------------------------------------------------------------------------

def guided_model_fn(model, y, cfg_scale, interval=(0, math.inf), colour_scale=None):
    """model_fn(x, t) for the samplers: the network's output for the conditions y, guided unless both scales are 1:
    pred = pred(x, null) + s * (pred(x, y) - pred(x, null)) in one doubled forward pass, from the null condition
    dropout taught (a ValueError if none). Only the prediction channels are mixed (eps, v and x0 are affine in each
    other for a shared x_t: the same guidance); the variance channels stay the conditional ones.
    interval (lo, hi): guide only at lo <= t < hi (Kynkaanniemi et al. 2024): at high noise, where colour and
    layout are chosen, guidance pulls every sample to the commonest look. colour_scale: the scale of colour alone
    (each pixel's offset from its RGB mean; pixel-space RGB only): a caption without a colour leans to the
    palette's mean, and guidance multiplies the lean. None: cfg_scale if model.guide_colour, else 1."""
    if colour_scale is None:
        colour_scale = cfg_scale if model.guide_colour else 1.0
    if cfg_scale == 1 and colour_scale == 1:
        return lambda x, t: model(x, t, y)
    null = model.null_condition(y)
    if null is None:
        raise ValueError(f"guidance (cfg scale {cfg_scale}) needs the {model.null_name} of a model trained with "
                         f"{model.dropout_name} dropout, and this one was trained without: use a cfg scale of 1")
    both = torch.cat([y, null])  # (2N,) or (2N, L): [y; null]
    C = model.in_channels

    def model_fn(x, t):
        inside = (t >= interval[0]) & (t < interval[1])                  # (N,)
        if not inside.any():
            return model(x, t, y)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)  # (N, C_out, H, W) each
        delta = cond[:, :C] - uncond[:, :C]                              # (N, C, H, W)
        if colour_scale == cfg_scale:
            pred = uncond[:, :C] + cfg_scale * delta                     # (N, C, H, W)
        else:
            grey = delta.mean(1, keepdim=True)                           # (N, 1, H, W)
            pred = uncond[:, :C] + cfg_scale * grey + colour_scale * (delta - grey)  # (N, C, H, W)
        pred = torch.where(inside[:, None, None, None], pred, cond[:, :C])
        return torch.cat([pred, cond[:, C:]], dim=1)                     # (N, C_out, H, W)
    return model_fn


def seed_for(seed, *key):
    """A 64-bit seed of its own for each (seed, purpose, ...), with no overlaps between them."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, (seed, *key))).encode()).digest()[:8], "little")


def initial_noise(seed, label, j, shape):
    """x_T of sample j of class `label`, from its own CPU generator: the same whatever its batch, device or program."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(seed, "x_T", label, j)))


def to_unit(x):
    """Images from [-1, 1] to [0, 1], in float32, as image files hold them."""
    return (x.float().clamp(-1, 1) + 1) / 2


@torch.no_grad()
def draw(model, diffusion, y, j, seed, steps, cfg_scale, sampler=None, eta=0.0, interval=(0, math.inf),
         colour_scale=None):
    """Denoise sample j[i] of condition y[i] for every i, with guidance: yields x_t (N, C, H, W) after each
    reverse step, the last the sample. DDPM's per-step noise (or DDIM's at eta > 0) comes from one generator
    per batch, keyed by its first image: there an image depends on its batch. sampler "auto": the default."""
    shape = (model.in_channels, model.input_size, model.input_size)
    keys = model.condition_keys(y)
    noise = torch.stack([initial_noise(seed, c, k, shape) for c, k in zip(keys, j)]).to(y.device)  # x_T
    gen = torch.Generator(y.device).manual_seed(seed_for(seed, "steps", keys[0], j[0]))
    model_fn = guided_model_fn(model, y, cfg_scale, interval, colour_scale)
    sampler = None if sampler == "auto" else sampler
    for _, x, _ in diffusion.denoise_steps(model_fn, noise, steps, sampler, eta, generator=gen):
        yield x


# -----------------------------------------------------------------------------
# Text to image: captions as bytes, a caption encoder trained alongside, PixArt-alpha's block
#
# PixArt-alpha (Chen et al. 2023, Sec. 2.3): adaLN-Zero blocks with a zero-initialised cross-attention from
# the image tokens to the text's tokens (DiTBlock's cross_attention); the caption's pooled vector joins the
# timestep's embedding, as in SD3. No pretrained text encoder: a small one learns with the DiT from the bytes,
# as GLIDE trained its own. It hands the DiT a bag of words ("orange" is the same key in "an orange star" as
# in "something orange"): the model can draw a colour and a shape it never saw together (assets/text.md).
# -----------------------------------------------------------------------------

# The tokenizer is UTF-8 itself: bytes 0..255 are their own tokens, so any caption has a spelling and no
# vocabulary misses a word. BOS opens every caption, so that even the empty one (the null condition) has a
# key to attend to (a softmax over no keys is 0 / 0 = NaN); PAD fills short captions and marks their lengths.
CAPTION_BOS, CAPTION_PAD, CAPTION_VOCAB = 256, 257, 258
MAX_CAPTION_BYTES = 64
WHITESPACE = (9, 10, 13, 32)  # tab, line feed, carriage return, space: what separates words


def tokenize(captions, max_bytes=MAX_CAPTION_BYTES):
    """Captions (a list of str) -> tokens (N, L) int64: BOS, the caption's UTF-8 bytes, then PAD up to
    L = 1 + the longest caption's length in bytes (at most max_bytes). The empty caption is [BOS]."""
    if isinstance(captions, str):
        raise TypeError("tokenize takes a list of captions, not one string")
    encoded = []
    for caption in captions:
        shown = caption if len(caption) <= 40 else caption[:37] + "..."
        try:
            data = caption.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, e.g. from a command line in another encoding
            raise ValueError(f"caption {shown!r} is not valid Unicode text") from None
        if len(data) > max_bytes:
            raise ValueError(f"caption {shown!r} is {len(data)} bytes in UTF-8, over the limit of {max_bytes}")
        encoded.append(data)
    tokens = empty_captions(len(encoded), 1 + max(map(len, encoded), default=0), "cpu")  # (N, L) on the host
    for row, data in enumerate(encoded):
        tokens[row, 1:1 + len(data)] = torch.tensor(list(data), dtype=torch.long, device="cpu")
    return tokens


def empty_captions(n, length=1, device=None):
    """n empty captions ([BOS], then PAD up to length): the null condition."""
    tokens = torch.full((n, length), CAPTION_PAD, dtype=torch.long, device=device)  # (n, length)
    tokens[:, 0] = CAPTION_BOS
    return tokens


def caption_lengths(tokens):
    """(N, L) tokens -> (N,) lengths, BOS included: how many keys each caption offers."""
    return (tokens != CAPTION_PAD).sum(dim=1)


class CaptionEncoderLayer(nn.Module):
    """A pre-norm Transformer encoder layer; keys past a caption's length are masked: its batch does not matter."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, attn_backend="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend=attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, lengths):
        x = x + self.attn(self.norm1(x), lengths)  # (N, L, D)
        return x + self.mlp(self.norm2(x))         # (N, L, D)


def spell_words(tokens):
    """(N, L) tokens -> (N, W, B) the bytes regrouped one word per row, PAD after, and (N,) word counts. Words split
    at spaces (which go); BOS is a word of its own, so the empty caption has one. W: most words, B: longest word."""
    N, L = tokens.shape
    space = torch.isin(tokens, torch.tensor(WHITESPACE, device=tokens.device))    # (N, L)
    in_word = ~space & (tokens != CAPTION_PAD)                                     # (N, L)
    before = F.pad(space | (tokens == CAPTION_BOS), (1, 0), value=True)[:, :-1]    # (N, L) after a gap
    starts = in_word & before                                                      # (N, L) a word begins
    word = starts.long().cumsum(dim=1) - 1                                         # (N, L) its word's index
    where = torch.arange(L, device=tokens.device).expand(N, L)                     # (N, L)
    first = torch.where(starts, where, 0).cummax(dim=1).values                     # (N, L) its word's start
    offset = where - first                                                          # (N, L) place in the word
    words = starts.sum(dim=1)                                                      # (N,)
    W, B = int(words.max()), int(offset[in_word].max()) + 1
    grid = torch.full((N, W, B), CAPTION_PAD, dtype=tokens.dtype, device=tokens.device)  # (N, W, B)
    row = torch.arange(N, device=tokens.device)[:, None].expand(N, L)
    grid[row[in_word], word[in_word], offset[in_word]] = tokens[in_word]
    return grid, words


class CaptionEncoder(nn.Module):
    """Tokens -> one feature per word, the word counts, and a pooled vector. One layer reads each word's bytes
    (with sin-cos positions within the word), seeing no other word; their mean is the word's feature. `depth`
    more layers let the words see each other and their order (0, the default: a bag of words); a LayerNorm.
    pool "mlp_then_mean" (the default) averages each word's MLP output, so an unseen pair ("a purple ring")
    is the mean of two known parts; "mean_then_mlp" (older runs) sends the mean through the MLP."""

    POOLS = ("mlp_then_mean", "mean_then_mlp")

    def __init__(self, hidden_size, depth, num_heads, mlp_ratio=4.0, max_bytes=MAX_CAPTION_BYTES,
                 attn_backend="auto", pool="mlp_then_mean"):
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"unknown caption pool {pool!r}; choose from {self.POOLS}")
        self.max_bytes, self.pool_order = max_bytes, pool
        self.token_embedder = nn.Embedding(CAPTION_VOCAB, hidden_size)
        positions = sincos_pos_embed_1d(hidden_size, torch.arange(max_bytes + 1)).float()  # (max_bytes + 1, D)
        self.register_buffer("pos_embed", positions, persistent=False)  # rebuilt, not stored
        self.spell = CaptionEncoderLayer(hidden_size, num_heads, mlp_ratio, attn_backend)
        self.layers = nn.ModuleList([CaptionEncoderLayer(hidden_size, num_heads, mlp_ratio, attn_backend)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.pool = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, tokens):
        """tokens (N, L) from tokenize() -> features (N, W, D), word counts (N,), pooled (N, D)."""
        if tokens.shape[1] > self.max_bytes + 1:
            raise ValueError(f"captions of {tokens.shape[1] - 1} bytes, over this model's limit of {self.max_bytes}")
        # Words, their lengths and which are the same are shapes that depend on the bytes: worked out on the
        # host (a GPU waits once per step for a few hundred bytes; the meta device can count the cost given host
        # tokens), and the lengths reach the attention unread. A batch repeats a few words many times: each is
        # spelled once (U rows, not N * W) and copied to its places by index_select, whose CPU backward adds the
        # copies up in a fixed order (x[place]'s does so in any order: two runs with one seed would part).
        device = self.token_embedder.weight.device
        grid, words = spell_words(tokens.cpu())                              # (N, W, B), (N,)
        N, W, B = grid.shape
        distinct, place = torch.unique(grid.view(N * W, B), dim=0, return_inverse=True)  # (U, B), (N * W,)
        letters = caption_lengths(distinct).clamp(min=1)                     # (U,) a row past the last word: 1 PAD
        distinct, place, words, letters = (v.to(device) for v in (distinct, place, words, letters))
        x = self.token_embedder(distinct) + self.pos_embed[:B]               # (U, B, D)
        x = self.spell(x, letters)                                           # (U, B, D)
        inside = torch.arange(B, device=device) < letters[:, None]            # (U, B)
        x = torch.where(inside[..., None], x, 0).sum(dim=1) / letters[:, None]  # (U, D)
        x = x.index_select(0, place).view(N, W, -1)                          # (N, W, D)
        if self.layers:  # words that see each other see their order too; a bag has none
            x = x + self.pos_embed[:W]                                       # (N, W, D)
        for layer in self.layers:
            x = layer(x, words)                                              # (N, W, D)
        x = self.norm(x)                                                     # (N, W, D)
        inside = (torch.arange(W, device=device) < words[:, None])[..., None]        # (N, W, 1)
        if self.pool_order == "mlp_then_mean":
            return x, words, torch.where(inside, self.pool(x), 0).sum(dim=1) / words[:, None]  # (N, D)
        return x, words, self.pool(torch.where(inside, x, 0).sum(dim=1) / words[:, None])      # (N, D)


class TextDiT(DiT):
    """A DiT conditioned on captions, as above: it overrides DiT's conditioning hook, nothing of the forward pass.
    forward(x, t, captions) takes the (N, L) tokens of tokenize(), not strings: a tensor goes wherever labels go
    (a DataLoader batch, .to(device), torch.cat for guidance). Arguments, all plain (model_args rebuild it): DiT's,
    caption_dropout_prob (the chance of the empty caption in training), text_depth, max_caption_bytes, caption_pool."""

    conditions_on, null_name, dropout_name = "captions", "empty caption", "caption"
    guide_colour = False

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, caption_dropout_prob=0.1, learn_sigma=True, *,
                 text_depth=0, max_caption_bytes=MAX_CAPTION_BYTES, caption_pool="mlp_then_mean",
                 attn_backend="auto", grad_checkpointing=False):
        if not 0 <= caption_dropout_prob <= 1:
            raise ValueError(f"caption_dropout_prob must be in [0, 1], got {caption_dropout_prob}")
        super().__init__(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                         num_classes=None, learn_sigma=learn_sigma, attn_backend=attn_backend,
                         grad_checkpointing=grad_checkpointing, cross_attention=True)
        self.caption_dropout_prob, self.max_caption_bytes = caption_dropout_prob, max_caption_bytes
        self.caption_encoder = CaptionEncoder(hidden_size, text_depth, num_heads, mlp_ratio,
                                              max_caption_bytes, attn_backend, caption_pool)
        self.caption_encoder.apply(init_linear)  # initialised as the DiT's own layers
        nn.init.normal_(self.caption_encoder.token_embedder.weight, std=0.02)

    def condition(self, t, captions):
        """(t, captions (N, L)) -> c = t + pooled caption (N, D), word features (N, W, D), counts (N,); dropout here."""
        if self.training and self.caption_dropout_prob > 0:  # the empty caption in place of some
            drop = torch.rand(captions.shape[0], device=captions.device) < self.caption_dropout_prob  # (N,)
            empty = empty_captions(1, captions.shape[1], captions.device)                          # (1, L)
            captions = torch.where(drop[:, None], empty, captions)                                  # (N, L)
        text, words, pooled = self.caption_encoder(captions)   # (N, W, D), (N,), (N, D)
        return self.t_embedder(t) + pooled, text, words

    def null_condition(self, captions):
        """The empty caption for each, shaped like captions; None if never learned (no dropout)."""
        return empty_captions(*captions.shape, captions.device) if self.caption_dropout_prob > 0 else None

    def conditions(self, names):
        """Captions (the grid's prompts) -> tokens (L, T), on the host."""
        return tokenize(names, self.max_caption_bytes)

    def condition_keys(self, captions):
        """A caption's key is its tokens without the padding, which depends on the batch's longest."""
        return [row[:n] for row, n in zip(captions.tolist(), caption_lengths(captions).tolist())]


# Every size of DiT_configs as "TextDiT-Ti/8" and so on; the encoder adds a layer of the DiT's width (+ text_depth).
TextDiT_models = {f"Text{name}": functools.partial(TextDiT, depth=d, hidden_size=h, num_heads=n, patch_size=p)
                  for name, (d, h, n, p) in DiT_configs.items()}
MODELS = {**DiT_models, **TextDiT_models}  # every preset, by name: what train.py's --model takes


# =============================================================================
# Appendix: attention backend "auto", our Triton kernel on a GPU, tried once per shape, else SDPA
# =============================================================================

def _flash_attention():
    """Our FlashAttention kernel (flash_attn_triton.py), imported on first use: Triton is optional."""
    try:
        from flash_attn_triton import flash_attention
    except Exception as err:  # ImportError, or a Triton that fails while initialising
        raise RuntimeError(f"the Triton kernel cannot be imported ({type(err).__name__}: {err})") from err
    return flash_attention


AUTO_TRITON_DEVICES = ("cuda",)  # where "auto" tries the kernel: the device types Triton compiles for here

# {(q shape, k shape, dtype, grad, key lengths): whether the kernel ran}: it describes this machine's GPU.
_triton_works = {}


@functools.cache  # tried, and warned about, once per process
def _triton_imports():
    try:
        _flash_attention()
        return True
    except RuntimeError as err:
        warnings.warn(f"attention 'auto': {err}; SDPA computes every shape instead", stacklevel=4)
        return False


def _triton_runs(q, k, v, key_lengths=None):
    """One trial of the kernel on copies of q, k, v: the forward, and the backward if gradients will be needed (its
    kernels compile, and fail, apart), in a graph of its own, out of reach of gradient checkpointing's hooks."""
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            q, k, v = (t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            out = attention(q, k, v, "triton", key_lengths)
            if out.requires_grad:
                out.sum().backward()
        return True
    except torch.cuda.OutOfMemoryError:  # a full GPU is not a broken kernel: the caller sees it
        raise
    except Exception as err:
        masked = "" if key_lengths is None else " with key lengths"
        warnings.warn(f"attention 'auto': the Triton kernel failed for q {tuple(q.shape)}, k/v "
                      f"{tuple(k.shape)}{masked}, {q.dtype} ({type(err).__name__}: {err}); SDPA computes "
                      "this shape instead", stacklevel=4)
        return False


def _auto_uses_triton(q, k, v, key_lengths=None):
    """Backend "auto" uses our kernel on a GPU unless Triton cannot be imported, or the kernel fails
    to compile or launch for this shape: then it warns once, and SDPA takes that shape for the rest
    of the process (a kernel problem costs speed, not the run; "triton" raises). Key lengths: another kernel."""
    if q.device.type not in AUTO_TRITON_DEVICES:
        return False
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = (tuple(q.shape), tuple(k.shape), q.dtype, needs_grad, key_lengths is not None)
    if key not in _triton_works:
        if key_lengths is not None:  # a bad length is the caller's error, not a kernel failure
            check_key_lengths(key_lengths, q, k)
        _triton_works[key] = _triton_imports() and _triton_runs(q, k, v, key_lengths)
    return _triton_works[key]
