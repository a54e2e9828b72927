"""Method auto (mixed precision): the exact allocation, targets, determinism, the file round trip, and on the trained
testbed that allocating formats beats a uniform format at the same stored bits."""
import copy
import itertools
import json

import numpy as np
import pytest
import torch

from lowbit.quant_core import fileformat
from lowbit.quant_core.allocation import allocate, bits_table, parse_candidates
from lowbit.quant_core.api import quantize
from lowbit.quant_core.errors import LowBitError
from lowbit.quant_core.methods import config_from, get_method
from lowbit.quant_core.qlayers import quantized_layers, set_submodule
from lowbit.quant_core.sensitivity import layer_sensitivities, spearman

from helpers.fixtures import tiny_unet_inputs


def test_allocation_is_the_exact_knapsack_optimum():
    """Against brute force over every assignment of 3 formats to 6 layers, at several budgets: the DP's summed
    sensitivity equals the best feasible one (a layer's bits are rounded up to 1/200000 of the budget, which cannot
    change the optimum here: the instances' bit totals differ by far more)."""
    formats = parse_candidates("rtn2,rtn4,rtn8")
    shapes = [(32, 64), (64, 64), (16, 128), (48, 32), (64, 128), (8, 256)]
    bits = bits_table(shapes, formats)
    rng = np.random.default_rng(0)
    for _ in range(5):
        sens = np.sort(rng.random((len(shapes), len(formats))), axis=1)[:, ::-1].copy()  # more bits, less error
        for target in (2.5, 3.7, 5.0, 7.9):
            budget = target * sum(o * k for o, k in shapes)
            best = min((sum(sens[i, j] for i, j in enumerate(pick)), pick)
                       for pick in itertools.product(range(3), repeat=len(shapes))
                       if sum(bits[i, j] for i, j in enumerate(pick)) <= budget)
            result = allocate(bits, sens, budget, formats)
            assert result.sensitivity == pytest.approx(best[0], rel=1e-12)
            assert result.stored_bits <= budget  # never above the target


def test_candidates_and_targets_are_validated():
    with pytest.raises(LowBitError, match="unknown candidate format 'int4'"):
        config_from("auto", candidates="vq3,int4")
    with pytest.raises(LowBitError, match="unreachable"):
        config_from("auto", target_bits=17)
    unet = tiny_unet()
    with pytest.raises(LowBitError, match="unreachable with candidates rtn4,rtn8|bits/weight"):
        quantize(copy.deepcopy(unet), config_from("auto", target_bits=2.0, candidates="rtn4,rtn8"))
    with pytest.raises(LowBitError, match="unreachable"):
        quantize(copy.deepcopy(unet), config_from("auto", target_bits=12.0, candidates="rtn4,rtn8"))


def tiny_unet():
    from helpers.fixtures import tiny_sdxl_unet
    return tiny_sdxl_unet(seed=0)


def _bits_per_weight(unet) -> float:
    layers = quantized_layers(unet).values()
    return 8 * sum(m.packed_bytes() for m in layers) / sum(m.weight_shape.numel() for m in layers)


def test_data_free_auto_meets_the_target_is_deterministic_and_round_trips(tmp_path):
    unet = tiny_unet()
    config = config_from("auto", target_bits=4.5, candidates="vq2,rtn2,rtn4,rtn8,fp16", fast=True)
    first = quantize(copy.deepcopy(unet), config)
    second = quantize(copy.deepcopy(unet), config)
    assert _bits_per_weight(first) == pytest.approx(4.5, rel=0.01) and _bits_per_weight(first) <= 4.5 * 1.001
    names = {n: m.allocation["format"] for n, m in quantized_layers(first).items()}
    assert names == {n: m.allocation["format"] for n, m in quantized_layers(second).items()}
    assert len(set(names.values())) > 1, names  # a real mix, not one format
    # every layer records its format, stored bits and each candidate's sensitivity
    for name, m in quantized_layers(first).items():
        assert m.allocation["stored_bits"] == 8 * m.packed_bytes()
        errors = {f: e["weight"] for f, e in m.allocation["sensitivity"].items()}
        assert errors["rtn2"] > errors["rtn4"] > errors["rtn8"] > errors["fp16"] >= 0, (name, errors)
    paths = []
    for i, model in enumerate((first, second)):
        tensors, table = fileformat.unet_tensors(model)
        header = fileformat.Header("auto", get_method("auto").describe(config)).to_json(table)
        paths.append(fileformat.save(tmp_path / f"auto{i}.safetensors", tensors, header))
    assert open(paths[0], "rb").read() == open(paths[1], "rb").read()  # same inputs, same file
    loaded = fileformat.load(paths[0])
    assert {n: l.allocation["format"] for n, l in loaded.layers.items()} == names
    summary = fileformat.summarize(paths[0])
    assert sum(f["layers"] for f in summary["formats"].values()) == len(names)
    assert summary["bits_per_weight"] == pytest.approx(_bits_per_weight(first), abs=1e-3)
    rebuilt = copy.deepcopy(unet)
    for name, layer in loaded.layers.items():
        set_submodule(rebuilt, name, layer)
    inputs = tiny_unet_inputs()
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs), first(**inputs))


