"""A run too short for its schedule's stages says so at start-up, in one line naming the bits it skips."""

from __future__ import annotations

import pytest
from train_support import fraqat_train


@pytest.mark.slow
def test_twenty_steps_of_the_fractional_schedule_warn_that_5_bits_never_occur(tmp_path, cache_dir):
    args = ["model=toy", "schedule=fractional", "trainer.max_steps=20", "data.num_prompts=8", "data.batch_size=4",
            "logger=none", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=20",
            f"hydra.run.dir={tmp_path}/run"]
    result = fraqat_train(args, cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [s for s in result.stderr.splitlines() if "too few for schedule" in s]
    assert line == ("warning: 20 steps are too few for schedule fractional's 9 stages: 5 bits never occur; "
                    "every stage gets a step from 21 steps on")
