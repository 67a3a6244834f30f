"""FlashAttention-2 in Triton: forward and backward kernels for non-causal attention.

What problem this solves
------------------------
Attention computes, for every head, O = softmax(S) V with S = scale * Q K^T. Written with
ordinary tensor ops, S and P = softmax(S) are N x N matrices that are written to GPU
memory (HBM) and read back several times. For DiT-XL/2 at 512px (N = 1024 tokens, 16
heads) that is 16M scores per image per layer; at N = 16384 it is 268M scores per head,
gigabytes per layer. The arithmetic is cheap; the memory traffic is not.

FlashAttention (Dao et al., 2022, "FlashAttention: Fast and Memory-Efficient Exact
Attention with IO-Awareness") computes exactly the same result without ever storing S
or P. It splits Q into blocks of BLOCK_M rows and K, V into blocks of BLOCK_N rows, keeps
one block of each in on-chip memory (registers / shared memory), and streams over the
key blocks. FlashAttention-2 (Dao, 2023) reorganises the work so that GPUs stay busy:

* one program (a CUDA thread block) owns one block of queries of one (batch, head) and
  loops over all key blocks, so programs never need to talk to each other;
* the softmax normalisation is deferred to the very end (one division per output row
  instead of one per key block), which removes non-matmul FLOPs from the inner loop;
* the backward pass is split so that every gradient element is written by exactly one
  program (see below).

Queries and keys may differ in number: N_q queries attend to N_kv keys. Self-attention has
N_q = N_kv = N; DiT's cross-attention variant has N_q image tokens and N_kv = 2 condition
tokens (timestep and class). Below, "N" stands for whichever length is meant.

Online softmax
--------------
A row's softmax needs the maximum and the sum over *all* keys, but a program only sees
one key block at a time. It keeps three running quantities per query row i: the maximum
m_i seen so far, the sum l_i = sum_j exp(S_ij - m_i) over the keys seen so far, and the
unnormalised output acc_i = sum_j exp(S_ij - m_i) V_j. When a new block S^(j) arrives:

    m_new   = max(m_i, rowmax(S^(j)))
    alpha   = exp(m_i - m_new)                    # rescales everything computed so far
    P^(j)   = exp(S^(j) - m_new)
    l_i     = alpha * l_i + rowsum(P^(j))
    acc_i   = alpha * acc_i + P^(j) V^(j)

Subtracting the running maximum keeps every exponent <= 0, so nothing overflows even in
fp16, and multiplying by alpha corrects the old terms whenever the maximum grows. After
the last block O_i = acc_i / l_i: exactly the softmax-weighted sum, up to float rounding.

The kernels use exp2 instead of exp because the GPU has a native base-2 exponential
instruction (exp is exp2 plus a multiply). exp(x) = exp2(x * log2(e)), so the factor
log2(e) is folded into the softmax scale once: the kernels work with base-2 scores
S2 = (scale * log2(e)) * Q K^T and every exp above becomes exp2.

Why only the logsumexp is stored
--------------------------------
The backward pass needs P again. Instead of saving the N_q x N_kv matrix, the forward
pass saves one number per query row, the logsumexp lse_i = m_i + log(l_i), because then

    P_ij = exp(S_ij - lse_i)        (in the kernels' base 2: exp2(S2_ij - lse2_i))

recovers the normalised probabilities in a single step. Recomputing S = Q K^T costs one
extra matmul, which is much cheaper than writing and reading N^2 numbers. In this file
the stored logsumexp is in base-2 units: lse2 = m2 + log2(l) = lse * log2(e), fp32,
shape (B, H, N_q).

Backward pass
-------------
With dO the incoming gradient, the chain rule through O = P V and P = softmax(S) gives

    dV = P^T dO                  dP = dO V^T
    dS = P * (dP - delta)        delta_i = sum_j P_ij dP_ij = dO_i . O_i
    dQ = scale * dS K            dK = scale * dS^T Q

The identity delta_i = dO_i . O_i holds because O_i = sum_j P_ij V_j; it turns the
softmax Jacobian into a per-row constant that a tiny preprocess kernel computes once.
Then a dK/dV kernel gives each program a block of keys and loops over all query blocks
(it accumulates dK and dV for its keys in registers), and a dQ kernel gives each program
a block of queries and loops over all key blocks. Every output element has exactly one
writer: no atomics, and the result is deterministic (the same bits on every run). The
price is that P is recomputed twice, once in each kernel.

Ragged tails
------------
N_q and N_kv need not be multiples of the blocks. Loads zero-fill rows past the end and
stores skip them. Keys past N_kv get the score -inf, hence no weight. Query rows past N_q
are computed on zeros and never stored. Each kernel explains at the spot why no other
guard is needed.

Per-sample key lengths
----------------------
Captions in a batch differ in length, so text conditioning pads them to one N_kv and gives
each sample b its own number of real keys, key_lengths[b]. That is the ragged tail again,
with the end read from memory instead of N_kv: each program loads its sample's length and
uses it wherever the tail logic used N_kv, so keys at positions >= key_lengths[b] are never
read, get no weight in the forward pass and no gradient in the backward (their dK and dV
rows are stored as exact zeros). Key blocks entirely past the length are skipped. Whether
lengths are given is a compile-time flag (HAS_KEY_LENGTHS): without them the kernels
compile to exactly the code they had before the feature, so the image path pays nothing.

Vector loads
------------
A tile row is D contiguous elements; a GPU moves it fastest in 16-byte pieces, and only
such pieces can be copied to shared memory asynchronously, which is what lets the next
K/V block load while this one is multiplied. The compiler may use them only where it can
prove every row starts on a 16-byte boundary, and Triton's JIT proves that only from
arguments divisible by 16: D = 64 or 128 qualify, DiT-XL/2's D = 72 does not, and would
load one element at a time. So the host computes what it knows of the actual tensors (a
power of two dividing D, every stride and the data pointer: VEC, in _vector_width) and
the kernels pass it on with tl.multiple_of and tl.max_constancy.

Two worlds, one source
----------------------
On a CUDA GPU the kernels are compiled and autotuned (block sizes, warps, pipeline
stages) per sequence lengths and head dim. With TRITON_INTERPRET=1 the same kernels run
on the CPU through Triton's numpy interpreter, which is how the tests run on machines
without a GPU. There a single small block configuration is used (autotuning interpreted
kernels would take forever), and tl.dot operands are converted to fp32 first (see
_DOT_IN_FP32). Set the variable before this module is imported: @triton.jit decides
between compiling and interpreting right then, and so does this module.

fp32 inputs use TF32 tensor cores when torch.get_float32_matmul_precision() allows it
("high" / "medium"); with the default "highest" they are full-precision fp32 products.

Usage and benchmark
-------------------
    from flash_attn_triton import flash_attention
    o = flash_attention(q, k, v)      # q (B, H, N_q, D); k, v (B, H, N_kv, D); o like q
                                      # same meaning as F.scaled_dot_product_attention
    o = flash_attention(q, k, v, key_lengths=lengths)   # lengths (B,): sample b attends
                                                        # to its first lengths[b] keys only

    python assets/benchmark_attention.py    # on a CUDA machine: TFLOP/s against PyTorch's
                                            # SDPA backends; writes assets/attention_benchmark.md

The first call for each new (N_q, N_kv, D, dtype) autotunes the kernels, which takes a while.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

from dit import check_key_lengths  # the one check of per-sample key lengths (dit.py is torch only)

__all__ = ["flash_attention"]

MAX_HEAD_DIM = 128  # larger heads would need a smaller tile plan to fit in shared memory

# log2(e): exp(x) == exp2(x * LOG2E). A constexpr so the kernels can read it as a constant.
LOG2E = tl.constexpr(1.4426950408889634)

# Interpret or compile: @triton.jit reads TRITON_INTERPRET when it decorates the kernels
# below, at import, so this module decides at the same moment from the same variable.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

# The interpreter's tl.dot is numpy's matmul on the stored values, and it stores bfloat16 as
# raw uint16 bits: it would multiply bit patterns as integers. This is the kernels' one
# interpreter workaround; _mma reads it, and compiled kernels never see the fp32 branch.
_DOT_IN_FP32 = tl.constexpr(_INTERPRET)


# ---------------------------------------------------------------------------------------
# Small device helpers
# ---------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. DOT_PRECISION ("tf32" or "ieee") affects fp32 only."""
    if _DOT_IN_FP32:
        # The values were already rounded to the input dtype, so the fp32 product matches
        # what tensor cores compute up to summation order.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _tile_ptrs_and_mask(base, offs_row, offs_d, stride_row, stride_d, N, D, VEC: tl.constexpr):
    """Pointers and in-range mask of a (rows, BLOCK_D) tile of one head.

    VEC (see _vector_width) tells the compiler what the host proved: each row starts on a
    VEC-element boundary and D is a multiple of VEC. Triton's JIT infers alignment only from
    values divisible by 16, so without it D = 72 (DiT-XL/2) is loaded one element at a time
    and the K/V loads are not pipelined; with it they become 16-byte vector copies.
    """
    ptrs = base + offs_row[:, None] * stride_row + offs_d[None, :] * stride_d
    # Rows >= N (sequence tail) and columns >= D (head dim padded to a power of two) are
    # not in memory.
    mask = (offs_row[:, None] < N) & (offs_d[None, :] < D)
    if VEC > 1:  # a hint replaces what the compiler inferred: VEC = 1 (a strided tensor) gives none
        ptrs = tl.multiple_of(ptrs, (1, VEC * (base.dtype.element_ty.primitive_bitwidth // 8)))  # in bytes
        mask = tl.max_constancy(mask, (1, VEC))
    return ptrs, mask


@triton.jit
def _load_tile(base, offs_row, offs_d, stride_row, stride_d, N, D, VEC: tl.constexpr):
    """Load a (rows, BLOCK_D) tile of one head; out-of-range entries read as 0."""
    ptrs, mask = _tile_ptrs_and_mask(base, offs_row, offs_d, stride_row, stride_d, N, D, VEC)
    # Zero is the neutral value: padded head-dim columns add 0 to every dot product, and the
    # kernels rely on padded rows being exactly zero (see each kernel).
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_tile(base, value, offs_row, offs_d, stride_row, stride_d, N, D, VEC: tl.constexpr):
    """Store a (rows, BLOCK_D) tile, skipping the padded rows and head-dim columns."""
    ptrs, mask = _tile_ptrs_and_mask(base, offs_row, offs_d, stride_row, stride_d, N, D, VEC)
    # The padding exists only in registers: writing it would clobber the next row / head.
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _split_program_id(N, H, BLOCK: tl.constexpr):
    """Map the 1-D program id to (batch, head, block index along a sequence of length N).

    A 1-D grid avoids CUDA's 65535 limit on the 2nd/3rd grid dimension for large B * H, and
    putting the sequence block in the fastest-varying position makes neighbouring programs
    share a (batch, head), so the tiles they all stream stay in L2 cache.
    """
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(N, BLOCK)
    pid_bh = pid // num_blocks
    pid_blk = pid % num_blocks
    # int64: batch * stride_b can exceed 2**31 elements for large inputs.
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    return off_b, off_h, pid_bh.to(tl.int64), pid_blk


@triton.jit
def _num_keys(KEY_LENGTHS, off_b, N_KV, HAS_KEY_LENGTHS: tl.constexpr):
    """Number of real keys of batch entry off_b: key_lengths[off_b], or all N_KV without lengths.

    Every kernel uses it in place of N_KV wherever keys end. HAS_KEY_LENGTHS is a constexpr, so
    without lengths the branch disappears at compile time and nothing is loaded.
    """
    if HAS_KEY_LENGTHS:
        n_keys = tl.load(KEY_LENGTHS + off_b)  # in [1, N_KV], checked on the host
    else:
        n_keys = N_KV
    return n_keys


# ---------------------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # inputs: Q (B, H, N_Q, D), K and V (B, H, N_KV, D), arbitrary strides
    O,  # output (B, H, N_Q, D)
    LSE,  # output, contiguous fp32 (B, H, N_Q): base-2 logsumexp of each query row
    KEY_LENGTHS,  # contiguous int32 (B,): real keys per sample; None when HAS_KEY_LENGTHS is off
    stride_qb, stride_qh, stride_qn, stride_qd,  # strides of Q, in elements
    stride_kb, stride_kh, stride_kn, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # strides of V
    stride_ob, stride_oh, stride_on, stride_od,  # strides of O
    H,  # number of heads (to split the program id into batch and head)
    N_Q, N_KV,  # number of queries and of keys (equal for self-attention)
    D,  # head dim; BLOCK_D >= D is its padded, power-of-two tile width
    sm_scale,  # softmax scale, usually D ** -0.5
    BLOCK_M: tl.constexpr,  # queries owned by one program
    BLOCK_N: tl.constexpr,  # keys processed per loop iteration
    BLOCK_D: tl.constexpr,  # next_power_of_2(D), at least 16 (tl.dot's minimum)
    VEC: tl.constexpr,  # rows start on, and D is, a multiple of VEC elements (_vector_width)
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee", used only for fp32 operands
    HAS_KEY_LENGTHS: tl.constexpr,  # read KEY_LENGTHS, or let every sample attend to all N_KV keys
):
    off_b, off_h, pid_bh, pid_m = _split_program_id(N_Q, H, BLOCK_M)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = O + off_b * stride_ob + off_h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows of this program
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key rows within one key block
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) head-dim columns, padded
    # This sample's keys end at n_keys <= N_KV: below, n_keys plays the part N_KV plays in the
    # ragged tail, so the keys past it are neither loaded nor weighted, and the loop stops at
    # the last block that holds a real key.
    n_keys = _num_keys(KEY_LENGTHS, off_b, N_KV, HAS_KEY_LENGTHS)

    # Scale and log2(e) are applied to the fp32 scores rather than folded into Q: rounding
    # a pre-scaled Q back to fp16/bf16 would add an error the reference does not have.
    qk_scale = sm_scale * LOG2E

    # The query tile stays in registers for the whole loop: it is read from HBM once.
    # Query rows past N_Q are zeros: they get finite scores and are never stored.
    q = _load_tile(q_base, offs_m, offs_d, stride_qn, stride_qd, N_Q, D, VEC)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running unnormalised output

    for start_n in range(0, n_keys, BLOCK_N):
        offs_kv = start_n + offs_n  # (BLOCK_N,)
        k = _load_tile(k_base, offs_kv, offs_d, stride_kn, stride_kd, n_keys, D, VEC)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(v_base, offs_kv, offs_d, stride_vn, stride_vd, n_keys, D, VEC)  # (BLOCK_N, BLOCK_D)

        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION)
        s = s * qk_scale  # (BLOCK_M, BLOCK_N)
        # Keys past the end of the sequence, or of this sample's keys (zero-filled by the
        # load), must get no weight: a -inf score becomes exp2(-inf) = 0 below, and cannot
        # raise the row max.
        s = tl.where((offs_kv < n_keys)[None, :], s, float("-inf"))

        # Every block starts at a real key (start_n < n_keys, and n_keys >= 1), so m_new is
        # finite from the first block on and s - m_new never meets (-inf) - (-inf). Before
        # the first block m_i = -inf gives alpha = exp2(-inf) = 0, which multiplies l_i = acc = 0.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # (BLOCK_M,)
        alpha = tl.math.exp2(m_i - m_new)  # (BLOCK_M,) rescales the old l_i and acc
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N), every entry in [0, 1]

        l_i = l_i * alpha + tl.sum(p, axis=1)
        # P is rounded to V's dtype so the P @ V product runs on fp16/bf16 tensor cores,
        # exactly as FlashAttention does; the accumulator stays fp32.
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)  # (BLOCK_M, BLOCK_D)
        m_i = m_new

    # Deferred normalisation (FA2): divide once at the end. l_i >= 1, because the key that
    # set the row max contributed exp2(0) = 1.
    acc = acc / l_i[:, None]
    _store_tile(o_base, acc, offs_m, offs_d, stride_on, stride_od, N_Q, D, VEC)

    # Base-2 logsumexp: lets the backward rebuild P with one exp2 and no max/sum pass.
    lse = m_i + tl.math.log2(l_i)  # (BLOCK_M,)
    # Only real query rows have a logsumexp slot.
    tl.store(LSE + pid_bh * N_Q + offs_m, lse, mask=offs_m < N_Q)


