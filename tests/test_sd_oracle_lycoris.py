"""Differential tests for SD1.5 LoRAs with convolutions against lycoris-lora 4.1.3 and PEFT 0.21.2.

A tiny module tree whose ``named_modules()`` are SD1 diffusers UNet names (a 3×3 resnet conv, a 1×1 proj_in,
attention and feed-forward Linears) is wrapped by LyCORIS's own network wrappers (``create_lycoris`` →
``lycoris_`` keys, the kohya wrapper → ``lora_unet_`` keys) for LoCon / LoHa / LoKr in their plain, Tucker and
(de)composed forms. Each wrapped module's forward pass is the ground truth: lorakit's ΔW must reproduce it as
``F.conv2d/F.linear(x, W + ΔW, b)``, before and after converting to plain kohya LoRA. PEFT's DoRA layers are
the ground truth for the DoRA magnitude (its shape and axis) and for the plain delta ``dense_deltas`` returns.
No expected value comes from lorakit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lorakit.formats import emit, read_lora
from lorakit.lora.model import LoraModel, Target, dense_deltas

lycoris_wrapper = pytest.importorskip("lycoris.wrapper")
lycoris_kohya = pytest.importorskip("lycoris.kohya")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.oracle
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

TOL = 1e-4      # relative to the size of the adapter's own contribution to the output, fp32 throughout

# diffusers name -> SD1 single-file (ldm) name: written out here (sd-scripts' mapping), never taken from lorakit
NATIVE = {
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": "input_blocks.1.1.transformer_blocks.0.ff.net.2",
}
CONV3 = "down_blocks.0.resnets.0.conv1"
CONV1 = "down_blocks.0.attentions.0.proj_in"
LINEARS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
           "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2")


# ---------------------------------------------------------------------------------------------
# The module tree: class names are diffusers' so LyCORIS's "full" preset picks the blocks as on a real UNet
# ---------------------------------------------------------------------------------------------

class ResnetBlock2D(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)


class Transformer2DModel(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(c, c, 1)
        block = nn.Module()
        block.attn1 = nn.Module()
        block.attn1.to_q = nn.Linear(c, c, bias=False)
        block.ff = nn.Module()
        block.ff.net = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Linear(4 * c, c)])
        self.transformer_blocks = nn.ModuleList([block])


class DownBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c)])
        self.attentions = nn.ModuleList([Transformer2DModel(c)])


class TinyUNet(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([DownBlock(c)])


def tiny_unet(c: int, seed: int = 0) -> TinyUNet:
    torch.manual_seed(seed)
    return TinyUNet(c).eval()


def randomise(params: Callable[[], Iterable[tuple[str, nn.Parameter]]], seed: int,
              skip: Callable[[str], bool] = lambda n: False) -> None:
    """Every adapter parameter random and non-zero (LyCORIS/PEFT initialise the ups at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params():
            if not skip(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def base_weights(unet: TinyUNet) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, nn.Module]]:
    """Each target's original weight and bias, copied before any wrapper replaces its forward."""
    mods = dict(unet.named_modules())
    return {n: (mods[n].weight.detach().clone(), None if mods[n].bias is None else mods[n].bias.detach().clone(),
                mods[n]) for n in NATIVE}


def inputs(module: nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if isinstance(module, nn.Conv2d):
        return torch.randn(2, module.in_channels, 5, 5, generator=gen)
    return torch.randn(3, module.in_features, generator=gen)


def apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, bias, module.stride, module.padding)
    return F.linear(x, weight, bias)


def check_forward(model: LoraModel, base: dict, wrapped_out: dict[str, torch.Tensor]) -> None:
    """lorakit's ΔW, added to the base weight, gives the wrapped module's output on the same input."""
    got = dense_deltas(model)
    assert set(got) == {Target("unet", NATIVE[n]) for n in base}
    for i, (name, (w, b, module)) in enumerate(base.items()):
        x = inputs(module, seed=100 + i)
        want = wrapped_out[name]
        plain = apply(module, x, w, b)
        contribution = float((want - plain).norm())
        assert contribution > 1e-3 * float(plain.norm()), f"{name}: the adapter does not change the output"
        delta = got[Target("unet", NATIVE[name])]
        assert delta.numel() == w.numel(), name
        delta = delta.reshape(w.shape)      # LoHa/LoKr conv deltas may come flattened: see the shape tests below
        err = float((apply(module, x, w + delta, b) - want).norm()) / contribution
        assert err <= TOL, f"{name}: relative error {err:.2e} against the wrapped module's forward pass"


