"""The LowBit file: one .safetensors holding a quantized SDXL UNet.

Tensors: for each quantized layer `<layer>.<packed tensor>` (per its layout) and `<layer>.bias`; every other
UNet tensor under its own key (16-bit). Keys are relative to the diffusion model (ComfyUI layout).
A one-file checkpoint also holds the text encoders and the VAE in 16 bits under the keys an SDXL checkpoint uses
(`conditioner.embedders.*`, `first_stage_model.*`; BUNDLE_PREFIXES), and its header lists them in "bundled".
Metadata: `lowbit` = JSON header (see README "File format"): format_version, arch, method, method_config,
unet_config, layers {name: {kind, layout, params, weight_shape, weight_dtype, bias, conv?}}, plus extras a
method stores (e.g. per-timestep activation parameters).
Reading validates the container byte-by-byte before any tensor is touched, never unpickles, and rejects
anything that is not a complete LowBit file of a version this code understands.
"""
import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from .errors import FileFormatError, LowBitError
from .qlayers import QuantizedLayer, layer_from_header
from .sdxl_shapes import uniform_bits_at_sdxl_shapes
from .sampling_settings import checked

FORMAT_VERSION = 1
DENSE_DTYPE = torch.float16  # storage of every tensor that is not quantized
META_KEY = "lowbit"
SUPPORTED_ARCHS = ("sdxl", "sdxl-refiner", "sdxl-family")
# what a one-file checkpoint bundles besides the UNet, by the key prefixes SDXL checkpoints store it under
BUNDLE_PREFIXES = {"clip": ("conditioner.", "cond_stage_model."), "vae": ("first_stage_model.",)}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path) -> dict:
    """Parse and sanity-check a safetensors container header without loading tensors."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
            (n,) = struct.unpack("<Q", head[:8]) if len(head) >= 8 else (0,)
            plausible = 0 < n <= min(size - 8, 100 * 2 ** 20) and head[8:9] == b"{"
            # a safetensors length can start with the same bytes as a pickle or zip: only an implausible
            # safetensors header is diagnosed as a pickle
            if not plausible and (head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")):
                raise FileFormatError(
                    f"{path} is a PyTorch pickle (.ckpt/.pt), not safetensors; LowBit never loads pickles: "
                    "convert it to .safetensors first (e.g. load it in ComfyUI and save with CheckpointSave)")
            if len(head) < 8:
                raise FileFormatError(f"{path} is empty or truncated (under 8 bytes); re-download or re-create it")
            f.seek(8)
            if not plausible:
                raise FileFormatError(f"{path} is not a safetensors file (bad header length {n}) or is truncated; "
                                      "pass a .safetensors file written by LowBit")
            raw = f.read(n)
    except OSError as e:
        raise FileFormatError(f"cannot read {path}: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FileFormatError(f"{path} is not a safetensors file (header is not JSON); pass a .safetensors "
                              "file written by LowBit") from None
    data_size = size - 8 - n
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            nbytes = math.prod(entry["shape"]) * _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise FileFormatError(f"{path}: malformed safetensors entry for '{key}'; the file is corrupt") from None
        if stop - begin != nbytes:
            raise FileFormatError(f"{path}: tensor '{key}' size does not match its shape; the file is corrupt")
        end = max(end, stop)
    if end > data_size:
        raise FileFormatError(f"{path} is truncated ({data_size} of {end} data bytes present); the download or "
                              "save was interrupted: re-create the file")
    return header


def tensor_bytes(st_header: dict) -> dict:
    return {k: math.prod(v["shape"]) * _DTYPE_BYTES[v["dtype"]] for k, v in st_header.items() if k != "__metadata__"}


def read_header(path) -> dict:
    """The LowBit header of a file, validated (version, arch, layer table)."""
    st = read_safetensors_header(path)
    meta = st.get("__metadata__") or {}
    if META_KEY not in meta:
        raise FileFormatError(
            f"{os.fspath(path)} is a safetensors file but not a LowBit file (no '{META_KEY}' metadata); for a "
            "regular checkpoint use the stock loaders, or quantize it with LowBitQuantizeUNet / "
            "`python -m lowbit quantize`")
    try:
        header = json.loads(meta[META_KEY])
    except json.JSONDecodeError:
        raise FileFormatError(f"{os.fspath(path)}: LowBit header is not valid JSON; the file is corrupt") from None
    version = header.get("format_version")
    if not isinstance(version, int):
        raise FileFormatError(f"{os.fspath(path)}: LowBit header has no integer format_version; the file is corrupt")
    if version > FORMAT_VERSION:
        raise FileFormatError(f"{os.fspath(path)} uses LowBit format version {version}, this LowBit reads up to "
                              f"{FORMAT_VERSION}: update the LowBit pack")
    if version < 1:
        raise FileFormatError(f"{os.fspath(path)}: unknown LowBit format version {version}; re-create the file")
    if header.get("arch") not in SUPPORTED_ARCHS:
        raise FileFormatError(f"{os.fspath(path)}: architecture {header.get('arch')!r} is not supported "
                              f"({', '.join(SUPPORTED_ARCHS)}); this file is not an SDXL LowBit file")
    if not isinstance(header.get("layers"), dict):
        raise FileFormatError(f"{os.fspath(path)}: LowBit header has no layer table; the file is corrupt")
    if header.get("sampling") is not None:
        try:
            checked(header["sampling"])
        except FileFormatError as e:
            raise FileFormatError(f"{os.fspath(path)}: {e}") from None
    return header


@dataclass
class LowBitFile:
    header: dict
    layers: dict = field(default_factory=dict)   # name -> QuantizedLayer
    dense: dict = field(default_factory=dict)    # key -> tensor (16-bit rest of the UNet)
    bundled: dict = field(default_factory=dict)  # checkpoint key -> tensor (one-file checkpoints: CLIP, VAE)

    @property
    def info(self) -> "Header":
        return Header.of(self.header)

    @property
    def bundled_parts(self) -> list:
        """What a one-file checkpoint holds besides the UNet ("clip", "vae"); empty for a UNet file."""
        return list(self.header.get("bundled") or [])


def load(path, device="cpu") -> LowBitFile:
    """Read and validate a LowBit file; quantized layers come back as modules."""
    header = read_header(path)
    try:
        tensors = load_file(os.fspath(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise FileFormatError(f"{os.fspath(path)}: cannot read tensors ({e}); the file is corrupt") from None
    bundled = {k: tensors.pop(k) for k in [k for k in tensors if bundle_part(k)]}
    missing = set(header.get("bundled") or ()) - {bundle_part(k) for k in bundled}
    if missing or set(map(bundle_part, bundled)) - set(header.get("bundled") or ()):
        raise FileFormatError(f"{os.fspath(path)}: the header bundles {header.get('bundled') or 'nothing'} but the "
                              f"file holds {sorted(set(map(bundle_part, bundled))) or 'no'} CLIP/VAE tensors; the "
                              "file is corrupt")
    layers = {}
    for name, entry in sorted(header["layers"].items()):
        prefix = name + "."
        own = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]
               if "." not in k[len(prefix):]}
        layers[name] = layer_from_header(entry, own, where=f"{os.fspath(path)}: layer {name}")
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FileFormatError(f"{os.fspath(path)}: tensor '{key}' holds NaN/inf; re-create the file from a "
                                  "finite model")
    return LowBitFile(header, layers, tensors, bundled)


def bundle(tensors: dict, header: dict, parts: dict) -> tuple[dict, dict]:
    """(tensors, header) of a one-file checkpoint: the UNet's plus `parts` ({"clip"/"vae": {checkpoint key:
    tensor}}) stored in 16 bits under their keys, which must be those SDXL checkpoints use (BUNDLE_PREFIXES)."""
    out = dict(tensors)
    for part, sd in parts.items():
        wrong = [k for k in sd if bundle_part(k) != part]
        if part not in BUNDLE_PREFIXES or not sd or wrong:
            raise LowBitError(f"cannot bundle {part!r}: expected {', '.join(BUNDLE_PREFIXES)} tensors under "
                              f"{BUNDLE_PREFIXES.get(part)} (got {len(sd)} tensors, e.g. {wrong[:2]}); nothing was "
                              "written")
        for key, t in sd.items():
            t = t.detach().cpu()
            out[key] = (t.to(DENSE_DTYPE) if t.is_floating_point() else t).contiguous()
    return out, {**header, "bundled": sorted(parts)}


def bundle_part(key: str):
    """"clip" / "vae" for a checkpoint key of a bundled part (BUNDLE_PREFIXES), else None (a UNet key)."""
    return next((part for part, prefixes in BUNDLE_PREFIXES.items() if key.startswith(prefixes)), None)


def file_tensors(layers: dict, dense: dict, dense_dtype=DENSE_DTYPE) -> tuple[dict, dict]:
    """(tensors to save, header layer table) from quantized layers and the dense rest of the UNet."""
    table, tensors = {}, {}
    for name, m in layers.items():
        table[name] = m.header_entry()
        for tname, t in m.packed_tensors().items():
            tensors[f"{name}.{tname}"] = t.detach().cpu().contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to("cpu", dense_dtype).contiguous()
    for key, t in dense.items():
        # no extra copy of tensors already stored in 16 bits: on a CPU a full SDXL dense part is ~5 GB
        t = t.detach().cpu()
        tensors[key] = (t.to(dense_dtype) if t.is_floating_point() else t).contiguous()
    return tensors, table


def unet_tensors(unet: torch.nn.Module, dense_dtype=DENSE_DTYPE) -> tuple[dict, dict]:
    """file_tensors of a UNet module whose selected layers are QuantizedLayers."""
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, QuantizedLayer)}
    dense = {k: t for k, t in unet.state_dict().items() if k.rsplit(".", 1)[0] not in layers}
    return file_tensors(layers, dense, dense_dtype)


@dataclass(frozen=True)
class Header:
    """What a LowBit file says about its UNet besides the layer table and tensors; a LowBit MODEL carries the
    same (nodes), so loading, saving, comparing and `info` read one type."""
    method: str
    method_config: dict
    arch: str = "sdxl"
    unet_config: dict = field(default_factory=dict)
    model_class: Optional[str] = None  # the host model a loader must rebuild when not SDXL's ("lowbit-testbed")
    sampling: Optional[dict] = None    # prediction and noise schedule (lowbit.quant_core.sampling_settings)

    def to_json(self, layer_table: dict) -> dict:
        """The file's JSON header with this information and the layer table."""
        from .version import __version__
        header = {"format_version": FORMAT_VERSION, "arch": self.arch, "method": self.method,
                  "method_config": self.method_config, "unet_config": self.unet_config, "layers": layer_table,
                  "writer": f"lowbit {__version__}"}
        if self.sampling is not None:
            header["sampling"] = checked(self.sampling)
            header["model_type"] = self.sampling["prediction"]  # what format 1 files before "sampling" said
        if self.model_class is not None:
            header["model_class"] = self.model_class
        return header

    @classmethod
    def of(cls, header: dict) -> "Header":
        """The Header of a file's validated JSON header (read_header)."""
        sampling = header.get("sampling")
        if sampling is not None or header.get("model_type") is not None:
            sampling = checked(sampling, header.get("model_type"))
        return cls(header.get("method"), header.get("method_config") or {}, header["arch"],
                   header.get("unet_config") or {}, header.get("model_class"), sampling)


