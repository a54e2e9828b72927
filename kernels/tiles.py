"""Triton device functions shared by the GEMM and decode kernels, and the launcher of the weight-only GEMMs.

Only the language subset that behaves the same on Triton 3.6 (GPU machines) and 3.9 (here, under
TRITON_INTERPRET=1) is used: tl.load/store with masks, tl.where, tl.arange, tl.dot, tl.program_id.
"""
import os

import torch
import triton
import triton.language as tl


@triton.jit
def swizzled_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program `pid`, walking GROUP_M tile rows together so that the weight
    tiles a group needs are still in L2 when its neighbours ask for them."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    return pid_m, pid_n


@triton.jit
def load_packed_tile(q_ptr, row_bytes, offs_k, offs_n, k_limit, N, BITS: tl.constexpr):
    """int32 codes of a [BLOCK_K, BLOCK_N] tile of the transposed [N, K] code matrix packed by
    lowbit.quant_core.packing (value k of a row starts at bit k*BITS, little-endian). Entries outside
    k < k_limit, n < N read as 0."""
    bit = offs_k * BITS
    shift = (bit % 8)[:, None]
    mask = (offs_k[:, None] < k_limit) & (offs_n[None, :] < N)
    ptr = q_ptr + offs_n[None, :].to(tl.int64) * row_bytes + (bit // 8)[:, None]
    low = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    if BITS == 8:
        codes = low
    elif 8 % BITS == 0:
        # 1, 2 and 4 bits never cross a byte boundary
        codes = (low >> shift) & ((1 << BITS) - 1)
    else:
        # 3, 5, 6 bits may continue into the next byte, which lies in the same BITS-byte block of 8 values
        crosses = (shift + BITS) > 8
        high = tl.load(ptr + 1, mask=mask & crosses, other=0).to(tl.int32)
        codes = ((low | (high << 8)) >> shift) & ((1 << BITS) - 1)
    return codes


@triton.jit
def store_dense_weight(out_ptr, w, offs_k, offs_n, K, N, CIN, TAPS):
    """Store a [BLOCK_K, BLOCK_N] tile of the matrix view [N, K] (k = tap * CIN + c) into a dense weight
    laid out as PyTorch wants it: [N, K] for Linear (TAPS = 1), [N, CIN, kh, kw] for Conv2d. (The VQ decode
    writes its matrix view contiguously and permutes Conv2d weights afterwards (conv_layout): that was faster
    for VQ on an H200. The same change measured slower for int_affine in a run whose fp16 baseline was itself
    45% slower, so int_affine keeps this store until a cleaner measurement.)"""
    tap = offs_k // CIN
    chan = offs_k % CIN
    dest = offs_n[None, :].to(tl.int64) * K + (chan * TAPS + tap)[:, None]
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    tl.store(out_ptr + dest, w.to(out_ptr.dtype.element_ty), mask=mask)


def conv_layout(matrix: torch.Tensor, weight_shape) -> torch.Tensor:
    """A decoded matrix view [N, K] (k = tap·in + c) in the logical weight shape: itself for Linear, one
    permuting copy to [N, in, kh, kw] for Conv2d."""
    if len(weight_shape) == 2:
        return matrix
    n_out, cin, kh, kw = weight_shape
    return matrix.view(n_out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()


@triton.jit
def split_k_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[start, end) of the K slice that split `pid_k` of SPLIT_K reduces, in whole BLOCK_K steps."""
    blocks_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    start = pid_k * blocks_per_split * BLOCK_K
    end = tl.minimum(start + blocks_per_split * BLOCK_K, K)
    return start, end


@triton.jit
def weight_only_epilogue(acc, offs_m, offs_n, M, N, pid_k, y_ptr, stride_ym, scale_ptr, bias_ptr,
                         HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Finish a weight-only GEMM tile. With one split: y = acc * scale[n] + bias[n] in fp32, cast to y's
    dtype. With several: store the raw fp32 partial sum into workspace y[pid_k]; the launcher reduces the
    splits in a fixed order (deterministic, unlike atomics) and applies scale and bias."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        dest = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(dest, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        dest = y_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(dest, acc, mask=mask)


# Weight-only GEMM launch (shared by the int_affine and VQ kernels). Tile configurations: the large-M set
# is compute-bound (tensor-core tiles, deep pipelines), the small-M set is memory-bound (thin BLOCK_M,
# long BLOCK_K, split-K to fill the SMs).
SMALL_M = 160


def _config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


LARGE_M_CONFIGS = [_config(128, 128, 32, 4, 4), _config(128, 128, 64, 8, 3), _config(128, 256, 32, 8, 3),
                   _config(64, 128, 32, 4, 4), _config(128, 64, 32, 4, 4), _config(64, 64, 64, 4, 3)]
SMALL_M_CONFIGS = [_config(16, 64, 128, 4, 4), _config(16, 128, 64, 4, 4), _config(32, 64, 64, 4, 4),
                   _config(32, 128, 128, 4, 3), _config(16, 256, 64, 8, 3)]
TUNING_KEY = ["M", "N", "K", "SPLIT_K"]
# a layout's constexprs join the key when the kernel has them: a tile that suits 2 codebooks need not suit 4
LAYOUT_TUNING_KEY = ["NUM_BOOKS", "BITS"]


# ---- shared memory: prune the tile configs a GPU cannot launch ------------------------------------------------

# Shared memory one block may opt into (bytes), by compute capability: what Triton checks a kernel against
# before launching it. Recent torch reports it as shared_memory_per_block_optin; this table serves torch
# versions without it (2.11, on the GPU machine).
SHARED_PER_BLOCK = {(7, 5): 64 << 10, (8, 0): 163 << 10, (8, 6): 99 << 10, (8, 7): 163 << 10, (8, 9): 99 << 10,
                    (9, 0): 227 << 10}
SHARED_PER_BLOCK_DEFAULT = 99 << 10  # the smallest limit from sm_80 on, for a capability not in the table
# ptxas adds 1 KiB of static shared memory on sm_90 (the compile matrix shows it); the launch needs both
STATIC_SHARED_SLACK = 1 << 10


def shared_limit(capability) -> int:
    return SHARED_PER_BLOCK.get(tuple(capability), SHARED_PER_BLOCK_DEFAULT)


def device_shared_limit(device) -> int:
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or shared_limit((props.major, props.minor))


def shared_bound(config, a_bytes, b_bytes, out_bytes) -> int:
    """Upper bound of the shared memory a GEMM tile config gets from Triton (3.6 and 3.9 alike), fitted to and
    checked against the compile matrix (tests/test_kernel_targets.py): the activation tile, which the
    pipeliner may buffer num_stages deep, plus the weight tile staged once for tl.dot (the kernels decode it in
    registers; sm_75 stages it as fp32, hence b_bytes = 4 for the weight-only kernels), or the epilogue's
    output tile when that is larger."""
    m, n, k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    operands = config.num_stages * m * k * a_bytes + k * n * b_bytes
    return max(operands, m * n * out_bytes) + STATIC_SHARED_SLACK


def configs_that_fit(configs, limit, a_bytes, b_bytes, out_bytes) -> list:
    """The configs whose shared_bound fits `limit`; the smallest one if none does (the autotuner needs one)."""
    fits = [c for c in configs if shared_bound(c, a_bytes, b_bytes, out_bytes) <= limit]
    return fits or [min(configs, key=lambda c: shared_bound(c, a_bytes, b_bytes, out_bytes))]


def shared_memory_prune(activation_arg, b_bytes):
    """early_config_prune for triton.autotune (called as fn(configs, named_args, **kwargs) by Triton 3.6 and
    3.9): keeps the configs that fit the running GPU's shared memory per block. Configs that do not fit would
    only fail to launch (the autotuner skips them, after compiling them for nothing), or break the call when
    a single config is left."""
    def prune(configs, named_args, **kwargs):
        x, y = named_args[activation_arg], named_args["y_ptr"]
        return configs_that_fit(configs, device_shared_limit(y.device), x.element_size(), b_bytes,
                                y.element_size())
    return prune


WEIGHT_ONLY_PRUNE = {"early_config_prune": shared_memory_prune("x_ptr", 4)}


def quick_bench(kernel_call, quantiles):
    """Autotuning benchmark: 5 ms warm-up and 20 ms of timed calls per candidate instead of Triton's 25 + 100,
    so that a UNet's first step tunes its ~30 GEMM shapes in seconds (the candidates differ by far more than
    the noise left at this length)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def tuned_pair(kernel):
    """(small-M autotuner, large-M autotuner) of one weight-only GEMM kernel."""
    key = TUNING_KEY + [name for name in LAYOUT_TUNING_KEY if name in kernel.arg_names]
    return tuple(triton.autotune(configs, key=key, do_bench=quick_bench, prune_configs_by=WEIGHT_ONLY_PRUNE)(kernel)
                 for configs in (SMALL_M_CONFIGS, LARGE_M_CONFIGS))


def choose_split_k(M, N, K, device):
    """Split K for small M until about two waves of (16 x 64) tiles cover the SMs, keeping >= 256 of K
    per split so that each split still streams a useful stretch of weights."""
    if M > SMALL_M:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(M, 16) * triton.cdiv(N, 64)
    split = 1
    while split < 8 and tiles * split < 2 * sms and K // (2 * split) >= 256:
        split *= 2
    return split


def interpreting() -> bool:
    """Whether kernels run under the Triton interpreter (CPU), which cannot time autotuning candidates: the
    launchers then use INTERPRETER_CONFIG."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# the interpreter executes each program instance as numpy steps: few, large tiles keep it fast
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2}
INTERPRETER_DECODE_BLOCKS = (64, 64)  # (rows, K-columns or VQ groups) per decode program


def decode_blocks(block_a, block_b, gpu_default) -> tuple:
    """The decode launchers' tile: the caller's, else the GPU default or, under the interpreter, larger tiles."""
    default = INTERPRETER_DECODE_BLOCKS if interpreting() else gpu_default
    return block_a or default[0], block_b or default[1]


def launch_weight_only(kernel, tuned, x2, n_out, layout_args, layout_meta, scale, bias, config=None):
    """y[M, N] = (x2 @ Ŵᵀ) * scale[n] + bias[n] with one of the weight-only kernels.

    kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, M, N, K, stride_xm, stride_ym, *layout_args, **layout_meta,
    HAS_SCALE, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K); `tuned` is its tuned_pair.
    `config` (a dict of the block meta-parameters, SPLIT_K included) bypasses autotuning: the interpreter
    checks use it.
    """
    M, K = x2.shape
    if config is None and interpreting():
        config = {**INTERPRETER_CONFIG, "SPLIT_K": 1}
    split = config["SPLIT_K"] if config else choose_split_k(M, n_out, K, x2.device)
    if split == 1:
        out = torch.empty(M, n_out, device=x2.device, dtype=x2.dtype)
    else:
        out = torch.empty(split, M, n_out, device=x2.device, dtype=torch.float32)
    args = (x2, out, x2 if scale is None else scale, x2 if bias is None else bias, M, n_out, K, x2.stride(0),
            n_out, *layout_args)
    flags = {"HAS_SCALE": scale is not None, "HAS_BIAS": bias is not None, **layout_meta}

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]), split

    if config:
        kernel[grid](*args, **flags, **config)
    else:
        tuned[0 if M <= SMALL_M else 1][grid](*args, **flags, SPLIT_K=split)
    if split == 1:
        return out
    y = out.sum(0)
    if scale is not None:
        y = y * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)
