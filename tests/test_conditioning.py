"""Prompt encoding and training data at scale: batched, sharded, resumable, locked, read a row at a time."""

from __future__ import annotations

import gc
import pickle
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from train_support import cli_env

from fraqat_cli.cache import ShardedStore, sharded_tensors
from fraqat_cli.data.captions import offline_captions
from fraqat_cli.data.conditioning import conditioning_store, prompt_conditioning
from fraqat_cli.data.sources import ConditionedLatents, PromptOnlySource
from fraqat_cli.models.conditioning import Conditioning
from fraqat_cli.models.families import SanaFamily
from fraqat_cli.models.generation import generate
from fraqat_cli.models.loading import load_model

MODELS = Path(__file__).resolve().parents[1] / "conf" / "model"


def tiny(name: str = "tiny_sana", **overrides):
    cfg = OmegaConf.load(MODELS / f"{name}.yaml")
    cfg.merge_with(overrides)
    return cfg


class CountingEncoder:
    """Wraps `SanaFamily.encode_prompts` (the real one) to count calls, keep a weak reference to the text
    encoder it ran, and raise on call `fail_at` as an interrupted run would."""

    def __init__(self, monkeypatch, fail_at: int | None = None) -> None:
        self.calls, self.fail_at, self.encoder = 0, fail_at, None
        original = SanaFamily.encode_prompts

        def encode(family, pipe, prompts, max_sequence_length, device=None):
            self.calls += 1
            self.encoder = weakref.ref(pipe.text_encoder)
            if self.calls == self.fail_at:
                raise KeyboardInterrupt("interrupted")
            return original(family, pipe, prompts, max_sequence_length, device)

        monkeypatch.setattr(SanaFamily, "encode_prompts", encode)


@pytest.mark.parametrize("name", ["tiny_sana", "tiny_pixart", "tiny_sd3", "tiny_flux"])
def test_batched_encoding_equals_one_call(tmp_path, monkeypatch, name):
    model_cfg = tiny(name, encode_batch_size=3)
    family_cls = type(instantiate(model_cfg.family))
    original, used = family_cls.encode_prompts, []

    def keep_pipeline(family, pipe, *args, **kwargs):
        used.append(pipe)  # the tiny CLIP tokenizer is retrained on every build: compare with the same encoders
        return original(family, pipe, *args, **kwargs)

    monkeypatch.setattr(family_cls, "encode_prompts", keep_pipeline)
    prompts = offline_captions(7, seed=1)
    store = conditioning_store(model_cfg, prompts, str(tmp_path), device="cpu")
    assert len(store.files) == 3 and len(used) == 4  # the negative prompt, then 3 + 3 + 1 prompts

    with torch.no_grad():
        whole = original(family_cls(), used[0], prompts, model_cfg.max_sequence_length)
        empty = original(family_cls(), used[0], [""], model_cfg.max_sequence_length)
    cond, negative = store.load(), store.shared()
    assert cond.keys() == whole.keys() and negative.keys() == empty.keys()
    for k in whole:
        torch.testing.assert_close(cond[k], whole[k])
        torch.testing.assert_close(negative[k], empty[k])
        assert cond[k].dtype == whole[k].dtype  # stored in the encoders' own dtype


def test_interrupted_encoding_resumes_from_its_shards_and_ends_equal(tmp_path, monkeypatch):
    model_cfg, prompts = tiny(encode_batch_size=2), offline_captions(9, seed=2)  # 5 shards
    interrupted = CountingEncoder(monkeypatch, fail_at=4)  # the negative prompt, 2 shards, then stop
    with pytest.raises(KeyboardInterrupt):
        conditioning_store(model_cfg, prompts, str(tmp_path / "a"), device="cpu")
    assert interrupted.calls == 4
    (folder,) = (tmp_path / "a").glob("prompts-*/")
    assert len(list(folder.glob("shard-*.safetensors"))) == 2
    assert not (folder / "index.json").exists() and not list(folder.glob(".*.tmp"))

    resumed = CountingEncoder(monkeypatch)
    store = conditioning_store(model_cfg, prompts, str(tmp_path / "a"), device="cpu")
    assert resumed.calls == 3, "only the 3 missing shards are encoded"

    uninterrupted = conditioning_store(model_cfg, prompts, str(tmp_path / "b"), device="cpu")
    for k, v in uninterrupted.load().items():
        assert torch.equal(store.load()[k], v)
    for k, v in uninterrupted.shared().items():
        assert torch.equal(store.shared()[k], v)


def test_text_encoders_are_released_after_encoding(tmp_path, monkeypatch):
    counting = CountingEncoder(monkeypatch)
    conditioning_store(tiny(), offline_captions(3, seed=0), str(tmp_path), device="cpu")
    gc.collect()
    assert counting.calls == 2 and counting.encoder() is None


def test_a_complete_store_is_read_without_loading_the_encoders(tmp_path, monkeypatch):
    prompts = offline_captions(4, seed=0)
    first = prompt_conditioning(tiny(), prompts, str(tmp_path), device="cpu")
    counting = CountingEncoder(monkeypatch)
    again = prompt_conditioning(tiny(), prompts, str(tmp_path), device="cpu")
    assert counting.calls == 0
    assert all(torch.equal(first.positive[k], again.positive[k]) for k in first.positive)