def test_measured_sensitivity_is_the_unet_output_error_of_that_layer_alone(tiny_unet_record):
    unet, record = tiny_unet_record
    formats = parse_candidates("rtn2,rtn8")
    name = "output_blocks.0.1.transformer_blocks.0.ff.net.2"
    layers = {name: unet.get_submodule(name)}
    table = layer_sensitivities(unet, layers, formats, record, "measured", calls=2, rows=0)
    from lowbit.quant_core.sensitivity import spread_calls
    calls = spread_calls(record.inputs, 2, 0)
    with torch.no_grad():
        reference = [unet(**c) for c in calls]
        quantized = copy.deepcopy(unet)
        quantize(quantized, config_from("rtn", bits=2, group_size=128), layers=name.replace(".", r"\.") + "$")
        expected = sum((quantized(**c) - r).pow(2).sum().item() for c, r in zip(calls, reference)) / \
            sum(r.numel() for r in reference)
    assert table[name]["rtn2"]["measured"] == pytest.approx(expected, rel=1e-4)
    assert table[name]["rtn8"]["measured"] < table[name]["rtn2"]["measured"] / 100  # ~4⁶ less weight error


@pytest.fixture
def tiny_unet_record():
    from lowbit.quant_core.calib.record import CalibrationRecord
    unet = tiny_unet()
    calls = [dict(tiny_unet_inputs(seed=s), timesteps=torch.full((2,), float(t)))
             for s, t in enumerate((900, 500, 100))]
    return unet, CalibrationRecord(calls)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9487, abs=1e-4)


# ---- on the trained testbed ---------------------------------------------------------------------------------

def test_auto_beats_uniform_rtn4_at_the_same_stored_bits():
    """Calibrated auto (measured sensitivity on 4 calls of 4 rows, RTN candidates, no distillation: the cheap
    setting) against uniform RTN W4 g128 at the same stored bits (within 1%), on the testbed at the quality tests'
    half size. Measured on this machine (2026-12-07): uniform 30.1 dB / Fréchet 137, auto 48.0 dB / 2.5; with the
    Hessian proxy instead, auto lost (29.4 dB), which is why `measured` is the default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the measured numbers above; the setting is process-wide, so restored below
    try:
        _auto_against_uniform_rtn4()
    finally:
        torch.set_num_threads(threads)


def _auto_against_uniform_rtn4():
    from lowbit.bench.quality import load_testbed_run, quantized_copy, size_stats
    testbed = load_testbed_run(8, seed=0, steps=10, cfg=5.0)
    testbed.prompts = {"all": testbed.prompts["in_domain"] + testbed.prompts["held_out"]}
    reference = testbed.samples(testbed.unet)
    calibration = testbed.calibration(16)
    uniform = quantized_copy(testbed, config_from("rtn", bits=4, group_size=128), None)
    bits = size_stats(uniform)["bits_per_weight"]
    auto = quantized_copy(testbed, config_from("auto", target_bits=bits, candidates="rtn2,rtn3,rtn4,rtn8",
                                               sensitivity_calls=4, sensitivity_rows=4, distill_epochs=0),
                          calibration)
    assert size_stats(auto)["bits_per_weight"] == pytest.approx(bits, rel=0.01)
    scores = {name: testbed.metrics(testbed.samples(model), reference)["all"]
              for name, model in (("uniform", uniform), ("auto", auto))}
    print(json.dumps(scores))
    assert scores["auto"]["psnr"] > scores["uniform"]["psnr"] + 3
    assert scores["auto"]["frechet"] < scores["uniform"]["frechet"] / 2
