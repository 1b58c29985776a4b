import os
from pathlib import Path

import pytest
import torch

CONF = Path(__file__).resolve().parents[1] / "conf"

# --- whole suite ----------------------------------------------------------------------------------------
# The tiny models run fastest on one thread, and a second thread per process turns into a pile-up when
# test processes share the 2 cores (a 1 s test took 60 s). Subprocesses inherit the variables.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One prompt/latent cache for every CLI run of the session: tiny models' embeddings are computed once."""
    return tmp_path_factory.mktemp("cache")

# Test files whose end-to-end runs take minutes, longest first. `make test` hands whole files to its two workers
# (`--dist loadfile`) in collection order; starting the longest first keeps one worker from being handed a
# three-minute file when the other is nearly done (measured: 13.5 min alphabetical, the CPU time allowing ~11).
LONGEST_FIRST = ("test_eval_trust.py", "test_sharding.py", "test_compiled_student.py", "test_faults.py",
                 "test_export_diffusers.py",
                 "test_resume_reproducible.py", "test_docs.py", "test_export_gguf.py", "test_run_ownership.py",
                 "test_train_cli.py", "test_plan.py", "test_export_cli.py", "test_trusted_files.py",
                 "test_half_states.py",
                 "test_memory_options.py", "test_eval_cli.py", "test_deploy.py", "test_real_scale.py",
                 "test_checkpoints.py", "test_compare_schedules_smoke.py", "test_toy_teachers.py",
                 "test_hparams_search.py", "test_conditioning.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


# --- quantization-core tests (test_fake_quant, test_quant_linear, test_swap, test_schedules) ---------------


@pytest.fixture(scope="module")
def single_threaded_torch():
    """Run a module's tiny tensors on one thread, then restore the thread count.

    On a small shared CPU runner, intra-op thread hand-offs for tensors of a few thousand elements cost far
    more than they save (measured: 0.1 ms single-threaded against 100 ms with 2 threads under load).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_sana_transformer():
    """`conf/model/tiny_sana.yaml`'s transformer with random weights (seed 0): the real diffusers class, CPU-sized,
    built from the same config fraqat-train's tiny_sana uses."""
    from hydra.utils import instantiate  # imported here: the other quant tests need torch only
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    return instantiate(OmegaConf.load(CONF / "model" / "tiny_sana.yaml").components.transformer)


@pytest.fixture
def tiny_sana_batch():
    """Keyword arguments for one forward pass of `tiny_sana_transformer` (batch 2, caption length 5)."""
    g = torch.Generator().manual_seed(1)
    batch, caption_len = 2, 5
    return {
        "hidden_states": torch.randn(batch, 4, 16, 16, generator=g),  # (B, C, H, W) latents
        "encoder_hidden_states": torch.randn(batch, caption_len, 32, generator=g),  # (B, L, caption_channels)
        "timestep": torch.tensor([10, 500]),  # (B,)
        "encoder_attention_mask": torch.ones(batch, caption_len),  # (B, L)
    }


# --- end of quantization-core fixtures ----------------------------------------------------------------------
