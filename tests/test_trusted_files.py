"""A shared checkpoint or export is data: nothing named inside it is built or imported.

The crafted files carry the payloads a probe ran against fraqat before: a two-step Hydra chain (a nested
`pathlib.Path.write_text` writes a pickle, then `numpy.load(allow_pickle=True)` unpickles it and runs a
shell command) in a checkpoint's stored model config, in a `.safetensors` export's and in an `.onnx` export's
metadata; and a `.safetensors` export naming a transformer class in a module whose import has a side effect.
Each runs through the real console script; the payload's marker file must never appear.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from train_support import cli_env, console

from fraqat_cli.stored_config import UntrustedConfig, check_stored_config, known_names, trusted_config
from fraqat_cli.student.checkpoint import StudentCheckpoint

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("_"))


def composed(*overrides: str) -> dict:
    """The training config fraqat-train would store for `overrides` (resolved plain containers)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="train", overrides=list(overrides)), resolve=True)


def pickle_chain(marker: Path, work: Path) -> dict:
    """A config node that, instantiated, writes a protocol-0 pickle of `os.system("touch MARKER")` and loads it
    with numpy's pickles allowed: arbitrary code from two harmless-looking calls (`_target_`s)."""
    payload = work / "payload.pkl"
    pickle_text = f"cposix\nsystem\n(S'touch {marker}'\ntR."
    return {"_target_": "numpy.load", "file": str(payload), "allow_pickle": True,
            "max_header_size": {"_target_": "pathlib.Path.write_text",
                                "_args_": [{"_target_": "pathlib.Path", "_args_": [str(payload)]}, pickle_text]}}


def crafted_checkpoint(path: Path, config: dict) -> Path:
    torch.save({"global_step": 4, "state_dict": {"student.proj.weight": torch.zeros(2, 2)},
                "fraqat": {"config": config, "schedule": "fractional"}}, path)
    return path


def crafted_safetensors(path: Path, model_config: dict, transformer_class: str) -> Path:
    from safetensors.torch import save_file

    from fraqat_cli.export.safetensors_file import FORMAT

    info = {"model": model_config["name"], "schedule": "fractional", "granularity": "per_tensor", "step": 4,
            "weight_bits": 4.0, "teacher_dtype": "float32", "model_config": model_config}
    save_file({"proj.weight": torch.zeros(2, 2)}, str(path), metadata={
        "format": FORMAT, "info": json.dumps(info), "transformer_class": transformer_class,
        "transformer_config": json.dumps({}), "layers": json.dumps({})})
    return path