def atomic_write(path, write: Callable[[str], None], overwrite: bool = False) -> str:
    """The one way LowBit writes a file: write(tmp) fills a temporary file in the target's folder, which is
    synced and renamed over `path`, so a reader or an interrupt never sees half a file. Refuses to replace an
    existing file unless overwrite (nothing is written then)."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise LowBitError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite)")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_safetensors(path, tensors: dict, metadata: dict, overwrite: bool = False) -> str:
    """A safetensors file written with atomic_write."""
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite)


def save(path, tensors: dict, header: dict, overwrite: bool = False) -> str:
    """Write a LowBit file (atomic_write); refuse NaN/inf tensors and to replace a file unless overwrite."""
    header = dict(header, format_version=FORMAT_VERSION)
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LowBitError(f"tensor '{key}' holds NaN/inf: the model is broken; nothing was written")
    return save_safetensors(path, tensors, {META_KEY: json.dumps(header, sort_keys=True)}, overwrite)


def summarize(path) -> dict:
    """What `python -m lowbit info` prints: sizes and bits/weight counted from the stored tensors, and for
    activation-quantized files the per-timestep activation parameters (lowbit.quant_core.actquant.summary)."""
    st = read_safetensors_header(path)
    header = read_header(path)
    sizes = tensor_bytes(st)
    bundled = {}
    for key in [k for k in sizes if bundle_part(k)]:  # a one-file checkpoint's CLIP/VAE: not UNet sizes
        bundled[bundle_part(key)] = bundled.get(bundle_part(key), 0) + sizes.pop(key)
    shapes = {k: v["shape"] for k, v in st.items() if k in sizes}
    q_bytes = q_weights = 0
    logical_params = 0
    for name, entry in header["layers"].items():
        n = math.prod(entry["weight_shape"])
        q_weights += n
        logical_params += n
        q_bytes += sum(b for k, b in sizes.items() if k.startswith(name + ".") and k != f"{name}.bias")
    logical_params += sum(math.prod(s) for k, s in shapes.items()
                          if k.rsplit(".", 1)[0] not in header["layers"] or k.endswith(".bias"))
    summary = {"format_version": header["format_version"], "arch": header["arch"], "method": header.get("method"),
               "method_config": header.get("method_config"),
               "variant": (header.get("unet_config") or {}).get("variant"),
               "prediction": (header.get("sampling") or {}).get("prediction", header.get("model_type")),
               "layouts": sorted({e["layout"] for e in header["layers"].values()}),
               **size_summary(q_weights, q_bytes, logical_params, sum(sizes.values()), len(header["layers"]),
                              [(e["layout"], e["params"]) for e in header["layers"].values()])}
    if bundled:
        summary["bundled_bytes"] = bundled
    if len({format_name(e) for e in header["layers"].values()}) > 1:
        summary["formats"] = format_histogram(list(header["layers"].values()))
    from .actquant.summary import activation_summary  # the activation layers build on this module
    activation = activation_summary(path, header["layers"])
    if activation is not None:
        summary["activation"] = activation
    return summary


def format_name(entry: dict) -> str:
    """A layer's format: the candidate name a mixed-precision allocation chose, else its layout and params."""
    if entry.get("allocation"):
        return entry["allocation"]["format"]
    params = ",".join(f"{k}={v}" for k, v in sorted(entry["params"].items()))
    return f"{entry['layout']} {params}".strip()


