"""Weight rounding on a fixed int_affine grid: AdaRound block reconstruction and GPTQ for every int_affine method."""
import copy

import pytest
import torch
from torch import nn

from lowbit.quant_core.api import quantize, quantize_layers_of
from lowbit.quant_core.calib.record import CalibrationRecord, record_unet_calls
from lowbit.quant_core.errors import LowBitError
from lowbit.quant_core.fileformat import Header, save, unet_tensors
from lowbit.quant_core.methods.dgq import DGQConfig
from lowbit.quant_core.methods.rtn import RTN, RTNConfig
from lowbit.quant_core.weight_rounding.adaround import beta_at, unit_of
from lowbit.quant_core.weight_rounding.grid import Grid, stored_codes


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 96), nn.Linear(96, 32)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _correlated_inputs(n: int, seed: int) -> torch.Tensor:
    """Rows with a strongly anisotropic covariance (a few large directions), like real layer inputs."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(64, 64, generator=torch.Generator().manual_seed(99)) * torch.logspace(0, -2, 64)[:, None]
    return torch.randn(n, 64, generator=g) @ mixing


def test_adaround_lowers_held_out_layer_output_error_against_nearest():
    """A single Linear at 3 bits per channel: learned rounding on 8 calibration batches lowers the output error
    on held-out inputs from the same distribution. AdaRound's paper reports ~2x lower error than nearest at 3-4
    bits on correlated inputs; 0.6x is demanded (measured 0.32x here with 400 iterations), far outside run-to-run
    noise (the test is deterministic)."""
    torch.manual_seed(0)
    net = _TwoLayers().requires_grad_(False)
    record = CalibrationRecord([{"x": _correlated_inputs(128, seed)} for seed in range(8)])
    layers = {"fc1": net.fc1}
    config = dict(bits=3, group_size=0)
    nearest = quantize_layers_of(net, layers, RTNConfig(**config), record)["fc1"]
    learned = quantize_layers_of(net, layers, RTNConfig(**config, weight_rounding="adaround",
                                                        reconstruction_iterations=400), record)["fc1"]
    assert torch.equal(learned.scale, nearest.scale) and torch.equal(learned.zero, nearest.zero)  # same grid
    x = _correlated_inputs(2048, seed=1000)
    reference = net.fc1(x)
    error = {name: float((layer(x) - reference).pow(2).mean()) for name, layer in
             (("nearest", nearest), ("adaround", learned))}
    assert error["adaround"] < 0.6 * error["nearest"], error
    changed = (stored_codes(learned) != stored_codes(nearest)).float()
    assert 0.01 < changed.mean() < 0.5  # rounding decisions moved, codes stay on the grid next to nearest's
    assert (stored_codes(learned) - stored_codes(nearest)).abs().max() <= 1


def test_learned_scales_keep_the_grid_shape_and_do_not_lose_to_fixed_scales(tmp_path, monkeypatch):
    """learn_scales on the same 3-bit layer: the scales move (min-max ranges are not the output-error optimum),
    zero points and codes' neighbourhood stay, and the held-out output error is no worse than AdaRound's on the
    fixed grid (measured 0.991x at 3 bits; small, as scale learning on top of AdaRound is in the literature;
    1.0x demanded: learning must not cost accuracy) and far below nearest's. A second run that takes the
    reconstruction from the shared checkpoint gets the same scales."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = _TwoLayers().requires_grad_(False)
    record = CalibrationRecord([{"x": _correlated_inputs(128, seed)} for seed in range(8)])
    layers = {"fc1": net.fc1}
    rounding = dict(bits=3, group_size=0, weight_rounding="adaround", reconstruction_iterations=400)
    nearest = quantize_layers_of(net, layers, RTNConfig(bits=3, group_size=0), record)["fc1"]
    fixed = quantize_layers_of(net, layers, RTNConfig(**rounding), record)["fc1"]
    options = {"resume": str(tmp_path), "keep_rounding": True}
    learned = quantize_layers_of(net, layers, RTNConfig(**rounding, learn_scales=True), record, **options)["fc1"]
    from lowbit.quant_core.weight_rounding import adaround
    monkeypatch.setattr(adaround, "optimise_unit", None)  # the second run must take everything from the checkpoint
    again = quantize_layers_of(net, layers, RTNConfig(**rounding, learn_scales=True), record, **options)["fc1"]
    assert torch.equal(learned.zero, nearest.zero) and not torch.equal(learned.scale, nearest.scale)
    assert float((learned.scale.float() / nearest.scale.float()).log().abs().max()) < 0.5
    assert (stored_codes(learned) - stored_codes(nearest)).abs().max() <= 1
    assert torch.equal(again.scale, learned.scale) and torch.equal(again.qweight, learned.qweight)
    x = _correlated_inputs(2048, seed=1000)
    reference = net.fc1(x)
    error = {name: float((layer(x) - reference).pow(2).mean()) for name, layer in
             (("nearest", nearest), ("fixed", fixed), ("learned", learned))}
    assert error["learned"] <= error["fixed"] and error["learned"] < 0.6 * error["nearest"], error
    with pytest.raises(LowBitError, match="learn_scales"):
        RTNConfig(weight_rounding="gptq", learn_scales=True)


