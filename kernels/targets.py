"""Compile every Triton kernel of the pack for the GPU generations users have, on any machine (no GPU needed).

Triton compiles ahead of time for a named target: `triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", 75, 32), options=...)`, the same API on Triton 3.6 (GPU machines) and 3.9 (here). It
goes down to the cubin with the ptxas bundled in Triton's wheel, so ptxas errors show up too. From the result we
read the shared memory the kernel asks for at launch (`metadata.shared`, which Triton checks against the
device's per-block limit). The bundled cuobjdump gives the registers, stack (spills) and static shared memory
ptxas assigned. `CompiledKernel.n_regs` is only filled in once the binary is loaded on a GPU, so we use
cuobjdump.

`cases()` lists each kernel with each tile configuration it can launch with: the autotune lists in tiles.py and
int8_gemm.py, and the fixed tiles of the other launchers, each with representative constexprs.
`compile_matrix()` compiles them for TARGETS in worker processes and returns one row per (case, target).
`python -m lowbit.kernels.targets` prints the matrix; tests/test_kernel_targets.py checks it.
"""
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from . import tiles

# compute capability -> the cards users have
TARGETS = {(7, 5): "RTX 20 / T4", (8, 0): "A100", (8, 6): "RTX 30", (8, 9): "RTX 40", (9, 0): "H100 / H200"}

_TRITON_TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class Case:
    """One kernel compiled with one tile configuration and one set of constexprs."""
    module: str          # module of lowbit.kernels holding the kernel
    kernel: str          # name of the @triton.jit function
    path: str            # dispatch path that launches it: "weight_only" or "int8"
    dtype: str           # activation dtype the launch serves ("float16", "bfloat16", "float32")
    config: str          # tile label
    variant: str         # constexpr label
    pointers: tuple      # ((argument, Triton element type), ...); the other non-constexpr arguments are i32
    constexprs: tuple    # ((argument, value), ...)
    num_warps: int = 4
    num_stages: int = 3  # Triton's default, for launches without an explicit config
    autotune: tuple = ()  # (operand argument, weight-tile bytes) for tiles.shared_bound when the config is tuned

    @property
    def label(self):
        return f"{self.kernel} [{self.config}] {self.variant}"


def config_label(config) -> str:
    """'BMxBNxBK wW sS' of a GEMM triton.Config."""
    k = config.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{config.num_warps} s{config.num_stages}"


def _tuned(config, **constexprs):
    """Case fields of an autotune config: its block sizes join the constexprs, warps and stages the options."""
    return dict(config=config_label(config), constexprs=tuple({**config.kwargs, **constexprs}.items()),
                num_warps=config.num_warps, num_stages=config.num_stages)


def _weight_only_gemm_cases():
    # Every tile config compiles once per target. The constexprs change from config to config so that each
    # target also sees fp16 and bf16, 3-, 4- and 8-bit codes, 2, 3 and 4 codebooks, and split-K 1 and 4 (fp32
    # partial sums). Compiling every combination would take about 10 minutes on 2 cores, mostly in ptxas.
    # The dispatcher runs the fused GEMMs for small M only (SMALL_M_CONFIGS); the large-M family is reachable
    # through the kernels' Python API.
    out = []
    for family, configs in (("small", tiles.SMALL_M_CONFIGS), ("large", tiles.LARGE_M_CONFIGS)):
        for i, config in enumerate(configs):
            dtype = ("float16", "bfloat16")[i % 2]
            split = 4 if family == "small" and i % 2 else 1
            bits = (4, 3, 4, 8)[i % 4]
            books = (4, 3, 2)[i % 3]
            x = _TRITON_TYPE[dtype]
            common = {"x_ptr": x, "y_ptr": "fp32" if split > 1 else x, "scale_ptr": x, "bias_ptr": x}
            out.append(Case("affine_gemm", "_affine_gemm_kernel", "weight_only", dtype,
                            variant=f"{x} bits{bits} split{split}", autotune=("x_ptr", 4),
                            pointers=tuple({**common, "q_ptr": "u8", "wscale_ptr": "fp16", "wzero_ptr": "u8"}.items()),
                            **_tuned(config, BITS=bits, HAS_SCALE=False, HAS_BIAS=True, SPLIT_K=split)))
            out.append(Case("vq_gemm", "_vq_gemm_kernel", "weight_only", dtype,
                            variant=f"{x} books{books} split{split}", autotune=("x_ptr", 4),
                            pointers=tuple({**common, "scale_ptr": "fp16", "codes_ptr": "u8",
                                            "codebooks_ptr": "fp16"}.items()),
                            **_tuned(config, NUM_BOOKS=books, G=8, HAS_SCALE=True, HAS_BIAS=True, SPLIT_K=split)))
    return out


