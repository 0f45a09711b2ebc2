"""lorakit's ComfyUI nodes (comfyui/lorakit_nodes) without ComfyUI: every node meets ComfyUI's classic node
contract (checked here from ComfyUI's documented conventions), the package loads the way ComfyUI loads a custom
node folder, and each node writes what the matching ``lorakit`` command writes. ``folder_paths`` and the MODEL
object are small stand-ins with ComfyUI's documented behaviour."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from test_bake_util import make_base

NODES_DIR = Path(__file__).resolve().parents[1] / "comfyui" / "lorakit_nodes"
INPUT_SECTIONS = {"required", "optional", "hidden"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
MODULES = {"lora_unet_double_blocks_0_img_attn_proj": (32, 32), "lora_unet_double_blocks_1_txt_mlp_0": (128, 32),
           "lora_unet_single_blocks_0_linear2": (32, 160)}


def _load_package():
    """Import the node folder as ComfyUI does: a package from its __init__.py under the folder's name."""
    name = "lorakit_nodes_under_test"
    spec = importlib.util.spec_from_file_location(name, NODES_DIR / "__init__.py",
                                                  submodule_search_locations=[str(NODES_DIR)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _fake_folder_paths(loras: Path, output: Path) -> types.ModuleType:
    """ComfyUI's folder_paths as documented: the loras listing and full paths, the output folder, and
    get_save_image_path's (folder, filename, counter, subfolder, prefix) with the next free counter."""
    fp = types.ModuleType("folder_paths")

    def get_filename_list(kind):
        assert kind == "loras"
        return sorted(os.listdir(loras))

    def get_full_path(kind, name):
        p = loras / name
        return str(p) if kind == "loras" and p.is_file() else None

    def get_save_image_path(prefix, out_dir, *_):
        sub, filename = os.path.split(os.path.normpath(prefix))
        folder = os.path.join(out_dir, sub)
        os.makedirs(folder, exist_ok=True)
        taken = [int(n[len(filename) + 1:].split("_")[0]) for n in os.listdir(folder)
                 if n.startswith(filename + "_") and n[len(filename) + 1:].split("_")[0].isdigit()]
        return folder, filename, max(taken, default=0) + 1, sub, prefix

    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_output_directory = lambda: str(output)
    fp.get_save_image_path = get_save_image_path
    return fp


class FakeModel:
    """A ComfyUI MODEL stand-in: model_state_dict(filter_prefix) over ``diffusion_model.*`` keys."""

    def __init__(self, tensors):
        self.sd = {"diffusion_model." + k: v for k, v in tensors.items()}

    def model_state_dict(self, filter_prefix=None):
        return {k: v for k, v in self.sd.items() if filter_prefix is None or k.startswith(filter_prefix)}


def _lora(path: Path, rank: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    t = {}
    for name, (out, inp) in MODULES.items():
        t[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=gen)
        t[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * 0.1
        t[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(t, str(path))
    return str(path)


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    loras, output, cli = tmp_path / "loras", tmp_path / "output", tmp_path / "cli"
    for d in (loras, output, cli):
        d.mkdir()
    _lora(loras / "a.safetensors", 4, 1)
    _lora(loras / "b.safetensors", 2, 2)
    _lora(loras / "c.safetensors", 3, 3)
    monkeypatch.setitem(sys.modules, "folder_paths", _fake_folder_paths(loras, output))
    pkg = _load_package()
    return types.SimpleNamespace(pkg=pkg, loras=loras, output=output, cli=cli, tmp=tmp_path)


# -- the node contract -----------------------------------------------------------------------------------------

def _check_input(name: str, spec: object, where: str) -> None:
    assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, f"{where}.{name}: (TYPE,) or (TYPE, options)"
    kind = spec[0]
    opts = spec[1] if len(spec) == 2 else {}
    assert isinstance(opts, dict), f"{where}.{name}: options must be a dict"
    if isinstance(kind, list):       # a combo: its values are strings, its default one of them
        assert all(isinstance(v, str) for v in kind), f"{where}.{name}: combo values are strings"
        if "default" in opts:
            assert opts["default"] in kind, f"{where}.{name}: default {opts['default']!r} not in the combo"
        return
    assert isinstance(kind, str) and kind == kind.upper() and kind, f"{where}.{name}: type names are upper case"
    if kind in ("INT", "FLOAT"):
        assert {"default", "min", "max"} <= set(opts), f"{where}.{name}: numbers give default/min/max"
        assert opts["min"] <= opts["default"] <= opts["max"], f"{where}.{name}: default outside [min, max]"
        number = int if kind == "INT" else float
        assert all(isinstance(opts[k], (int, float)) for k in ("default", "min", "max"))
        if kind == "INT":
            assert all(isinstance(opts[k], int) for k in ("default", "min", "max"))
        assert opts.get("step", 1) > 0 and number(opts["default"]) == opts["default"]
    elif kind == "BOOLEAN":
        assert isinstance(opts.get("default"), bool), f"{where}.{name}: BOOLEAN needs a bool default"
    elif kind == "STRING":
        assert isinstance(opts.get("default", ""), str)
    if "tooltip" in opts:
        assert isinstance(opts["tooltip"], str)


def check_node_contract(key: str, cls: type) -> None:
    """ComfyUI's classic node contract, as its documentation and built-in nodes spell it."""
    assert isinstance(inspect.getattr_static(cls, "INPUT_TYPES"), classmethod), f"{key}: INPUT_TYPES classmethod"
    types_ = cls.INPUT_TYPES()
    assert isinstance(types_, dict) and "required" in types_ and set(types_) <= INPUT_SECTIONS, key
    for section, inputs in types_.items():
        assert isinstance(inputs, dict)
        for name, spec in inputs.items():
            assert name.isidentifier(), f"{key}: input {name!r} must be a Python identifier (passed as keyword)"
            _check_input(name, spec, f"{key}.{section}")
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES), key
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), f"{key}: one RETURN_NAME per RETURN_TYPE"
    assert isinstance(cls.CATEGORY, str) and cls.CATEGORY, key
    assert isinstance(getattr(cls, "OUTPUT_NODE", False), bool)
    fn = getattr(cls, cls.FUNCTION, None)
    assert callable(fn), f"{key}: FUNCTION {cls.FUNCTION!r} names no method"
    params = inspect.signature(fn).parameters
    names = [p for p in params if p != "self"]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in types_["required"]:
        assert name in params or var_kw, f"{key}: required input {name!r} is not a parameter of {cls.FUNCTION}"
    for name in types_.get("optional", {}):   # ComfyUI leaves unconnected optional inputs out of the call
        assert var_kw or params[name].default is not inspect.Parameter.empty, \
            f"{key}: optional input {name!r} needs a default"
    every = set(types_["required"]) | set(types_.get("optional", {})) | set(types_.get("hidden", {}))
    for name in names:
        p = params[name]
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        assert name in every or p.default is not inspect.Parameter.empty, \
            f"{key}: parameter {name!r} is no input and has no default"
    # ComfyUI instantiates nodes without arguments
    cls()


def _check_return(cls: type, value: object) -> tuple:
    result = value["result"] if isinstance(value, dict) else value
    if isinstance(value, dict):
        assert set(value) <= {"ui", "result"} and isinstance(value.get("ui", {}), dict)
    assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES)
    for v, t in zip(result, cls.RETURN_TYPES):
        if t == "STRING":
            assert isinstance(v, str)
    return result


def test_every_node_meets_the_contract(comfy):
    mappings = comfy.pkg.NODE_CLASS_MAPPINGS
    assert set(mappings) == {"LorakitLoraDoctor", "LorakitConvertLora", "LorakitMergeLoras",
                             "LorakitExtractLora", "LorakitResizeLora"}
    assert set(comfy.pkg.NODE_DISPLAY_NAME_MAPPINGS) <= set(mappings)
    for key, cls in mappings.items():
        check_node_contract(key, cls)
    merge = mappings["LorakitMergeLoras"].INPUT_TYPES()
    assert merge["required"]["lora_1"][0] == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert merge["required"]["method"][0][:1] == ["concat"] and "ties" in merge["required"]["method"][0]
    assert "None" in merge["optional"]["lora_3"][0]


@pytest.mark.parametrize("broken", ["no_default", "bad_combo", "range", "not_classmethod", "missing_param"])
def test_the_contract_check_can_fail(broken):
    class Node:
        RETURN_TYPES = ("STRING",)
        FUNCTION = "run"
        CATEGORY = "x"

        @classmethod
        def INPUT_TYPES(cls):
            spec = {"a": ("INT", {"default": 1, "min": 0, "max": 3})}
            if broken == "bad_combo":
                spec["b"] = (["x", "y"], {"default": "z"})
            if broken == "range":
                spec["a"] = ("INT", {"default": 5, "min": 0, "max": 3})
            out = {"required": spec}
            if broken == "no_default":
                out["optional"] = {"c": ("STRING", {})}
            return out

        def run(self, a, b="x", c=None):
            return (str(a),)

    if broken == "no_default":     # an optional input ComfyUI may leave out of the call has no default
        def run(self, a, b="x", *, c):
            return (str(a),)
        Node.run = run   # type: ignore[assignment]
    if broken == "not_classmethod":
        Node.INPUT_TYPES = staticmethod(lambda: {"required": {}})   # type: ignore[assignment]
    if broken == "missing_param":
        Node.run = lambda self, b="x": ("",)   # type: ignore[assignment]
    with pytest.raises(AssertionError):
        check_node_contract("Node", Node)


def test_the_package_loads_without_comfyui(monkeypatch):
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    pkg = _load_package()
    for key, cls in pkg.NODE_CLASS_MAPPINGS.items():   # lists are empty outside ComfyUI, the contract holds
        check_node_contract(key, cls)


# -- the nodes write what the commands write ----------------------------------------------------------------------

def _node(comfy, key):
    return comfy.pkg.NODE_CLASS_MAPPINGS[key]()


def _same_file(a: str, b: Path) -> None:
    assert Path(a).read_bytes() == b.read_bytes()


def test_merge_node_equals_the_cli(comfy):
    node = _node(comfy, "LorakitMergeLoras")
    out = node.merge(lora_1="a.safetensors", strength_1=0.8, lora_2="b.safetensors", strength_2=-0.4, method="svd",
                     rank=3, density=0.0, seed=0, target_format="diffusers", dtype="fp16",
                     filename_prefix="loras/lorakit_merged", lora_3="c.safetensors", strength_3=0.5,
                     lora_4="None", strength_4=1.0)
    path, report = _check_return(type(node), out)
    assert path == str(comfy.output / "loras" / "lorakit_merged_00001_.safetensors") and "svd" in report
    expected = comfy.cli / "lorakit_merged_00001_.safetensors"
    assert main(["merge", f"{comfy.loras / 'a.safetensors'}:0.8", f"{comfy.loras / 'b.safetensors'}:-0.4",
                 f"{comfy.loras / 'c.safetensors'}:0.5", "--method", "svd", "--rank", "3", "--to", "diffusers",
                 "--dtype", "fp16", "-o", str(expected)]) in (0, 1)
    _same_file(path, expected)
    again = node.merge(lora_1="a.safetensors", strength_1=1.0, lora_2="b.safetensors", strength_2=1.0,
                       method="concat", rank=0, density=0.0, seed=0, target_format="kohya", dtype="keep",
                       filename_prefix="loras/lorakit_merged")
    assert again["result"][0].endswith("lorakit_merged_00002_.safetensors")     # never overwrites


def test_convert_and_resize_nodes_equal_the_cli(comfy):
    node = _node(comfy, "LorakitConvertLora")
    path, _ = _check_return(type(node), node.convert(lora_name="a.safetensors", target_format="comfy", dtype="bf16",
                                                     allow_lossy=False, filename_prefix="loras/conv"))
    expected = comfy.cli / "conv_00001_.safetensors"
    assert main(["convert", str(comfy.loras / "a.safetensors"), "--to", "comfy", "--dtype", "bf16",
                 "-o", str(expected)]) in (0, 1)
    _same_file(path, expected)
    node = _node(comfy, "LorakitResizeLora")
    path, report = _check_return(type(node), node.resize(lora_name="a.safetensors", rank=2, conv_rank=0,
                                                         dynamic="off", dynamic_param=0.9, dtype="keep",
                                                         filename_prefix="res"))
    expected = comfy.cli / "res_00001_.safetensors"
    assert main(["resize", str(comfy.loras / "a.safetensors"), "--rank", "2", "-o", str(expected)]) in (0, 1)
    _same_file(path, expected)
    path, _ = _check_return(type(node), node.resize(lora_name="a.safetensors", rank=4, conv_rank=0,
                                                    dynamic="sv_fro", dynamic_param=0.9, dtype="keep",
                                                    filename_prefix="dyn"))
    expected = comfy.cli / "dyn_00001_.safetensors"
    assert main(["resize", str(comfy.loras / "a.safetensors"), "--rank", "4", "--dynamic", "sv_fro:0.9",
                 "-o", str(expected)]) in (0, 1)
    _same_file(path, expected)


def _tensors_and_meta(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    prov = json.loads(meta.pop("lorakit.provenance"))
    prov.pop("inputs")                       # names of the inputs: files for the CLI, loaded models for the node
    meta = {k: v for k, v in meta.items() if "hash" not in k}   # hashes cover the header (inputs' names)
    return load_file(str(path)), {**meta, "provenance": prov}


@pytest.mark.parametrize("mode", ["two models", "difference"])
def test_extract_node_equals_the_cli(comfy, mode):
    (comfy.tmp / "o").mkdir()
    (comfy.tmp / "t").mkdir()
    o, t = make_base(comfy.tmp / "o", "bfl", seed=0), make_base(comfy.tmp / "t", "bfl", seed=1)
    orig, tuned = load_file(o), load_file(t)
    node = _node(comfy, "LorakitExtractLora")
    kwargs = dict(rank=3, conv_rank=0, dynamic="off", dynamic_param=0.9, seed=5, target_format="comfy",
                  dtype="keep", filename_prefix="loras/ext")
    if mode == "two models":
        out = node.extract(model_tuned=FakeModel(tuned), model_original=FakeModel(orig), **kwargs)
    else:   # what ModelSubtract hands over: tuned − original, already formed
        out = node.extract(model_tuned=FakeModel({k: tuned[k] - orig[k] for k in tuned}), **kwargs)
    path, report = _check_return(type(node), out)
    expected = comfy.cli / "ext_00001_.safetensors"
    assert main(["extract", o, t, "--rank", "3", "--seed", "5", "--to", "comfy", "-o", str(expected)]) in (0, 1)
    got_t, got_m = _tensors_and_meta(path)
    exp_t, exp_m = _tensors_and_meta(expected)
    assert got_t.keys() == exp_t.keys() and all(torch.equal(got_t[k], exp_t[k]) for k in exp_t)
    assert got_m == exp_m
    assert any(k.endswith(".alpha") for k in got_t) and "modules extracted" in report


def test_doctor_node_gives_the_cli_verdict(comfy, capsys):
    base = make_base(comfy.tmp, "bfl")
    model = FakeModel(load_file(base))
    node = _node(comfy, "LorakitLoraDoctor")
    verdict, text = _check_return(type(node), node.diagnose(model=model, lora_name="a.safetensors"))
    assert main(["doctor", str(comfy.loras / "a.safetensors"), "--base", base, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)["loras"][0]
    assert verdict == cli["verdict"] == "OK" and cli["summary"] in text
    # a LoRA whose modules are wider than the model's
    wide = comfy.loras / "wide.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.ones(2, 48),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.ones(48, 2)}, str(wide))
    verdict, text = _check_return(type(node), node.diagnose(model=model, lora_name="wide.safetensors"))
    assert main(["doctor", str(wide), "--base", base, "--json"]) == 2
    cli = json.loads(capsys.readouterr().out)["loras"][0]
    assert verdict == cli["verdict"] != "OK" and cli["summary"] in text


def test_a_missing_lora_is_a_one_line_lorakit_error(comfy):
    from lorakit.errors import LorakitError
    node = _node(comfy, "LorakitResizeLora")
    with pytest.raises(LorakitError) as exc:
        node.resize(lora_name="gone.safetensors", rank=2, conv_rank=0, dynamic="off", dynamic_param=0.9,
                    dtype="keep", filename_prefix="x")
    assert "gone.safetensors" in str(exc.value) and "\n" not in str(exc.value)
    assert not any(comfy.output.rglob("*.safetensors"))


def test_patches_are_applied_before_extracting_and_not_for_the_doctor(comfy, monkeypatch):
    """ComfyUI holds a ModelSubtract difference (and loaded LoRAs) as pending patches: extract has the model
    manager patch the weights first (force_patch_weights=True); the doctor reads shapes only."""
    calls = []
    comfy_pkg = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.load_models_gpu = lambda models, force_patch_weights=False: calls.append((len(models), force_patch_weights))
    comfy_pkg.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy_pkg)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    base = make_base(comfy.tmp, "bfl")
    model = FakeModel(load_file(base))
    comfy.pkg.NODE_CLASS_MAPPINGS["LorakitLoraDoctor"]().diagnose(model=model, lora_name="a.safetensors")
    assert calls == []
    (comfy.tmp / "t").mkdir()
    tuned = FakeModel(load_file(make_base(comfy.tmp / "t", "bfl", seed=2)))
    comfy.pkg.NODE_CLASS_MAPPINGS["LorakitExtractLora"]().extract(
        model_tuned=tuned, model_original=model, rank=2, conv_rank=0, dynamic="off", dynamic_param=0.9, seed=0,
        target_format="comfy", dtype="keep", filename_prefix="x")
    assert calls == [(1, True), (1, True)]