# ---------------------------------------------------------------------------------------------
# LyCORIS producers
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    algo: str
    kwargs: dict = field(default_factory=dict)
    conv3_keys: frozenset[str] = frozenset()     # tensor suffixes the 3×3 conv's module must carry
    channels: int = 64
    flat: frozenset[str] = frozenset()   # convs whose factors LyCORIS stores flattened: all 2-D, (·, in·k·k)
    plain_fits: bool = True     # the exact plain LoRA holds fewer numbers than the dense ΔW


LOKR8 = dict(factor=8, linear_dim=2, linear_alpha=1.5, conv_dim=2, conv_alpha=3)
CASES = (
    Case("locon", "locon", dict(linear_dim=4, linear_alpha=2, conv_dim=3, conv_alpha=5),
         frozenset({"lora_down.weight", "lora_up.weight", "alpha"})),
    Case("locon-tucker", "locon", dict(linear_dim=4, linear_alpha=2, conv_dim=3, conv_alpha=5, use_tucker=True),
         frozenset({"lora_down.weight", "lora_mid.weight", "lora_up.weight", "alpha"})),
    Case("loha", "loha", dict(linear_dim=4, linear_alpha=2, conv_dim=3, conv_alpha=1),
         frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}), flat=frozenset({CONV3, CONV1})),
    Case("loha-tucker", "loha", dict(linear_dim=4, linear_alpha=2, conv_dim=3, conv_alpha=1, use_tucker=True),
         frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}),
         flat=frozenset({CONV1})),     # no Tucker core on a 1×1 kernel
    Case("lokr-w2-decomposed", "lokr", LOKR8, frozenset({"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
         flat=frozenset({CONV3, CONV1})),
    Case("lokr-both-decomposed-tucker", "lokr", dict(LOKR8, decompose_both=True, use_tucker=True),
         frozenset({"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}), flat=frozenset({CONV1})),
    Case("lokr-full-matrix", "lokr", dict(LOKR8, full_matrix=True), frozenset({"lokr_w1", "lokr_w2", "alpha"}),
         plain_fits=False),
    # the common real-world setting (factor -1, huge dim: both factors full) at SD1.5's real width 320
    Case("lokr-default-320", "lokr", dict(linear_dim=100000, linear_alpha=1),
         frozenset({"lokr_w1", "lokr_w2", "alpha"}), channels=320, plain_fits=False),
)

FLAT_CONV = ("LoHa/LoKr without a Tucker core store a conv's factors flattened (·, in·k·k); lorakit keeps that "
             "flat shape")


def cases(*marks_for: tuple[Callable[[Case], bool], pytest.MarkDecorator],
          keep: Callable[[Case], bool] = lambda c: True) -> list:
    """CASES as pytest params, with the marks whose predicate holds for a case."""
    return [pytest.param(c, id=c.id, marks=[m for pred, m in marks_for if pred(c)]) for c in CASES if keep(c)]


def is_lokr_tucker(c: Case) -> bool:
    return "lokr_t2" in c.conv3_keys


def _wrap_lycoris(unet: TinyUNet, case: Case) -> tuple[nn.Module, str]:
    kw = dict(case.kwargs)
    net = lycoris_wrapper.create_lycoris(unet, 1.0, kw.pop("linear_dim"), kw.pop("linear_alpha"), algo=case.algo,
                                         **kw)
    net.apply_to()
    return net, "lycoris_"


def _wrap_kohya(unet: TinyUNet, case: Case) -> tuple[nn.Module, str]:
    kw = dict(case.kwargs)
    net = lycoris_kohya.create_network(1.0, kw.pop("linear_dim"), kw.pop("linear_alpha"), None, None, unet,
                                       algo=case.algo, **kw)
    net.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    return net, "lora_unet_"


PRODUCERS = {"lycoris": (_wrap_lycoris, "lycoris"), "kohya": (_wrap_kohya, "kohya")}


def produce(tmp_path, producer: str, case: Case) -> tuple[LoraModel, dict, dict[str, torch.Tensor], dict]:
    """Wrap, randomise, save with the wrapper's own ``save_weights``; return the read model, the base weights,
    the wrapped modules' outputs and the saved tensors' shapes."""
    wrap, _ = PRODUCERS[producer]
    unet = tiny_unet(case.channels)
    base = base_weights(unet)
    net, prefix = wrap(unet, case)
    randomise(net.named_parameters, seed=len(case.id))
    with torch.no_grad():
        outputs = {n: m(inputs(m, seed=100 + i)) for i, (n, (_, _, m)) in enumerate(base.items())}
    path = tmp_path / f"{producer}-{case.id}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    state = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    stems = {prefix + n.replace(".", "_") for n in NATIVE}
    assert {k.split(".")[0] for k in state} == stems
    conv3 = {k.split(".", 1)[1] for k in state if k.startswith(prefix + CONV3.replace(".", "_") + ".")}
    assert conv3 == case.conv3_keys, "LyCORIS did not build the factor layout this case is about"
    for conv in (CONV3, CONV1):
        dims = {len(v) for k, v in state.items() if k.startswith(prefix + conv.replace(".", "_") + ".")}
        assert (max(dims) <= 2) == (conv in case.flat), conv
    return read_lora(str(path)), base, outputs, state


@pytest.mark.parametrize("producer", list(PRODUCERS))
@pytest.mark.parametrize("case", cases())
def test_lycoris_file_reads_as_the_wrapped_forward(tmp_path, producer: str, case: Case) -> None:
    model, base, outputs, _ = produce(tmp_path, producer, case)
    assert model.arch.name == "sd1"
    assert model.format == PRODUCERS[producer][1]
    assert not model.unknown_keys
    assert case.algo in model.adapter_kinds() or (case.algo == "locon" and "lora" in model.adapter_kinds())
    check_forward(model, base, outputs)


PLAIN_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
CONV3_KOHYA = "lora_unet_" + CONV3.replace(".", "_")


def reread(tmp_path, tensors: dict[str, torch.Tensor]) -> LoraModel:
    out = tmp_path / "converted.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    again = read_lora(str(out))
    assert again.format == "kohya" and again.arch.name == "sd1" and not again.unknown_keys
    return again


@pytest.mark.parametrize("case", cases(keep=lambda c: c.plain_fits))
def test_lycoris_file_converted_to_plain_kohya_keeps_the_forward(tmp_path, case: Case) -> None:
    model, base, outputs, _ = produce(tmp_path, "lycoris", case)
    result = emit(model, "kohya")
    assert not result.lossy
    plain = case.conv3_keys == set(PLAIN_SUFFIXES)
    assert {algo for _, algo, _ in result.converted} == (set() if plain else {case.algo})
    assert all(k.endswith(PLAIN_SUFFIXES) for k in result.tensors), "kohya output must be plain LoRA factors"
    assert all(k.startswith("lora_unet_down_blocks_0_") for k in result.tensors)   # SD1 kohya: diffusers names
    again = reread(tmp_path, result.tensors)
    assert set(again.adapter_kinds()) <= {"lora", "locon"}
    check_forward(again, base, outputs)


@pytest.mark.parametrize("case", cases(keep=lambda c: not c.plain_fits))
def test_lycoris_file_too_big_for_plain_lora_is_refused_or_kept(tmp_path, case: Case) -> None:
    """A full-rank LoKr's exact plain LoRA is larger than its dense ΔW: refused (lorakit's rule), and kept as
    LoKr with ``keep_algo`` — which still reproduces LyCORIS's forward pass."""
    from lorakit.errors import LossyConversionError

    model, base, outputs, _ = produce(tmp_path, "lycoris", case)
    with pytest.raises(LossyConversionError):
        emit(model, "kohya")
    kept = emit(model, "kohya", keep_algo=True)
    assert any(k.endswith(".lokr_w1") for k in kept.tensors)
    check_forward(reread(tmp_path, kept.tensors), base, outputs)


@pytest.mark.parametrize("case", cases())
def test_lycoris_file_kept_as_lycoris_in_kohya_keeps_the_forward(tmp_path, case: Case) -> None:
    model, base, outputs, _ = produce(tmp_path, "lycoris", case)
    kept = emit(model, "kohya", keep_algo=True).tensors
    suffixes = {k.split(".", 1)[1] for k in kept if k.startswith(CONV3_KOHYA + ".")}
    assert suffixes == case.conv3_keys
    check_forward(reread(tmp_path, kept), base, outputs)


# fixed: formats/parse.py _with_kernel gives flat LoHa/LoKr conv factors the layout's kernel, so the plain LoRA
# written for sd-scripts has a 4-D lora_down (r, in, k, k)
@pytest.mark.parametrize("case", cases(keep=lambda c: c.plain_fits))
def test_plain_kohya_conv_factors_are_4d(tmp_path, case: Case) -> None:
    model, _, _, _ = produce(tmp_path, "lycoris", case)
    tensors = emit(model, "kohya").tensors
    for conv, k in ((CONV3, 3), (CONV1, 1)):
        stem = "lora_unet_" + conv.replace(".", "_")
        down, up = tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"]
        assert tuple(down.shape[1:]) == (case.channels, k, k), conv
        assert tuple(up.shape) == (case.channels, down.shape[0], 1, 1), conv


@pytest.mark.parametrize("case", cases())
def test_dense_delta_of_a_conv_has_the_conv_weight_shape(tmp_path, case: Case) -> None:
    model, base, _, _ = produce(tmp_path, "lycoris", case)
    dense = dense_deltas(model)
    for name, (w, _, _) in base.items():
        assert tuple(dense[Target("unet", NATIVE[name])].shape) == tuple(w.shape), name


# ---------------------------------------------------------------------------------------------
# LyCORIS DoRA (dora_wd): the stored magnitude's axis
# ---------------------------------------------------------------------------------------------

def _lycoris_dora(tmp_path, wd_on_output: bool) -> tuple[LoraModel, dict[str, torch.Tensor]]:
    unet = tiny_unet(32)
    net = lycoris_wrapper.create_lycoris(unet, 1.0, 4, 2, algo="locon", dora_wd=True, wd_on_output=wd_on_output)
    net.apply_to()
    randomise(net.named_parameters, seed=3)
    path = tmp_path / "dora.safetensors"
    net.save_weights(str(path), torch.float32, {})
    scales = {k.split(".")[0]: v.detach().clone() for k, v in net.state_dict().items() if k.endswith(".dora_scale")}
    return read_lora(str(path)), scales


def _check_lycoris_dora(model: LoraModel, scales: dict[str, torch.Tensor], want_shape) -> None:
    assert "dora" in model.adapter_kinds()
    by_target = model.by_target()
    for name, native in NATIVE.items():
        (patch,) = by_target[Target("unet", native)]
        stored = scales["lycoris_" + name.replace(".", "_")]
        assert patch.dora is not None and tuple(patch.dora.shape) == want_shape(stored), name
        torch.testing.assert_close(patch.dora.float().flatten(), stored.float().flatten())


def test_lycoris_dora_output_axis_magnitudes_read_per_output_row(tmp_path) -> None:
    """wd_on_output=True: LyCORIS stores (out, 1[, 1, 1]), the norm per output row → lorakit's (out,)."""
    model, scales = _lycoris_dora(tmp_path, wd_on_output=True)
    _check_lycoris_dora(model, scales, lambda s: (s.shape[0],))


def test_lycoris_dora_input_axis_magnitudes_of_a_3x3_conv(tmp_path) -> None:
    """wd_on_output=False: one magnitude per input channel, (1, in, 1, 1) on a conv (norm over out×kh×kw)."""
    model, scales = _lycoris_dora(tmp_path, wd_on_output=False)
    _check_lycoris_dora(model, scales, lambda s: (1, s.numel()))


@pytest.mark.parametrize("wd_on_output", (True, False), ids=("out-axis", "in-axis"))
def test_lycoris_dora_bake_matches_lycoris_merged_weight(tmp_path, wd_on_output: bool) -> None:
    """Baking a LyCORIS DoRA LoCon (3×3 conv, 1×1 conv, Linears) gives LyCORIS's own merged weights
    (``get_merged_weight``: m·(W0+ΔW)/‖W0+ΔW‖ per output row, or per input channel of a conv)."""
    from safetensors.torch import load_file

    from lorakit.ops.baking import bake

    unet = tiny_unet(32)
    base = base_weights(unet)
    net = lycoris_wrapper.create_lycoris(unet, 1.0, 4, 2, algo="locon", dora_wd=True, wd_on_output=wd_on_output)
    net.apply_to()
    randomise(net.named_parameters, seed=3)
    lora = tmp_path / "dora.safetensors"
    net.save_weights(str(lora), torch.float32, {})
    tensors = {}
    for name, (w, b, _) in base.items():
        tensors[f"model.diffusion_model.{NATIVE[name]}.weight"] = w.contiguous()
        if b is not None:
            tensors[f"model.diffusion_model.{NATIVE[name]}.bias"] = b.contiguous()
    base_path, out = tmp_path / "base.safetensors", tmp_path / "baked.safetensors"
    save_file(tensors, str(base_path))
    bake(str(base_path), [str(lora)], str(out), allow_partial=True)
    baked = load_file(str(out))
    modules = {m.lora_name: m for m in net.loras}
    for name, native in NATIVE.items():
        with torch.no_grad():
            want, _ = modules["lycoris_" + name.replace(".", "_")].get_merged_weight(multiplier=1)
        torch.testing.assert_close(baked[f"model.diffusion_model.{native}.weight"], want.float(), rtol=1e-4,
                                   atol=1e-5)


# ---------------------------------------------------------------------------------------------
# PEFT DoRA in diffusers naming
# ---------------------------------------------------------------------------------------------

def _peft_dora(tmp_path, targets: tuple[str, ...]) -> tuple[LoraModel, TinyUNet, dict]:
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet = tiny_unet(32)
    base = base_weights(unet)
    cfg = LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=list(targets))
    unet = inject_adapter_in_model(cfg, unet)
    randomise(unet.named_parameters, seed=5, skip=lambda n: "lora_" not in n)
    with torch.no_grad():   # magnitudes away from PEFT's init (= ‖W‖ per row) so that they matter
        for n, p in unet.named_parameters():
            if "lora_magnitude_vector" in n:
                p.copy_(p.abs() + 0.5)
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    # diffusers' own writer: unet.-prefixed keys, the LoraConfig (α) in the lora_adapter_metadata header
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(tmp_path), unet_lora_layers=state,
                                                     unet_lora_adapter_metadata=cfg.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        assert all(f"unet.{t}.lora_magnitude_vector" in f.keys() for t in targets)
    # one conv module alone (down_blocks.0.resnets.0.conv1) exists in SD1.5 and SDXL alike: say which
    model = read_lora(str(path))
    if len(targets) == 1:
        assert model.arch.name in ("sd1", "sdxl")
        model = read_lora(str(path), arch="sd1")
    return model, unet, base


def _check_peft_dora(model: LoraModel, unet: TinyUNet, targets: tuple[str, ...]) -> None:
    assert model.format == "diffusers" and model.arch.name == "sd1"
    assert "dora" in model.adapter_kinds() and not model.unknown_keys
    layers = dict(unet.named_modules())
    dense = dense_deltas(model)
    by_target = model.by_target()
    for name in targets:
        layer = layers[name]
        (patch,) = by_target[Target("unet", NATIVE[name])]
        magnitude = layer.lora_magnitude_vector["default"].weight.detach()
        # PEFT scales output channel j by magnitude[j] / ‖W + ΔW‖_j: one value per output row
        assert patch.dora is not None and tuple(patch.dora.shape) == (layer.base_layer.weight.shape[0],), name
        torch.testing.assert_close(patch.dora.float(), magnitude.flatten())
        # dense_deltas ignores the magnitude (documented): the plain LoRA delta, PEFT's get_delta_weight
        with torch.no_grad():
            want = layer.get_delta_weight("default")
        torch.testing.assert_close(dense[Target("unet", NATIVE[name])], want, rtol=1e-5, atol=1e-6)


def test_peft_dora_linears_read_magnitude_per_output_row(tmp_path) -> None:
    model, unet, _ = _peft_dora(tmp_path, LINEARS)
    _check_peft_dora(model, unet, LINEARS)


# fixed: formats/parse.py dora_axis_of_shape(peft=True) reads PEFT's (1, out, 1, 1) as one value per output channel
@pytest.mark.parametrize("conv", (CONV3, CONV1), ids=("3x3", "1x1"))
def test_peft_dora_conv_reads_magnitude_per_output_channel(tmp_path, conv: str) -> None:
    model, unet, _ = _peft_dora(tmp_path, (conv,))
    _check_peft_dora(model, unet, (conv,))


def test_peft_dora_bake_matches_peft_forward(tmp_path) -> None:
    from lorakit.ops.baking import bake

    model, unet, base = _peft_dora(tmp_path, LINEARS)
    tensors = {}
    for name, (w, b, _) in base.items():
        tensors[f"model.diffusion_model.{NATIVE[name]}.weight"] = w.contiguous()
        if b is not None:
            tensors[f"model.diffusion_model.{NATIVE[name]}.bias"] = b.contiguous()
    base_path = tmp_path / "base.safetensors"
    save_file(tensors, str(base_path))
    out = tmp_path / "baked.safetensors"
    bake(str(base_path), [str(model.path)], str(out), allow_partial=True)
    from safetensors.torch import load_file
    baked = load_file(str(out))
    layers = dict(unet.named_modules())
    for name in LINEARS:
        layer = layers[name]
        b = base[name][1]
        eye = torch.eye(layer.base_layer.in_features)
        with torch.no_grad():    # the effective weight of PEFT's DoRA forward pass
            want = (layer(eye) - (0 if b is None else b)).T
        torch.testing.assert_close(baked[f"model.diffusion_model.{NATIVE[name]}.weight"], want, rtol=1e-4, atol=1e-5)
