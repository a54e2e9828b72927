"""`python -m lowbit quantize|info` on files: a tiny SDXL-structure UNet, and bad inputs that must be rejected
with a clear message and without writing anything."""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file


def lowbit(*args):
    return subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_unet_file(tmp_path_factory):
    from helpers.fixtures import tiny_sdxl_unet
    path = tmp_path_factory.mktemp("cli") / "tiny_unet.safetensors"
    save_file({k: v.half().contiguous() for k, v in tiny_sdxl_unet(0).state_dict().items()}, str(path))
    return path


def test_quantize_then_info(tiny_unet_file, tmp_path):
    out = tmp_path / "tiny_w4.safetensors"
    r = lowbit("quantize", "--method", "rtn", "--bits", 4, "--group-size", 64, tiny_unet_file, out)
    assert r.returncode == 0, r.stderr
    info = json.loads(lowbit("info", out).stdout)
    assert info["method"] == "rtn" and info["arch"] == "sdxl-family" and info["quantized_layers"] == 181
    assert abs(info["bits_per_weight"] - (4 + 24 / 64)) < 0.1
    assert info["total_bytes"] < 0.35 * info["fp16_bytes"]
    again = tmp_path / "again.safetensors"
    assert lowbit("quantize", "--bits", 4, "--group-size", 64, tiny_unet_file, again).returncode == 0
    assert out.read_bytes() == again.read_bytes()  # deterministic


def test_layers_pattern_chooses_the_layers(tiny_unet_file, tmp_path):
    out = tmp_path / "attn.safetensors"
    r = lowbit("quantize", "--bits", 8, "--group-size", 0, "--layers", r"attn1\.to_q$", tiny_unet_file, out)
    assert r.returncode == 0, r.stderr
    from lowbit.quant_core.fileformat import read_header
    names = sorted(read_header(out)["layers"])
    assert names and all(n.endswith("attn1.to_q") for n in names)
    bad = lowbit("quantize", "--layers", "no_such_layer", tiny_unet_file, tmp_path / "none.safetensors")
    assert bad.returncode == 2 and "matches none" in bad.stderr and not (tmp_path / "none.safetensors").exists()


def test_auto_meets_a_file_size_target(tiny_unet_file, tmp_path):
    """Data-free auto at a file size: the written file is within 1% of it (the tiny UNet's header is ~7% of the
    file, so this also checks the header estimate; at SDXL size `bench allocation` measures it)."""
    out = tmp_path / "auto.safetensors"
    r = lowbit("quantize", "--method", "auto", "--target-gb", 0.0035, "--candidates", "rtn2,rtn4,rtn8,fp16",
               tiny_unet_file, out)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size == pytest.approx(0.0035e9, rel=0.01)
    assert len(json.loads(lowbit("info", out).stdout)["formats"]) > 1  # a mix of formats
    r = lowbit("quantize", "--method", "auto", "--target-gb", 0.001, tiny_unet_file, tmp_path / "small.safetensors")
    assert r.returncode == 2 and "unreachable" in r.stderr and not (tmp_path / "small.safetensors").exists()


def test_keep_clip_vae_writes_a_one_file_checkpoint(tiny_unet_file, tmp_path):
    """--keep-clip-vae stores the checkpoint's text encoder and VAE tensors (16-bit, their own keys) beside the
    quantized UNet, which is unchanged; a UNet-only input is refused, nothing written."""
    from safetensors.torch import load_file
    from lowbit.quant_core.fileformat import load
    unet = load_file(str(tiny_unet_file))
    extra = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.randn(8),
             "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3, dtype=torch.float64),
             "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    checkpoint = tmp_path / "checkpoint.safetensors"
    save_file({**{f"model.diffusion_model.{k}": v for k, v in unet.items()}, **extra}, str(checkpoint))
    one = tmp_path / "one.safetensors"
    r = lowbit("quantize", "--bits", 4, "--keep-clip-vae", checkpoint, one)
    assert r.returncode == 0, r.stderr
    f = load(one)
    assert f.bundled_parts == ["clip", "vae"] and set(f.bundled) == set(extra)
    for k, t in extra.items():
        assert torch.equal(f.bundled[k], t.half() if t.is_floating_point() else t)
    # the UNet part is the UNet-only file's: every tensor outside the quantized layers, as stored
    assert f.dense.keys() == {k for k in unet if k.rsplit(".", 1)[0] not in f.layers}
    assert all(torch.equal(f.dense[k], unet[k]) for k in f.dense)
    assert json.loads(lowbit("info", one).stdout)["bundled_bytes"]["vae"] == 3 * 8 * 9 * 2
    r = lowbit("quantize", "--keep-clip-vae", tiny_unet_file, tmp_path / "none.safetensors")
    assert r.returncode == 2 and "has no clip and vae" in r.stderr and not (tmp_path / "none.safetensors").exists()