def _int8_cases():
    from .int8_gemm import _INT8_CONFIGS
    from ..quant_core.reference import weight_offset
    out = []
    for i, config in enumerate(_INT8_CONFIGS):
        dtype, bits = (("float16", 8), ("float32", 4), ("bfloat16", 8))[i % 3]
        y = _TRITON_TYPE[dtype]
        out.append(Case("int8_gemm", "_int8_gemm_kernel", "int8", dtype, variant=f"{y} out w{bits}a8",
                        autotune=("xq_ptr", 1),
                        pointers=(("xq_ptr", "i8"), ("xsum_ptr", "i32"), ("sx_ptr", "fp32"), ("zx_ptr", "i32"),
                                  ("q_ptr", "u8"), ("sw_ptr", "fp16"), ("zw_ptr", "u8"), ("wsum_ptr", "i32"),
                                  ("bias_ptr", y), ("y_ptr", y)),
                        **_tuned(config, BITS=bits, W_OFFSET=weight_offset(bits), HAS_BIAS=True)))
    return out


def _fixed_tile_cases():
    """Kernels launched with fixed tiles: the defaults of their Python launchers."""
    out = []
    for dtype, perm in (("float16", False), ("bfloat16", True), ("float32", True)):
        x = _TRITON_TYPE[dtype]
        perm_ptr = "i32" if perm else x  # without a permutation the launcher passes x as a placeholder
        meta = dict(config="32x128 w4 s3", variant=f"{x} perm={perm}",
                    constexprs=(("QMAX", 255), ("HAS_PERM", perm), ("BLOCK_M", 32), ("BLOCK_K", 128)))
        out.append(Case("act_quant", "_quantize_static_kernel", "int8", dtype, **meta,
                        pointers=(("x_ptr", x), ("perm_ptr", perm_ptr), ("scale_ptr", "fp32"), ("zero_ptr", "i32"),
                                  ("xq_ptr", "i8"), ("xsum_ptr", "i32"))))
        out.append(Case("act_quant", "_quantize_dynamic_rows_kernel", "int8", dtype, **meta,
                        pointers=(("x_ptr", x), ("perm_ptr", perm_ptr), ("xq_ptr", "i8"), ("xsum_ptr", "i32"),
                                  ("scale_ptr", "fp32"), ("zero_ptr", "i32"))))
    for dtype, bits, books in (("float16", 4, 4), ("bfloat16", 3, 2)):
        x = _TRITON_TYPE[dtype]
        out.append(Case("affine_gemm", "_affine_decode_kernel", "weight_only", dtype, config="32x128 w4 s3",
                        variant=f"{x} bits{bits}",
                        pointers=(("q_ptr", "u8"), ("scale_ptr", "fp16"), ("zero_ptr", "u8"), ("out_ptr", x)),
                        constexprs=(("BITS", bits), ("BLOCK_N", 32), ("BLOCK_K", 128))))
        out.append(Case("vq_gemm", "_vq_decode_kernel", "weight_only", dtype, config="16x32 w4 s3",
                        variant=f"{x} books{books}",
                        pointers=(("codes_ptr", "u8"), ("codebooks_ptr", "fp16"), ("scale_ptr", "fp16"),
                                  ("out_ptr", x)),
                        constexprs=(("NUM_BOOKS", books), ("G", 8), ("BLOCK_N", 16), ("BLOCK_GROUPS", 32))))
    return out


def cases():
    return _weight_only_gemm_cases() + _int8_cases() + _fixed_tile_cases()


# ---- compiling one case --------------------------------------------------------------------------------------

def _source(fn, case):
    import triton
    constexprs = dict(case.constexprs)
    pointers = dict(case.pointers)
    unknown = (set(constexprs) | set(pointers)) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{case.kernel} has no arguments {sorted(unknown)}: update kernels/targets.py")
    signature = {name: "constexpr" if name in constexprs else "*" + pointers[name] if name in pointers else "i32"
                 for name in fn.arg_names}
    # torch allocations are 16-byte aligned and Triton's launcher tells the compiler so; without the hint the
    # loads would not vectorize and the register counts would not be the ones users get
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in pointers}
    try:
        return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    except TypeError:  # Triton before 3.2 called them `constants`
        return triton.compiler.ASTSource(fn=fn, signature=signature, constants=constexprs, attrs=attrs)