def test_regulariser_schedule_and_units():
    assert beta_at(0, 100) == beta_at(20, 100) == 20.0 and beta_at(100, 100) == 2.0
    assert beta_at(60, 100) == pytest.approx(11.0)
    from helpers.fixtures import tiny_sdxl_unet
    unet = tiny_sdxl_unet(seed=0)
    assert unit_of("input_blocks.1.0.in_layers.2", unet) == "input_blocks.1.0"                    # ResBlock
    assert unit_of("input_blocks.4.1.transformer_blocks.0.attn2.to_k", unet) == \
        "input_blocks.4.1.transformer_blocks.0"                                                      # transformer block
    assert unit_of("input_blocks.4.1.proj_in", unet) == "input_blocks.4.1.proj_in"                  # alone
    assert unit_of("input_blocks.3.0.op", unet) == "input_blocks.3.0"                                # downsampler
    assert unit_of("middle_block.1.transformer_blocks.0.ff.net.2", unet) == "middle_block.1.transformer_blocks.0"
    assert unit_of("time_embed.0", unet) == "time_embed.0" and unit_of("out.2", unet) == "out.2"


def _tiny_record(unet, seed: int, calls: int = 4) -> CalibrationRecord:
    from helpers.fixtures import tiny_unet_inputs

    def run():
        for i in range(calls):
            unet(**tiny_unet_inputs(batch=2, hw=8, seed=seed * 100 + i))
    return record_unet_calls(unet, run, {"seed": seed}, keep_outputs=True)


def test_grid_of_a_permuted_layer_decodes_like_the_layer():
    """DGQ stores K in its channel order: the grid sees the same codes and decodes the logical weight."""
    from helpers.fixtures import tiny_sdxl_unet
    unet = tiny_sdxl_unet(seed=0)
    record = _tiny_record(unet, seed=0, calls=2)
    name = "input_blocks.1.0.in_layers.2"
    module = unet.get_submodule(name)
    layer = quantize_layers_of(unet, {name: module}, DGQConfig(weight_bits=4, act_bits=8), record)[name]
    assert layer.act_in_perm is not None and not torch.equal(layer.act_in_perm, torch.arange(len(layer.act_in_perm),
                                                                                           dtype=torch.int32))
    grid = Grid.of(module, layer)
    assert torch.equal(grid.nearest_codes(), stored_codes(layer))
    dense = grid.dense(stored_codes(layer))
    assert dense.shape == module.weight.shape
    assert float((dense - module.weight).abs().max()) <= float(layer.scale.float().max()) / 2 + 1e-6