def test_existing_output_is_not_overwritten(tiny_unet_file, tmp_path):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    r = lowbit("quantize", "--bits", 8, "--group-size", 0, tiny_unet_file, out)
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert out.read_bytes() == b"keep me"


def _assert_rejected(src, tmp_path, *messages):
    out = tmp_path / "out.safetensors"
    r = lowbit("quantize", "--bits", 4, src, out)
    assert r.returncode == 2, r.stderr
    for m in messages:
        assert m in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_sd15_checkpoint_is_rejected(sd15_unet, tmp_path):
    _assert_rejected(sd15_unet, tmp_path, "SD1.x", "SDXL")


def test_pickle_renamed_safetensors_is_rejected(tmp_path):
    fake = tmp_path / "model.safetensors"
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)}, fake)
    _assert_rejected(fake, tmp_path, "pickle", "never loads pickles")


def test_truncated_file_is_rejected(tiny_unet_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = tiny_unet_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _assert_rejected(cut, tmp_path, "truncated")


def test_nan_weights_are_rejected(tmp_path):
    from helpers.fixtures import tiny_sdxl_unet
    sd = {k: v.half().contiguous() for k, v in tiny_sdxl_unet(0).state_dict().items()}
    sd["out.2.weight"][0, 0, 0, 0] = math.nan
    bad = tmp_path / "nan.safetensors"
    save_file(sd, str(bad))
    _assert_rejected(bad, tmp_path, "NaN")


def test_unknown_format_version_is_rejected_by_info(tiny_unet_file, tmp_path):
    out = tmp_path / "w8.safetensors"
    assert lowbit("quantize", "--bits", 8, "--group-size", 0, tiny_unet_file, out).returncode == 0
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'\\"format_version\\": 1', b'\\"format_version\\": 7')
    assert len(header) == n
    out.write_bytes(raw[:8] + header + raw[8 + n:])
    r = lowbit("info", out)
    assert r.returncode == 2 and "format version 7" in r.stderr and "update" in r.stderr


@pytest.fixture(scope="module")
def testbed_record(tmp_path_factory):
    """A calibration record of the trained testbed: 2 prompts, 4 steps of its own sampler (8 UNet calls)."""
    from lowbit.quant_core.calib.record import record_unet_calls
    from lowbit.testbed.data import in_domain_prompts
    from lowbit.testbed.model import load_testbed
    from lowbit.testbed.sample import sample
    unet, text_encoder, tokenizer, _ = load_testbed()
    prompts = in_domain_prompts(2, seed=5)
    record = record_unet_calls(unet, lambda: sample(unet, text_encoder, tokenizer, prompts, seed=5, steps=4),
                               {"prompts": prompts, "steps": 4, "seed": 5})
    return record.save(tmp_path_factory.mktemp("calib") / "testbed_record.safetensors")


def test_calibrated_methods_from_the_command_line(testbed_record, tmp_path):
    """--calib builds the testbed's UNet with ComfyUI's model classes and replays the record: DGQ W8A8 and RTN W4
    with adaround rounding on the middle block give files whose codes differ from the data-free ones on the same
    grid, deterministically; without --calib they are refused and nothing is written."""
    from lowbit.quant_core.fileformat import load
    from lowbit.testbed.model import TESTBED_WEIGHTS
    middle = r"middle_block\.0\."
    plain, rounded, again = (tmp_path / f"{n}.safetensors" for n in ("plain", "rounded", "again"))
    common = ["--bits", 4, "--group-size", 0, "--layers", middle]
    assert lowbit("quantize", *common, TESTBED_WEIGHTS, plain).returncode == 0
    for out in (rounded, again):
        r = lowbit("quantize", *common, "--weight-rounding", "adaround", "--reconstruction-iterations", 50,
                   "--calib", testbed_record, TESTBED_WEIGHTS, out)
        assert r.returncode == 0, r.stderr[-2000:]
    assert rounded.read_bytes() == again.read_bytes()
    plain_layers, rounded_layers = load(plain).layers, load(rounded).layers
    assert sorted(plain_layers) == sorted(rounded_layers) and len(plain_layers) == 2  # in_layers.2, out_layers.3
    for name, layer in rounded_layers.items():
        assert torch.equal(layer.scale, plain_layers[name].scale)
    assert any(not torch.equal(layer.qweight, plain_layers[name].qweight) for name, layer in rounded_layers.items())
    dgq = tmp_path / "dgq.safetensors"
    r = lowbit("quantize", "--method", "dgq", "--bits", 8, "--layers", middle, "--calib", testbed_record,
               TESTBED_WEIGHTS, dgq)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(lowbit("info", dgq).stdout)
    assert info["method"] == "dgq" and info["quantized_layers"] == 2 and info["activation"]
    refused = tmp_path / "refused.safetensors"
    r = lowbit("quantize", "--method", "dgq", TESTBED_WEIGHTS, refused)
    assert r.returncode != 0 and "--calib" in r.stderr and not refused.exists()