# ---------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO,  # forward output and its gradient, (B, H, N_Q, D) with arbitrary strides
    DELTA,  # output, contiguous fp32 (B, H, N_Q): delta_i = dO_i . O_i
    stride_ob, stride_oh, stride_on, stride_od,  # strides of O
    stride_dob, stride_doh, stride_don, stride_dod,  # strides of dO (may be 0: expanded grads)
    H, N_Q, D,  # heads, number of queries, head dim
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # padded head dim
    VEC: tl.constexpr,  # the tiles' proven vector width in elements
):
    off_b, off_h, pid_bh, pid_m = _split_program_id(N_Q, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh,
                   offs_m, offs_d, stride_on, stride_od, N_Q, D, VEC)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh,
                    offs_m, offs_d, stride_don, stride_dod, N_Q, D, VEC)  # (BLOCK_M, BLOCK_D)
    # delta = rowsum(P * dP) = rowsum(dO * O): one dot product per row instead of an
    # N_kv-long reduction over P, and fp32 because it is subtracted from dP (cancellation).
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BLOCK_M,)
    tl.store(DELTA + pid_bh * N_Q + offs_m, delta, mask=offs_m < N_Q)  # real rows only


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # inputs: Q and dO (B, H, N_Q, D), K and V (B, H, N_KV, D), any strides
    DK, DV,  # outputs, (B, H, N_KV, D); allocated together, so they share one set of strides
    LSE, DELTA,  # contiguous fp32 (B, H, N_Q): base-2 logsumexp and rowsum(dO * O)
    KEY_LENGTHS,  # contiguous int32 (B,): real keys per sample; None when HAS_KEY_LENGTHS is off
    stride_qb, stride_qh, stride_qn, stride_qd,  # strides of Q
    stride_kb, stride_kh, stride_kn, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # strides of V
    stride_dob, stride_doh, stride_don, stride_dod,  # strides of dO
    stride_gb, stride_gh, stride_gn, stride_gd,  # strides of dK and dV
    H, N_Q, N_KV, D,  # heads, numbers of queries and keys, head dim
    sm_scale,  # softmax scale
    BLOCK_M: tl.constexpr,  # queries processed per loop iteration
    BLOCK_N: tl.constexpr,  # keys owned by one program
    BLOCK_D: tl.constexpr,  # padded head dim
    VEC: tl.constexpr,  # the tiles' proven vector width in elements
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee" for fp32 operands
    HAS_KEY_LENGTHS: tl.constexpr,  # read KEY_LENGTHS, or let every sample attend to all N_KV keys
):
    off_b, off_h, pid_bh, pid_n = _split_program_id(N_KV, H, BLOCK_N)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_base = LSE + pid_bh * N_Q
    delta_base = DELTA + pid_bh * N_Q

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys of this program
    offs_m0 = tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows within one query block
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    qk_scale = sm_scale * LOG2E

    # Keys past N_KV are zero rows; their dK/dV rows are computed but never stored, and
    # keys do not interact with each other here, so they need no other masking. Keys past
    # this sample's n_keys (but before N_KV) are zero rows too, never read, but their rows
    # are stored: they must come out exactly zero, which P = 0 below ensures.
    n_keys = _num_keys(KEY_LENGTHS, off_b, N_KV, HAS_KEY_LENGTHS)
    k = _load_tile(K + off_b * stride_kb + off_h * stride_kh,
                   offs_n, offs_d, stride_kn, stride_kd, n_keys, D, VEC)  # (BLOCK_N, BLOCK_D)
    v = _load_tile(V + off_b * stride_vb + off_h * stride_vh,
                   offs_n, offs_d, stride_vn, stride_vd, n_keys, D, VEC)  # (BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # A key block entirely past the sample's length gets no weight from any query: the loop
    # over queries is skipped and its dK, dV rows are stored as the zeros above.
    q_end = N_Q
    if HAS_KEY_LENGTHS:
        q_end = tl.where(pid_n * BLOCK_N < n_keys, N_Q, 0)
    for start_m in range(0, q_end, BLOCK_M):
        offs_m = start_m + offs_m0  # (BLOCK_M,)
        q = _load_tile(q_base, offs_m, offs_d, stride_qn, stride_qd, N_Q, D, VEC)  # (BLOCK_M, BLOCK_D)
        do = _load_tile(do_base, offs_m, offs_d, stride_don, stride_dod, N_Q, D, VEC)  # (BLOCK_M, BLOCK_D)
        # Query rows past N_Q load q = dO = 0 and lse = delta = 0, so their scores are 0 and
        # P = exp2(0) = 1: finite, and multiplied by exact zeros in both sums below
        # (dO = 0 in P^T dO; dS = P * (dO V^T - 0) = 0 in dS^T Q). No mask is needed.
        lse = tl.load(lse_base + offs_m, mask=offs_m < N_Q, other=0.0)  # (BLOCK_M,)
        delta = tl.load(delta_base + offs_m, mask=offs_m < N_Q, other=0.0)  # (BLOCK_M,)

        # Work with transposed scores S^T (keys x queries) so that dV = P^T dO and
        # dK = dS^T Q come out as plain matmuls with this program's keys as rows.
        s_t = _mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), DOT_PRECISION)
        # P recomputed from the saved logsumexp: already normalised, no max or sum needed.
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if HAS_KEY_LENGTHS:
            # Keys past the sample's length had no weight in the forward pass. Their zero rows
            # score 0, and exp2(0 - lse) is not 0 (it may even overflow): set P = 0 exactly,
            # so dV = P^T dO and dS = P * (dP - delta) vanish on those rows (dP is finite: V
            # is zero there).
            p_t = tl.where((offs_n < n_keys)[:, None], p_t, 0.0)

        dv = _mma(p_t.to(do.dtype), do, dv, DOT_PRECISION)  # (BLOCK_N, BLOCK_D)
        dp_t = _mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # (BLOCK_N, BLOCK_M) softmax backward
        dk = _mma(ds_t.to(q.dtype), q, dk, DOT_PRECISION)  # (BLOCK_N, BLOCK_D)

    # S = scale * Q K^T, so the scale reappears once in dK (applied after the sum, in fp32).
    dk = dk * sm_scale
    _store_tile(DK + off_b * stride_gb + off_h * stride_gh, dk, offs_n, offs_d, stride_gn, stride_gd, N_KV, D, VEC)
    _store_tile(DV + off_b * stride_gb + off_h * stride_gh, dv, offs_n, offs_d, stride_gn, stride_gd, N_KV, D, VEC)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # inputs: Q and dO (B, H, N_Q, D), K and V (B, H, N_KV, D), any strides
    DQ,  # output, (B, H, N_Q, D)
    LSE, DELTA,  # contiguous fp32 (B, H, N_Q)
    KEY_LENGTHS,  # contiguous int32 (B,): real keys per sample; None when HAS_KEY_LENGTHS is off
    stride_qb, stride_qh, stride_qn, stride_qd,  # strides of Q
    stride_kb, stride_kh, stride_kn, stride_kd,  # strides of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # strides of V
    stride_dob, stride_doh, stride_don, stride_dod,  # strides of dO
    stride_gb, stride_gh, stride_gn, stride_gd,  # strides of dQ
    H, N_Q, N_KV, D,  # heads, numbers of queries and keys, head dim
    sm_scale,  # softmax scale
    BLOCK_M: tl.constexpr,  # queries owned by one program
    BLOCK_N: tl.constexpr,  # keys processed per loop iteration
    BLOCK_D: tl.constexpr,  # padded head dim
    VEC: tl.constexpr,  # the tiles' proven vector width in elements
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee" for fp32 operands
    HAS_KEY_LENGTHS: tl.constexpr,  # read KEY_LENGTHS, or let every sample attend to all N_KV keys
):
    off_b, off_h, pid_bh, pid_m = _split_program_id(N_Q, H, BLOCK_M)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) queries of this program
    offs_n0 = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    qk_scale = sm_scale * LOG2E

    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh,
                   offs_m, offs_d, stride_qn, stride_qd, N_Q, D, VEC)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh,
                    offs_m, offs_d, stride_don, stride_dod, N_Q, D, VEC)  # (BLOCK_M, BLOCK_D)
    # Query rows past N_Q read lse = delta = 0: their P stays finite and their dQ rows are
    # never stored.
    lse = tl.load(LSE + pid_bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)  # (BLOCK_M,)
    delta = tl.load(DELTA + pid_bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)  # (BLOCK_M,)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # As in the forward pass, this sample's keys end at n_keys: the loop, the loads and the
    # mask below stop there.
    n_keys = _num_keys(KEY_LENGTHS, off_b, N_KV, HAS_KEY_LENGTHS)

    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + offs_n0  # (BLOCK_N,)
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, n_keys, D, VEC)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, n_keys, D, VEC)  # (BLOCK_N, BLOCK_D)

        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION)
        # Keys past n_keys get score -inf, hence P = 0, exactly as in the forward pass. Unlike
        # the padded queries above this mask matters: a zero key scores 0, and exp2(0 - lse)
        # can overflow when every real score is very negative, making inf * 0 = NaN in dS K.
        s = tl.where((offs_n < n_keys)[None, :], s * qk_scale, float("-inf"))  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        dp = _mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dq = _mma(ds.to(k.dtype), k, dq, DOT_PRECISION)  # (BLOCK_M, BLOCK_D)

    dq = dq * sm_scale
    _store_tile(DQ + off_b * stride_gb + off_h * stride_gh, dq, offs_m, offs_d, stride_gn, stride_gd, N_Q, D, VEC)