def _two_units():
    """The tiny UNet, 8 calibration and 4 held-out calls, a ResBlock and a transformer block, and their layers:
    the setting of the block-reconstruction tests."""
    from helpers.fixtures import tiny_sdxl_unet
    torch.set_num_threads(1)
    unet = tiny_sdxl_unet(seed=0)
    calibration, held_out = _tiny_record(unet, seed=0, calls=8), _tiny_record(unet, seed=7, calls=4)
    units = ("input_blocks.1.0", "input_blocks.4.1.transformer_blocks.0")
    layers = {f"{u}.{n}": m for u in units for n, m in unet.get_submodule(u).named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d))}
    return unet, calibration, held_out, units, layers


def _held_out_block_errors(unet, unit_name: str, quantized: dict, held_out) -> dict:
    """{setting: the unit's summed reconstruction error on the held-out calls} for each layer set of `quantized`
    (setting -> {layer name: quantized layer}), every call at its own timestep (activation quantizers)."""
    from lowbit.quant_core.actquant.context import at_timestep
    from lowbit.quant_core.qlayers import set_submodule
    from lowbit.quant_core.weight_rounding.adaround import capture, reconstruction_error
    unit, timesteps = unet.get_submodule(unit_name), []
    samples = capture(unet, unit, held_out.inputs, outputs=True, timesteps=timesteps)
    errors = {}
    for setting, layer_set in quantized.items():
        block = copy.deepcopy(unit)
        for name, layer in layer_set.items():
            if name.startswith(unit_name + "."):
                set_submodule(block, name[len(unit_name) + 1:], layer)
        with torch.no_grad():
            errors[setting] = 0.0
            for (args, kwargs, out), timestep in zip(samples, timesteps):
                with at_timestep(timestep):
                    errors[setting] += float(reconstruction_error(block(*args, **kwargs), out))
    return errors


def test_block_reconstruction_lowers_held_out_block_output_error():
    """W3 per channel on the layers of a ResBlock and a transformer block of the tiny UNet: AdaRound (200
    iterations per unit, full-precision block inputs) lowers each block's output error on held-out calls (other
    seeds, full-precision inputs) against round-to-nearest: measured 0.76x and 0.79x, 0.9x demanded. With 3 calibration
    calls instead of 8 the transformer block overfits its 96 token rows and ends above nearest; with quantized
    inputs (BRECQ's setting) it learns to absorb the quantized ResBlock's error, which fp inputs do not show.
    bench quality measures both settings on the whole trained testbed."""
    unet, calibration, held_out, units, layers = _two_units()
    quantized = {rounding: quantize_layers_of(unet, layers, RTNConfig(bits=3, group_size=0, weight_rounding=rounding,
                                                                      reconstruction_iterations=200,
                                                                      reconstruction_inputs="fp"), calibration)
                 for rounding in ("nearest", "adaround")}
    for unit_name in units:
        errors = _held_out_block_errors(unet, unit_name, quantized, held_out)
        assert errors["adaround"] < 0.9 * errors["nearest"], (unit_name, errors)


def test_activation_quantizers_in_the_loop():
    """activations_in_loop: minmax W4A8 on a ResBlock and a transformer block of the tiny UNet. The quantizers
    really run in the optimisation (other codes than with full-precision activations; the straight-through
    gradient is the identity), and the held-out block error with activations quantized stays well below nearest
    rounding's (measured 0.76x / 0.86x, 0.9x demanded, as the fp-activation test). It does not beat the
    full-precision-activation setting here (measured 1.02x / 1.04x): README reports it as an option, off by
    default, the seeds' setting."""
    from lowbit.quant_core.actquant.quantizers import fake_quant
    from lowbit.quant_core.methods.minmax import MinMaxConfig
    x = torch.randn(64, requires_grad=True)
    scale, zero = torch.tensor(0.05), torch.tensor(128)
    y = fake_quant(x, scale, zero, 8)
    y.sum().backward()
    assert torch.equal(y.detach(), fake_quant(x.detach(), scale, zero, 8)) and torch.equal(x.grad, torch.ones(64))
    unet, calibration, held_out, units, layers = _two_units()
    rounding = dict(weight_rounding="adaround", reconstruction_iterations=200, reconstruction_inputs="fp")
    quantized = {name: quantize_layers_of(unet, layers, MinMaxConfig(weight_bits=4, act_bits=8, **options),
                                          calibration)
                 for name, options in (("nearest", {}), ("fp", rounding),
                                       ("in_loop", {**rounding, "activations_in_loop": True}))}
    assert any(not torch.equal(quantized["fp"][n].qweight, quantized["in_loop"][n].qweight) for n in layers)
    for unit_name in units:
        errors = _held_out_block_errors(unet, unit_name, quantized, held_out)
        assert errors["in_loop"] < 0.9 * errors["nearest"], (unit_name, errors)
    with pytest.raises(LowBitError, match="quantizes no activations"):
        quantize_layers_of(unet, layers, RTNConfig(bits=4, group_size=0, **rounding, activations_in_loop=True),
                           calibration)