@pytest.mark.parametrize(("overrides", "prompts", "message"), [
    ({"encode_batch_size": 0}, ["a red circle"], "model.encode_batch_size must be a positive integer; got 0"),
    ({}, [], "prompt list is empty"),
], ids=["zero-batch", "no-prompts"])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, overrides, prompts, message):
    with pytest.raises(ValueError, match=message):
        conditioning_store(tiny(**overrides), prompts, str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


CONCURRENT = """
import sys, time
from pathlib import Path
from omegaconf import OmegaConf
from fraqat_cli.data.conditioning import conditioning_store
from fraqat_cli.models.families import SanaFamily
from fraqat_cli.data.captions import offline_captions

calls = []
original = SanaFamily.encode_prompts
SanaFamily.encode_prompts = lambda *a, **k: calls.append(1) or original(*a, **k)
model_cfg = OmegaConf.load(sys.argv[1]); model_cfg.encode_batch_size = 2
Path(sys.argv[3]).touch()
while not Path(sys.argv[4]).exists():  # both processes start encoding at the same moment
    time.sleep(0.01)
store = conditioning_store(model_cfg, offline_captions(12, seed=3), sys.argv[2], device="cpu")
print(len(calls), float(store.load()["prompt_embeds"].double().sum()))
"""


@pytest.mark.slow
def test_two_processes_encode_one_entry_once_and_read_the_same(tmp_path):
    go = tmp_path / "go"
    processes = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, str(MODELS / "tiny_sana.yaml"), str(tmp_path / "cache"),
                          str(tmp_path / f"ready{i}"), str(go)],
                         env=cli_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in results]
    calls, sums = zip(*(out.split() for out, _ in results))
    assert sorted(int(c) for c in calls) == [0, 7], "one process encodes (negative + 6 shards), the other waits"
    assert sums[0] == sums[1]


def synthetic_store(folder: Path, kind: str, rows: int, shard_rows: int, width: int) -> ShardedStore:
    """Row i of `values` is filled with i, so any row read can be checked by its content."""
    compute = lambda start, stop: {"values": torch.arange(start, stop, dtype=torch.float32)[:, None].expand(-1, width)}
    return sharded_tensors(folder, kind, {"rows": rows}, rows, shard_rows, compute)


def test_store_reads_single_rows_and_ranges_across_shards(tmp_path):
    store = synthetic_store(tmp_path, "numbers", rows=10, shard_rows=4, width=3)
    assert len(store) == 10 and len(store.files) == 3
    assert torch.equal(store[5]["values"], torch.full((3,), 5.0))
    assert torch.equal(store[-1]["values"], torch.full((3,), 9.0))
    assert torch.equal(store.read(2, 9)["values"][:, 0], torch.arange(2, 9, dtype=torch.float32))
    with pytest.raises(IndexError, match="row 10 is out of range"):
        store[10]


def test_dataset_holds_no_rows_and_serves_dataloader_workers(tmp_path):
    rows = 11
    conditioning = synthetic_store(tmp_path, "cond", rows, shard_rows=4, width=4096)
    latents = sharded_tensors(tmp_path, "latents", {"rows": rows}, rows, 3,
                              lambda a, b: {"latents": -torch.arange(a, b, dtype=torch.float32)[:, None]})
    dataset = ConditionedLatents(conditioning, latents)
    assert len(pickle.dumps(dataset)) < 4096 < rows * 4096 * 4, "the dataset pickles as file names, not tensors"

    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    batches = list(loader)
    values = torch.cat([b["values"][:, 0] for b in batches])
    assert torch.equal(values, torch.arange(rows, dtype=torch.float32))
    assert torch.equal(torch.cat([b["latents"][:, 0] for b in batches]), -values)


def test_teacher_latents_resume_after_an_interruption_and_match_one_generation(tmp_path, monkeypatch):
    import fraqat_cli.data.sources as data

    model_cfg = tiny(encode_batch_size=2)
    source = PromptOnlySource(num_prompts=5, shard_rows=2)
    conditioning = conditioning_store(model_cfg, source.prompts(), str(tmp_path), device="cpu")
    model = load_model(model_cfg)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        return generate(*args, **kwargs)

    monkeypatch.setattr(data, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        source.latent_store(model, conditioning, str(tmp_path), seed=7, device="cpu")
    monkeypatch.setattr(data, "generate", generate)
    store = source.latent_store(model, conditioning, str(tmp_path), seed=7, device="cpu")
    assert len(store) == 5 and len(store.files) == 3

    in_memory_conditioning = Conditioning(conditioning.load(), conditioning.shared())
    expected = generate(model, in_memory_conditioning, list(range(7, 12)), output_type="latent")
    torch.testing.assert_close(store.load()["latents"], expected)
    in_memory = source.latents(model, in_memory_conditioning, str(tmp_path), seed=7)  # reads the same cache entry
    assert torch.equal(in_memory, store.load()["latents"])