# ---------------------------------------------------------------------------------------
# Launch configurations: autotuned on a GPU, one fixed config under the interpreter
# ---------------------------------------------------------------------------------------


def _configs(row_blocks, loop_blocks, rows_name, loop_name, eight_warps_from=128):
    """Candidate configs: a program owns `rows_name` rows and steps `loop_name` at a time."""
    configs = []
    for rows in row_blocks:
        for step in loop_blocks:
            # 8 warps (two Hopper warpgroups) only pay off when a big tile gives each enough
            # rows; for smaller tiles they mostly add synchronisation.
            warps = (4, 8) if rows >= eight_warps_from and step >= 64 else (4,)
            # 128-row K/V tiles at D = 128 leave shared memory for only 2-3 pipeline stages.
            stages = (2, 3) if step == 128 else (3, 4)
            for w in warps:
                for s in stages:
                    configs.append(triton.Config({rows_name: rows, loop_name: step}, num_warps=w, num_stages=s))
    return configs


def _prune_by_length(configs, named_args, **kwargs):
    """Drop configs whose blocks are much longer than the sequences (pure padding work)."""
    args = {**kwargs, **named_args}

    def cap(block, length):  # never below the smallest candidate, so something always stays
        return max(triton.next_power_of_2(args[length]), min(c.kwargs[block] for c in configs))

    # BLOCK_M always tiles the queries and BLOCK_N the keys, whichever of them a program owns.
    cap_m, cap_n = cap("BLOCK_M", "N_Q"), cap("BLOCK_N", "N_KV")
    return [c for c in configs if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]