def _cuobjdump():
    import triton
    try:
        from triton import knobs  # Triton 3.4 and later
        return knobs.nvidia.cuobjdump.path
    except Exception:
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return path if os.path.exists(path) else None


def _resource_usage(cubin: bytes, kernel: str) -> dict:
    """{'regs', 'stack', 'static_shared'} of `kernel` in a cubin, from `cuobjdump -res-usage`; {} without it."""
    tool = _cuobjdump()
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
    match = re.search(rf"Function {re.escape(kernel)}:\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    return dict(zip(("regs", "stack", "static_shared"), map(int, match.groups()))) if match else {}


def _diagnostic(log: str, error: Exception) -> str:
    """The MLIR diagnostic behind a failed pass pipeline (the exception itself only says that it failed),
    cut before the tensor type it names, which differs from config to config."""
    for line in log.splitlines():
        if "error:" in line:
            return line.split("error:", 1)[1].split(", but got")[0].strip()[:160]
    lines = str(error).strip().splitlines()
    return lines[-1][:160] if lines else ""


def compile_case(case: Case, capability) -> dict:
    """Compile one case for one compute capability: one row of the matrix, 'error' set when it fails."""
    import triton
    from triton.backends.compiler import GPUTarget
    fn = getattr(importlib.import_module(f"{__package__}.{case.module}"), case.kernel)
    row = {"kernel": case.kernel, "config": case.config, "variant": case.variant, "path": case.path,
           "dtype": case.dtype, "target": "sm_%d%d" % tuple(capability), "error": None}
    start = time.perf_counter()
    # MLIR writes its diagnostics to file descriptor 2, not into the exception: catch them there
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
            compiled = triton.compile(_source(fn, case), target=target,
                                      options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        except Exception as e:
            compiled, error = None, e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if compiled is None:
            log.seek(0)
            row["error"] = f"{type(error).__name__}: {_diagnostic(log.read(), error)}"
            return row
    row["shared"] = compiled.metadata.shared
    row.update(_resource_usage(compiled.asm["cubin"], case.kernel))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _compile_job(job):
    return compile_case(*job)


def _worker_setup():
    # Triton 3.9 warns once per process that its fp-fusion default will change; the kernels are written for
    # the current default (fusion on), which is what Triton 3.6 does too
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def compile_matrix(case_list=None, targets=TARGETS, workers=None) -> list:
    """Rows of compile_case for every case and target, compiled in worker processes (spawned: a fresh
    interpreter, whatever the parent has imported). Triton's on-disk cache makes a second run fast."""
    jobs = [(case, cap) for case in (cases() if case_list is None else case_list) for cap in targets]
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_setup) as pool:
        return list(pool.map(_compile_job, jobs))


def format_matrix(rows) -> str:
    """One line per case: 'shared KiB/registers' per target ('+N' stack bytes where ptxas spilled, 'pruned'
    where the row says so), then one line per kernel and target that fails to compile."""
    targets = sorted({r["target"] for r in rows})
    by_case = {}
    for r in rows:
        by_case.setdefault(f"{r['kernel']} [{r['config']}] {r['variant']}", {})[r["target"]] = r
    width = max(map(len, by_case))
    lines = [f"{'kernel [tiles] constexprs':{width}}" + "".join(f"{t:>20}" for t in targets),
             f"{'':{width}}" + "".join(f"{'smemKiB/regs+stack':>20}" for _ in targets)]
    for label, per_target in by_case.items():
        cells = []
        for t in targets:
            r = per_target.get(t)
            if r is None or r["error"]:
                cell = "-" if r is None else "FAILS"
            else:
                cell = f"{r['shared'] / 1024:g}/{r.get('regs', '?')}" + (f"+{r['stack']}" if r.get("stack") else "")
                cell = ("pruned " if r.get("pruned") else "") + cell
            cells.append(f"{cell:>20}")
        lines.append(f"{label:{width}}" + "".join(cells))
    failures = {}
    for r in rows:
        if r["error"]:
            failures.setdefault((r["kernel"], r["target"]), r["error"])
    lines += [f"FAILS {kernel} on {target}: {error}" for (kernel, target), error in sorted(failures.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    start = time.perf_counter()
    matrix = compile_matrix()
    print(format_matrix(matrix))
    print(f"{len(matrix)} compilations in {time.perf_counter() - start:.0f} s", file=sys.stderr)