def _adaround_file(path, resume, progress=None):
    from helpers.fixtures import tiny_sdxl_unet
    unet = tiny_sdxl_unet(seed=0)
    record = _tiny_record(unet, seed=0, calls=2)
    config = RTNConfig(bits=4, group_size=32, weight_rounding="adaround", reconstruction_iterations=8)
    quantize(unet, config, record, progress=progress, resume=None if resume is None else str(resume))
    tensors, table = unet_tensors(unet)
    return open(save(path, tensors, Header("rtn", RTN().describe(config)).to_json(table)), "rb").read()


def test_block_reconstruction_is_deterministic_and_resumes_to_identical_tensors(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    first = _adaround_file(tmp_path / "a.safetensors", None)
    assert _adaround_file(tmp_path / "b.safetensors", None) == first  # same inputs and seed: same file

    class Interrupt(Exception):
        pass

    finished = []

    def interrupt_after_five_units(done, total, what):
        if what.startswith("adaround ") and ":" not in what:
            finished.append(what)
            if len(finished) == 5:
                raise Interrupt

    with pytest.raises(Interrupt):
        _adaround_file(tmp_path / "unused.safetensors", tmp_path / "ckpt", interrupt_after_five_units)
    (folder,) = (tmp_path / "ckpt").iterdir()
    assert len(list(folder.glob("part_*.safetensors"))) == 5
    from lowbit.quant_core.weight_rounding import adaround
    optimised, optimise_unit = [], adaround.optimise_unit

    def spy(unit, unit_name, *args, **kwargs):
        optimised.append(f"adaround {unit_name}")
        return optimise_unit(unit, unit_name, *args, **kwargs)

    monkeypatch.setattr(adaround, "optimise_unit", spy)
    resumed = _adaround_file(tmp_path / "c.safetensors", tmp_path / "ckpt")
    assert optimised and not set(optimised) & set(finished)  # finished units came from the checkpoint
    assert resumed == first
    assert not list((tmp_path / "ckpt").iterdir())


def test_adaround_codes_are_shared_by_methods_on_the_same_grid(tmp_path, monkeypatch):
    """rtn per channel, minmax and DGQ (which stores K permuted) build the same per-channel min-max grid: with the
    codes kept (keep_rounding), the second and third method take them from the shared checkpoint without
    reconstructing, and get exactly the codes their own reconstruction gives; another record reconstructs again,
    and a run that does not keep them leaves nothing behind."""
    from helpers.fixtures import tiny_sdxl_unet
    from lowbit.quant_core.methods.minmax import MinMaxConfig
    from lowbit.quant_core.weight_rounding import adaround
    from lowbit.quant_core.weight_rounding.grid import logical_codes
    torch.set_num_threads(1)
    unet = tiny_sdxl_unet(seed=0)
    record = _tiny_record(unet, seed=0, calls=2)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              and n.startswith(("input_blocks.1.0", "input_blocks.4.1.transformer_blocks.0.attn1"))}
    rounding = dict(weight_rounding="adaround", reconstruction_iterations=6)
    configs = {"rtn": RTNConfig(bits=4, group_size=0, **rounding), "minmax": MinMaxConfig(weight_bits=4, **rounding),
               "dgq": DGQConfig(weight_bits=4, act_bits=8, **rounding)}
    optimised, optimise_unit = [], adaround.optimise_unit

    def spy(unit, unit_name, *args, **kwargs):
        optimised.append(unit_name)
        return optimise_unit(unit, unit_name, *args, **kwargs)

    monkeypatch.setattr(adaround, "optimise_unit", spy)
    shared = tmp_path / "shared"

    def codes(config, resume=None, calibration=record, keep=True):
        options = {} if resume is None else {"resume": str(resume), "keep_rounding": keep}
        quantized = quantize_layers_of(unet, layers, config, calibration, **options)
        return {name: logical_codes(layer) for name, layer in quantized.items()}

    first = codes(configs["rtn"], shared)
    assert len(optimised) == 2
    for method in ("minmax", "dgq"):
        del optimised[:]
        reused = codes(configs[method], shared)
        assert not optimised, method  # taken from the shared checkpoint
        own = codes(configs[method])  # its own reconstruction, nothing shared
        assert len(optimised) == 2
        assert all(torch.equal(reused[n], first[n]) and torch.equal(own[n], first[n]) for n in layers), method
    assert any(not torch.equal(first[n], codes(RTNConfig(bits=4, group_size=0))[n]) for n in layers)  # not nearest
    del optimised[:]
    codes(configs["minmax"], shared, calibration=_tiny_record(unet, seed=1, calls=2))
    assert len(optimised) == 2  # another record: reconstructed again
    assert len([f for f in shared.iterdir() if f.name.startswith("adaround_")]) == 2
    codes(configs["rtn"], tmp_path / "not_kept", keep=False)
    assert not list((tmp_path / "not_kept").iterdir())