def _autotuned(kernel, configs):
    # Keyed on the lengths and D (the autotuner adds the tensors' dtypes to the key by itself),
    # and on HAS_KEY_LENGTHS and VEC, since each value of them is a compiled kernel of its own.
    # Every kernel writes its outputs without reading them, so benchmarking a config
    # several times cannot corrupt the result and no reset_to_zero is needed.
    return triton.autotune(configs=configs, key=["N_Q", "N_KV", "D", "HAS_KEY_LENGTHS", "VEC"],
                           prune_configs_by={"early_config_prune": _prune_by_length})(kernel)


# 16 forward and 12 + 10 backward candidates before pruning: each is compiled once per
# (N_q, N_kv, D, dtype), so the list is kept short. Triton caches the binaries on disk.
_attn_fwd_tuned = _autotuned(_attn_fwd_kernel, _configs((64, 128), (32, 64, 128), "BLOCK_M", "BLOCK_N"))
# dK/dV: the program's key block is the big one; query blocks stream past it. It holds two
# (keys, D) fp32 accumulators, so 8 warps pay already for 64 keys: with 4, large head dims
# spill registers (assets/compile_sm90.md).
_attn_bwd_dkdv_tuned = _autotuned(_attn_bwd_dkdv_kernel, _configs((64, 128), (32, 64), "BLOCK_N", "BLOCK_M",
                                                                  eight_warps_from=64))
