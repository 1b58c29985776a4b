"""Checkpoints that fit on a disk: step checkpoints hold the student alone and only the last few are kept,
`last.ckpt` resumes, names pass through Hydra unquoted, and a rebuilt student multiplies by exactly the
weights it trained with."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf
from train_support import FAST, cli_env, fraqat_train

from fraqat_cli.models.loading import load_pipeline
from fraqat_cli.quant import QuantLinear
from fraqat_cli.student.build import build_student, model_skeleton
from fraqat_cli.student.checkpoint import LAST, StudentCheckpoint, load_checkpoint
from fraqat_cli.student.rebuild import rebuild_student
from fraqat_cli.train.callbacks import BitScheduleCallback
from fraqat_cli.train.checkpointing import (
    AtomicCheckpointIO,
    check_checkpoint_settings,
    checkpoint_callbacks,
    checkpoint_sizes,
)
from fraqat_cli.train.distill import DistillationModule
from fraqat_cli.train.optimizers import adamw

STEPS, EVERY, KEEP = 7, 2, 2  # step checkpoints at 2, 4, 6; the last two kept; last.ckpt at 7


def compose_train(*overrides: str):
    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def fixed_batches(count: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"latents": torch.randn(2, 4, 16, 16, generator=g),  # (B, C, H, W)
             "prompt_embeds": torch.randn(2, 16, 32, generator=g),  # (B, L, D)
             "prompt_attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(count)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Sana student trained in-process for STEPS steps with fraqat-train's checkpoint callbacks;
    returns (config, teacher, the student as it ends training, checkpoint folder, sizes estimated up front)."""
    folder = tmp_path_factory.mktemp("ckpts")
    cfg = compose_train("model=tiny_sana", "quantizer=per_channel", f"trainer.max_steps={STEPS}",
                        f"checkpoint.every_n_steps={EVERY}", f"checkpoint.keep={KEEP}", "logger=none")
    pipe = load_pipeline(cfg.model, without=("tokenizer", "text_encoder"))
    schedule = instantiate(cfg.schedule)
    student, _ = build_student(pipe.transformer, cfg.quantizer, cfg.selection, schedule(0, STEPS))
    noise = instantiate(cfg.model.noise).bind(pipe.scheduler.config)
    module = DistillationModule(pipe.transformer, student, instantiate(cfg.model.family), noise,
                                optimizer=partial(adamw, lr=1e-3),
                                trainable=cfg.trainable.patterns,
                                record={"config": OmegaConf.to_container(cfg, resolve=True)})
    sizes = checkpoint_sizes(student)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        callbacks=[BitScheduleCallback(schedule), *checkpoint_callbacks(cfg.checkpoint, folder)])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(fixed_batches(STEPS), batch_size=None))
    return cfg, pipe.transformer, module.student, folder, sizes


def test_step_checkpoints_hold_the_student_alone_and_only_the_last_few_stay(trained):
    _, _, student, folder, _ = trained
    assert sorted(p.name for p in folder.iterdir()) == [LAST, "step-000004.ckpt", "step-000006.ckpt"]
    for name in ("step-000004.ckpt", "step-000006.ckpt"):
        stored = load_checkpoint(folder / name)
        assert "optimizer_states" not in stored and "callbacks" not in stored
        assert set(stored["state_dict"]) == {f"student.{k}" for k in student.state_dict()}
        assert "weight_bits" not in stored["fraqat"], "the bit-width lives in the quantizer buffers alone"


def test_last_checkpoint_is_resumable_and_holds_the_final_step(trained):
    _, _, student, folder, _ = trained
    stored = load_checkpoint(folder / LAST)
    assert stored["global_step"] == STEPS, "written at the end although 7 is not a multiple of 2"
    moments = stored["optimizer_states"][0]["state"]
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert len(moments) == len(trainable) and all({"exp_avg", "exp_avg_sq"} <= set(m) for m in moments.values())
    assert "loops" in stored and stored["callbacks"]
    assert StudentCheckpoint.read(folder / LAST).resumable
    assert not StudentCheckpoint.read(folder / "step-000006.ckpt").resumable


def test_sizes_estimated_before_training_match_the_files(trained):
    _, _, _, folder, sizes = trained
    assert (folder / "step-000006.ckpt").stat().st_size == pytest.approx(sizes.student_bytes, rel=0.03)
    assert (folder / LAST).stat().st_size == pytest.approx(sizes.resumable_bytes, rel=0.03)


def test_bits_and_step_are_read_from_the_checkpoint(trained):
    cfg, _, student, folder, _ = trained
    stored = StudentCheckpoint.read(folder / "step-000004.ckpt")
    schedule = instantiate(cfg.schedule)
    assert stored.step == 4 and stored.bits == (schedule(3, STEPS),)  # the bits the 4th step trained at
    assert StudentCheckpoint.read(folder / LAST).bits == (4.0,)
    assert stored.config.model.name == "tiny_sana" and stored.label == "step-000004"  # not in a run folder