def test_rounding_needs_a_record_and_a_known_choice():
    from helpers.fixtures import tiny_sdxl_unet
    with pytest.raises(LowBitError, match="weight_rounding"):
        RTNConfig(weight_rounding="stochastic")
    with pytest.raises(LowBitError, match="reconstruction_inputs"):
        RTNConfig(weight_rounding="adaround", reconstruction_inputs="both")
    with pytest.raises(LowBitError, match="calibration record"):
        quantize(tiny_sdxl_unet(seed=0), RTNConfig(weight_rounding="adaround"), None)
    with pytest.raises(LowBitError, match="needs the UNet"):
        RTN().quantize_layers({}, RTNConfig(weight_rounding="gptq"))


def test_gptq_for_grouped_rtn_lowers_the_layer_output_error():
    """GPTQ on RTN's per-group grid (group 32): same scales and zeros, lower Σ‖XWᵀ − XŴᵀ‖² on the calibration
    inputs than nearest for the layers of the first blocks (GPTQ minimises exactly that; 0.7x demanded)."""
    from helpers.fixtures import tiny_sdxl_unet
    from lowbit.quant_core.calib.statistics import collect_xtx
    from lowbit.quant_core.calib.replay import replay
    from lowbit.quant_core.layouts import matrix_view
    torch.set_num_threads(1)
    unet = tiny_sdxl_unet(seed=0)
    record = _tiny_record(unet, seed=0, calls=2)
    layers = {n: m for n, m in unet.named_modules() if n.startswith("input_blocks.1.") and
              isinstance(m, (nn.Linear, nn.Conv2d)) and matrix_view(m.weight).shape[1] % 32 == 0}
    hessians = collect_xtx(unet, layers, lambda: replay(unet, record.inputs))
    errors = {}
    for rounding in ("nearest", "gptq"):
        quantized = quantize_layers_of(unet, layers, RTNConfig(bits=3, group_size=32, weight_rounding=rounding),
                                       record)
        errors[rounding] = 0.0
        for name, layer in quantized.items():
            d = matrix_view(layers[name].weight).double() - layer.dequantize_matrix().double()
            errors[rounding] += float(torch.einsum("ok,kl,ol->", d, hessians[name], d))
    assert len(layers) >= 3 and errors["gptq"] < 0.7 * errors["nearest"], errors