_attn_bwd_dq_tuned = _autotuned(_attn_bwd_dq_kernel, _configs((64, 128), (32, 64), "BLOCK_M", "BLOCK_N"))

# Under the interpreter each tile operation is a numpy call with a fixed Python overhead,
# so fewer, larger tiles are much faster. BLOCK_M != BLOCK_N on purpose, so that swapping
# the two somewhere shows up in the tests, and a 32-key step still runs the online-softmax
# rescaling over several key blocks for the longer test sequences.
_INTERPRETER_BLOCKS = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 32},
    "dkdv": {"BLOCK_M": 32, "BLOCK_N": 64},
    "dq": {"BLOCK_M": 64, "BLOCK_N": 32},
}
_PREPROCESS_BLOCK_M = 64  # bandwidth-bound elementwise + row sum: no tuning needed


def _launch(name, plain, tuned, grid, *args, **meta):
    """Run `plain` with the fixed interpreter blocks, or the autotuned wrapper on a GPU."""
    if _INTERPRET:
        blocks = _INTERPRETER_BLOCKS[name]
        plain[grid(blocks)](*args, **blocks, **meta)
    else:
        tuned[grid](*args, **meta)


def _vector_width(*tensors):
    """The most elements (a power of two, at most 16 bytes) that one load or store of a tile row may
    move in every tensor: the head dim is contiguous, and D, every other stride and the data pointer
    are multiples of it. 1 when some head dim is strided (or expanded, stride 0)."""
    vec = 16 // tensors[0].element_size()
    for t in tensors:
        if t.stride(-1) != 1:
            return 1
        for n in (t.shape[-1], t.data_ptr() // t.element_size(), *t.stride()[:-1]):
            while n % vec:
                vec //= 2
    return vec


def _kernel_meta(q, key_lengths, *tensors):
    """Compile-time arguments shared by the attention kernels; `tensors` are every tile the launch reads
    or writes."""
    # fp32 inputs follow PyTorch's own switch for TF32 matmuls.
    fp32_exact = q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return {"BLOCK_D": max(16, triton.next_power_of_2(q.shape[-1])),
            "VEC": _vector_width(q, *tensors),
            "DOT_PRECISION": "ieee" if fp32_exact else "tf32",
            # Without lengths, KEY_LENGTHS is None and the kernels compile as if it did not exist.
            "HAS_KEY_LENGTHS": key_lengths is not None}


def _device_guard(t):
    # Triton launches on the *current* CUDA device; make it the tensors' device.
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _flash_attn_forward(q, k, v, sm_scale, key_lengths=None):
    """Returns o (B, H, N_q, D) in q's dtype and lse (B, H, N_q) fp32, base-2 logsumexp.
    key_lengths: None, or contiguous int32 (B,) with every entry in [1, N_kv] (checked by
    flash_attention)."""
    B, H, N_q, D = q.shape
    N_kv = k.shape[2]
    o = torch.empty((B, H, N_q, D), dtype=q.dtype, device=q.device)  # (B, H, N_q, D)
    lse = torch.empty((B, H, N_q), dtype=torch.float32, device=q.device)  # (B, H, N_q)
    if o.numel() == 0:
        return o, lse
    meta = _kernel_meta(q, key_lengths, k, v, o)
    grid = lambda META: (triton.cdiv(N_q, META["BLOCK_M"]) * B * H,)  # noqa: E731
    with _device_guard(q):
        _launch("fwd", _attn_fwd_kernel, _attn_fwd_tuned, grid,
                q, k, v, o, lse, key_lengths,
                *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                H, N_q, N_kv, D, sm_scale, **meta)
    return o, lse


def _flash_attn_backward(do, q, k, v, o, lse, sm_scale, key_lengths=None):
    """Returns dq (B, H, N_q, D) and dk, dv (B, H, N_kv, D), contiguous, in q's dtype.
    Keys past key_lengths (as in the forward) get dk = dv = 0."""
    B, H, N_q, D = q.shape
    N_kv = k.shape[2]
    dq = torch.empty((B, H, N_q, D), dtype=q.dtype, device=q.device)  # (B, H, N_q, D)
    dkv = torch.empty((2, B, H, N_kv, D), dtype=q.dtype, device=q.device)  # dK and dV, one layout
    dk, dv = dkv[0], dkv[1]  # (B, H, N_kv, D) each
    if dq.numel() == 0:  # no queries (or no batch, heads, head dim): nothing flows back
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, N_q), dtype=torch.float32, device=q.device)  # (B, H, N_q)
    meta = _kernel_meta(q, key_lengths, k, v, o, do, dq, dk, dv)
    with _device_guard(q):
        _attn_bwd_preprocess_kernel[(triton.cdiv(N_q, _PREPROCESS_BLOCK_M) * B * H,)](
            o, do, delta, *o.stride(), *do.stride(), H, N_q, D,
            BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_D=meta["BLOCK_D"], VEC=meta["VEC"])  # no key lengths needed
        # The two kernels are independent given delta; each writes its outputs alone.
        _launch("dkdv", _attn_bwd_dkdv_kernel, _attn_bwd_dkdv_tuned,
                lambda META: (triton.cdiv(N_kv, META["BLOCK_N"]) * B * H,),
                q, k, v, do, dk, dv, lse, delta, key_lengths,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
                H, N_q, N_kv, D, sm_scale, **meta)
        _launch("dq", _attn_bwd_dq_kernel, _attn_bwd_dq_tuned,
                lambda META: (triton.cdiv(N_q, META["BLOCK_M"]) * B * H,),
                q, k, v, do, dq, lse, delta, key_lengths,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                H, N_q, N_kv, D, sm_scale, **meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------
# Autograd and the public function
# ---------------------------------------------------------------------------------------


class FlashAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, o and the (B, H, N_q) logsumexp: O(N_q) extra memory instead of O(N_q N_kv)."""

    @staticmethod
    def forward(ctx, q, k, v, sm_scale, key_lengths):
        o, lse = _flash_attn_forward(q, k, v, sm_scale, key_lengths)
        ctx.save_for_backward(q, k, v, o, lse, key_lengths)  # None is allowed here, and comes back
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_lengths = ctx.saved_tensors
        dq, dk, dv = _flash_attn_backward(do, q, k, v, o, lse, ctx.sm_scale, key_lengths)
        return dq, dk, dv, None, None  # no gradient for the scale or the integer lengths


def flash_attention(q, k, v, scale=None, key_lengths=None):
    """softmax(q k^T * scale) v without materialising the attention matrix.

    Same meaning as ``torch.nn.functional.scaled_dot_product_attention(q, k, v,
    scale=scale)`` without dropout or causality; with key_lengths, as SDPA with the boolean
    attn_mask ``arange(N_kv) < key_lengths[:, None, None, None]`` (True = attend).

    Args:
        q: (B, H, N_q, D) queries.
        k, v: (B, H, N_kv, D) keys and values; N_kv >= 1 may differ from N_q (cross-attention).
            All three of one dtype (float16, bfloat16 or float32), on one device, D <= 128,
            any strides (e.g. views of a fused qkv projection). CUDA tensors, or any device
            when TRITON_INTERPRET=1 (slow, for testing).
        scale: softmax scale; defaults to D ** -0.5.
        key_lengths: None (every query attends to all N_kv keys), or an integer tensor (B,)
            on q's device: every query of sample b attends to its keys 0 .. key_lengths[b] - 1
            only (padded captions). Each length in [1, N_kv], checked where the lengths are on
            the host (on a GPU, reading them would make every call wait for the device). Keys
            past a length are never read, so their values do not matter, and their gradients
            are exactly zero.

    Returns:
        (B, H, N_q, D) tensor in q's dtype. Differentiable with respect to q, k and v.
    """
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, N, D); got {shapes}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, H, N_kv, D); got {shapes}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k and v must match q in batch, heads and head dim; got {shapes}")
    if k.shape[2] == 0:
        raise ValueError(f"k and v need at least one key: a softmax over none is undefined; got {shapes}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"flash_attention supports float16, bfloat16 and float32, not {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on the same device")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported")
    if not q.is_cuda and not _INTERPRET:
        raise RuntimeError("flash_attention needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "importing this module, to run the kernels on the CPU interpreter)")
    if key_lengths is not None:
        # A wrong length would not fail in the kernel, it would silently read or drop keys: the
        # model file's one check, which reads the values where they live on the host.
        check_key_lengths(key_lengths, q, k)
        key_lengths = key_lengths.to(torch.int32).contiguous()  # (B,) as the kernels read it
    sm_scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return FlashAttentionFunction.apply(q, k, v, sm_scale, key_lengths)