def crafted_onnx(path: Path, model_config: dict) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("latents", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["latents"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    info = {"model": model_config["name"], "schedule": "fractional", "granularity": "per_tensor", "step": 4,
            "weight_bits": 4.0, "model_config": model_config}
    helper.set_model_props(model, {"fraqat_info": json.dumps(info), "fraqat_format": "onnx"})
    onnx.save(model, str(path))
    return path


def one_error(result, program: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{program}: error: ")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def chained_config(tmp_path) -> tuple[dict, Path]:
    marker = tmp_path / "pwned"
    config = composed("model=tiny_sana")
    config["model"]["family"] = pickle_chain(marker, tmp_path)
    return config, marker


@pytest.mark.parametrize("program", ["fraqat-eval", "fraqat-export"])
def test_a_checkpoint_naming_a_pickle_chain_is_refused_and_runs_nothing(program, chained_config, tmp_path, cache_dir):
    config, marker = chained_config
    ckpt = crafted_checkpoint(tmp_path / "shared.ckpt", config)
    result = console(program, [f"ckpt={ckpt}", "logger=none"] if program == "fraqat-eval" else [f"ckpt={ckpt}"],
                     tmp_path, cache_dir)
    error = one_error(result, program)
    assert "model.family._target_='numpy.load'" in error and "allowed: fraqat_cli.models.families." in error
    assert "model=NAME" in error
    assert not marker.exists(), "the checkpoint's payload ran"


@pytest.mark.parametrize("kind", ["safetensors", "onnx"])
def test_an_export_whose_metadata_names_a_pickle_chain_is_refused_and_runs_nothing(kind, chained_config, tmp_path,
                                                                                 cache_dir):
    config, marker = chained_config
    file = (crafted_safetensors(tmp_path / "student.safetensors", config["model"], "diffusers.SanaTransformer2DModel")
            if kind == "safetensors" else crafted_onnx(tmp_path / "student.onnx", config["model"]))
    error = one_error(console("fraqat-eval", [f"ckpt={file}", "logger=none"], tmp_path, cache_dir), "fraqat-eval")
    assert "model.family._target_='numpy.load'" in error
    assert not marker.exists(), "the export's payload ran"


def test_an_export_naming_an_unknown_transformer_class_imports_nothing(tmp_path, cache_dir):
    """The class is resolved against the model configs' transformer classes; the module is never imported."""
    marker = tmp_path / "imported"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "side_effect.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model: ...\n")
    file = crafted_safetensors(tmp_path / "student.safetensors", composed("model=tiny_sana")["model"],
                               "side_effect.Model")
    env = cli_env(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "lib"), env.get("PYTHONPATH")]))
    result = subprocess.run([str(Path(sys.executable).parent / "fraqat-eval"), f"ckpt={file}", "logger=none"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    error = one_error(result, "fraqat-eval")
    assert "transformer_class='side_effect.Model'" in error and "diffusers.SanaTransformer2DModel" in error
    assert not marker.exists(), "the module the file named was imported"


@pytest.mark.slow
@pytest.mark.parametrize("class_name", ["UNet2DConditionModel", "side_effect.Model"])
def test_a_diffusers_folder_naming_a_class_fraqat_does_not_know_is_refused_and_imports_nothing(tmp_path, cache_dir,
                                                                                               class_name):
    """A folder's config.json chooses no class: a real diffusers class that no model config names is refused as
    a module on the path is, before any weight is read."""
    from safetensors.torch import save_file

    marker = tmp_path / "imported"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "side_effect.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model: ...\n")
    folder = tmp_path / "student"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": class_name}))
    save_file({"w": torch.zeros(2)}, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    env = cli_env(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "lib"), env.get("PYTHONPATH")]))
    result = subprocess.run([str(Path(sys.executable).parent / "fraqat-eval"), f"ckpt={folder}", "logger=none"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    error = one_error(result, "fraqat-eval")
    assert f"transformer_class='diffusers.{class_name}'" in error and "diffusers.SanaTransformer2DModel" in error
    assert not marker.exists(), "the module the folder named was imported"


# --- the allow-list itself ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [[f"model={m}"] for m in MODELS] + [[f"experiment={e}"] for e in EXPERIMENTS]
                         + [["quantizer=per_group"], ["optim=adamw8bit"], ["trainable=lora"], ["logger=csv"],
                            ["trainer=fsdp"], ["data=coco"]], ids=lambda o: o[0])
def test_every_config_fraqat_itself_writes_is_trusted(overrides):
    check_stored_config(composed(*overrides), "test")


@pytest.mark.parametrize("where", ["family", "noise", "components.vae", "components.text_encoder.config",
                                   "architecture"])
def test_a_model_config_naming_a_foreign_callable_anywhere_is_refused(where):
    config = composed("model=tiny_flux")
    *parents, last = where.split(".")
    node = config["model"]
    for key in parents:
        node = node[key]
    node[last] = {**(node.get(last) or {}), "_target_": "os.system"}
    with pytest.raises(UntrustedConfig, match=rf"model\.{where}\._target_='os\.system'"):
        check_stored_config(config, "test")


@pytest.mark.parametrize("key, value", [("pipeline", "subprocess.Popen"), ("transformer_class", "os.system"),
                                        ("block_classes", ["diffusers.FluxTransformer2DModel", "os.system"])])
def test_class_names_a_file_gives_must_be_ones_the_model_configs_give(key, value):
    config = composed("model=tiny_flux")
    config["model"][key] = value
    with pytest.raises(UntrustedConfig, match=rf"model\.{key}='?.*allowed: "):
        check_stored_config(config, "test")


def test_a_known_name_at_another_key_is_still_refused():
    """A class fraqat uses somewhere is not allowed everywhere: a family must be a family."""
    config = composed("model=tiny_sana")
    config["model"]["family"] = {"_target_": "fraqat_cli.cli.WritableRunFolder", "program": "x"}
    with pytest.raises(UntrustedConfig, match="family"):
        check_stored_config(config, "test")


def test_a_quantizer_node_from_a_file_cannot_name_a_foreign_target():
    config = composed("model=tiny_sana")
    config["quantizer"]["layers"] = {"_target_": "builtins.exec", "_args_": ["print(1)"]}
    with pytest.raises(UntrustedConfig, match=r"quantizer\.layers\._target_='builtins\.exec'"):
        check_stored_config(config, "test")


def test_an_interpolation_in_a_stored_config_is_refused():
    config = composed("model=tiny_sana")
    config["model"]["hub_id"] = "${oc.env:HOME}"
    with pytest.raises(UntrustedConfig, match="interpolation"):
        check_stored_config(config, "test")


def test_the_model_a_user_gives_replaces_the_stored_one(tmp_path):
    """`model=NAME` is the way on for a trusted file: the stored model config is not read, the user's is used."""
    config = composed("model=tiny_sana")
    config["model"]["family"] = {"_target_": "my_lab.families.CustomFamily"}
    path = crafted_checkpoint(tmp_path / "x.ckpt", config)
    with pytest.raises(UntrustedConfig):
        StudentCheckpoint.read(path)
    users = OmegaConf.create(composed("model=tiny_sana")["model"])
    stored = StudentCheckpoint.read(path, model=users)
    assert stored.config.model.family._target_ == "fraqat_cli.models.families.SanaFamily"
    with pytest.raises(ValueError, match="not of model='tiny_flux'"):
        trusted_config(config, "x", OmegaConf.create(composed("model=tiny_flux")["model"]))


def test_the_allow_list_holds_the_families_and_their_diffusers_classes():
    names = known_names()
    assert "fraqat_cli.models.families.FluxFamily" in names["family"]
    assert "diffusers.FluxTransformer2DModel" in names["transformer_class"]
    assert "numpy.load" not in set().union(*names.values())