def fake_quantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {n: m.weight_quantizer(m.weight) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_rebuilt_student_multiplies_by_the_weights_it_trained_with(trained):
    """float32: bit-identical quantized weights and outputs; bfloat16: the trained float32 quantized weights
    rounded once to bfloat16 (what bf16-mixed training multiplied), not re-quantized from bfloat16 weights."""
    _, teacher, student, folder, _ = trained
    stored = StudentCheckpoint.read(folder / LAST)
    expected = fake_quantized_weights(student)
    for bake in (False, True):  # export's float32 master weights; eval's weights quantized once
        rebuilt = rebuild_student(stored, teacher, bake=bake)
        got = fake_quantized_weights(rebuilt)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
        batch = fixed_batches(1)[0]
        kwargs = {"hidden_states": batch["latents"], "timestep": torch.tensor([300, 700]),
                  "encoder_hidden_states": batch["prompt_embeds"],
                  "encoder_attention_mask": batch["prompt_attention_mask"]}
        with torch.no_grad():
            assert torch.equal(rebuilt(**kwargs).sample, student.eval()(**kwargs).sample)
    in_bf16 = fake_quantized_weights(rebuild_student(stored, model_skeleton(teacher), dtype=torch.bfloat16,
                                                     bake=True))
    assert all(in_bf16[k].dtype == torch.bfloat16 and torch.equal(in_bf16[k], expected[k].bfloat16())
               for k in expected)


def test_a_checkpoint_of_another_architecture_is_refused(trained):
    _, _, _, folder, _ = trained
    other = load_pipeline(OmegaConf.load("conf/model/tiny_pixart.yaml"), without=("tokenizer", "text_encoder"))
    with pytest.raises(ValueError, match="does not fit PixArtTransformer2DModel"):
        rebuild_student(StudentCheckpoint.read(folder / LAST), other.transformer)


def test_locate_finds_files_runs_and_sweeps(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        StudentCheckpoint.locate(tmp_path)
    for job in ("0-a", "1-b"):
        (tmp_path / job / "checkpoints").mkdir(parents=True)
        (tmp_path / job / "checkpoints" / LAST).touch()
    assert StudentCheckpoint.locate(tmp_path) == (sorted(tmp_path.glob(f"*/checkpoints/{LAST}")), tmp_path)
    run = tmp_path / "0-a"
    assert StudentCheckpoint.locate(run) == ([run / "checkpoints" / LAST], None)
    assert StudentCheckpoint.locate(run / "checkpoints") == ([run / "checkpoints" / LAST], None)


@pytest.mark.parametrize("overrides,message", [(["checkpoint.keep=-1"], "checkpoint.keep must be an integer >= 0"),
                                               (["checkpoint.optimizer=maybe"], "checkpoint.optimizer must be true"),
                                               (["checkpoint.every_n_steps=0"], "checkpoint.every_n_steps must be")])
def test_bad_checkpoint_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_checkpoint_settings(compose_train(*overrides).checkpoint)


# --- through the console scripts ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, cache_dir):
    """`fraqat-train` for 5 steps (step checkpoints at 2 and 4, two kept), then resumed to 7 (one more at 6)."""
    work = tmp_path_factory.mktemp("cli")
    args = [a for a in FAST if not a.startswith(("trainer.max_steps=", "checkpoint.every_n_steps="))]
    args += ["checkpoint.every_n_steps=2", "checkpoint.keep=2", f"hydra.run.dir={work}/run"]
    first = fraqat_train([*args, "trainer.max_steps=5"], cwd=work, cache_dir=cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    files = sorted(p.name for p in (work / "run" / "checkpoints").iterdir())
    resumed = fraqat_train([*args, "trainer.max_steps=7", "resume=force"], cwd=work, cache_dir=cache_dir)  # 2 more
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return work, first.stdout, files


def printed_mib(stdout: str, kind: str) -> float:
    return float(re.search(rf"checkpoint sizes:.*{kind} ([0-9.]+) MiB", stdout).group(1))


@pytest.mark.slow
def test_train_prints_the_size_of_each_kind_and_resuming_keeps_pruning(cli_run):
    work, stdout, files_before = cli_run
    assert files_before == [LAST, "step-000002.ckpt", "step-000004.ckpt"]
    folder = work / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [LAST, "step-000004.ckpt", "step-000006.ckpt"]
    assert load_checkpoint(folder / LAST)["global_step"] == 7
    for kind, file in (("student-only", "step-000006.ckpt"), ("resumable", LAST)):
        assert printed_mib(stdout, kind) * 2**20 == pytest.approx((folder / file).stat().st_size, rel=0.03)


def run_script(name: str, args: list[str], cwd: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / name), *args], cwd=cwd, env=cli_env(cache_dir),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_step_checkpoint_names_pass_through_hydra_unquoted(cli_run, cache_dir):
    work, _, _ = cli_run
    step = work / "run" / "checkpoints" / "step-000006.ckpt"
    parsed = run_script("fraqat-eval", [f"ckpt={step}", "--cfg", "job"], work, cache_dir)
    assert parsed.returncode == 0 and f"ckpt: {step}" in parsed.stdout, parsed.stderr[-2000:]
    old_name = run_script("fraqat-eval", [f"ckpt={step.with_name('step=000006.ckpt')}", "--cfg", "job"], work,
                          cache_dir)
    assert old_name.returncode != 0, "a name with '=' is what the override grammar refuses"


@pytest.mark.slow
def test_a_step_checkpoint_exports_and_evaluates(cli_run, cache_dir):
    work, _, _ = cli_run
    step = work / "run" / "checkpoints" / "step-000006.ckpt"
    exported = run_script("fraqat-export", [f"ckpt={step}"], work, cache_dir)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "relative difference 0.00e+00" in exported.stdout
    assert (work / "run" / "export" / "student-step-000006.safetensors").is_file()

    from fraqat_cli.evaluate.command import evaluate

    with initialize_config_module(config_module="fraqat_cli.conf", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            f"ckpt={step}", "prompts=offline", "prompts.count=2", "batch_size=2", "clip.model=null", "logger=none",
            f"out_dir={work}/eval", f"results_csv={work}/results.csv", f"cache_dir={cache_dir}"])
    (result,) = evaluate(cfg)  # last.ckpt is evaluated in test_eval_cli; FID's 2048-d sqrtm costs ~40 s a model
    assert result["label"] == "run-step-000006" and result["weight_bits"] == 4.0 and result["num_images"] == 2
    assert Path(result["images_dir"]).parent.parent == work / "run" / "eval"