def format_histogram(entries: list) -> dict:
    """{format: {"layers": count, "weights": share of the weights}} over header layer entries, most weights first."""
    counts, weights = {}, {}
    for entry in entries:
        name = format_name(entry)
        counts[name] = counts.get(name, 0) + 1
        weights[name] = weights.get(name, 0) + math.prod(entry["weight_shape"])
    total = sum(weights.values()) or 1
    return {name: {"layers": counts[name], "weights": round(weights[name] / total, 4)}
            for name in sorted(weights, key=lambda n: (-weights[n], n))}


def size_summary(quantized_params: int, quantized_bytes: int, total_params: int, total_bytes: int,
                 quantized_layers: int, formats: list) -> dict:
    """Bits/weight over quantized weights (every packed tensor counted), the same format's bits/weight on SDXL's
    layer shapes (lowbit.quant_core.sdxl_shapes; None for a mix of formats) and sizes against fp16."""
    return {"bits_per_weight": round(8 * quantized_bytes / quantized_params, 4) if quantized_params else None,
            "bits_per_weight_at_sdxl_shapes": uniform_bits_at_sdxl_shapes(formats) if formats else None,
            "quantized_layers": quantized_layers, "quantized_params": quantized_params,
            "total_params": total_params, "total_bytes": total_bytes, "fp16_bytes": 2 * total_params}


def module_summary(unet: torch.nn.Module) -> dict:
    """size_summary of an in-memory UNet (same numbers `summarize` gives for its saved file)."""
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, QuantizedLayer)}
    q_params = sum(math.prod(m.weight_shape) for m in layers.values())
    q_bytes = sum(m.packed_bytes() for m in layers.values())
    dense = [t for k, t in unet.state_dict().items() if k.rsplit(".", 1)[0] not in layers or k.endswith(".bias")]
    dense_params = sum(t.numel() for t in dense)
    dense_bytes = sum(t.numel() * min(t.element_size(), 2) if t.is_floating_point() else t.numel() * t.element_size()
                      for t in dense)  # saved as 16-bit
    return size_summary(q_params, q_bytes, q_params + dense_params, q_bytes + dense_bytes, len(layers),
                        [(m.layout.name, m.params) for m in layers.values()])
