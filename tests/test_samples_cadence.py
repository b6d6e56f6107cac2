"""Sample videos come once per optimizer step, not once per batch: with gradient accumulation most
batches end without a step (and the global step they see is the previous one)."""

import pytest

from dynamictrl import config
from dynamictrl.train.run import run


@pytest.mark.slow
def test_with_accumulation_each_sampled_step_gives_one_video(tiny_model, shards, tmp_path):
    out = tmp_path / "run"
    result = run(config.load("train", [f"data.train_shards={shards}/train-*.tar", f"model.path={tiny_model}",
                                       f"output={out}", "debug=default", "data.batch_size=1", "trainer.max_steps=2",
                                       "+trainer.accumulate_grad_batches=2", "samples.every_n_steps=1",
                                       "samples.num_inference_steps=1", "checkpoint_every=0"]))  # fmt: skip
    assert result["steps"] == 2
    assert [p.rsplit("/", 1)[1] for p in result["samples"]] == ["step-000001.mp4", "step-000002.mp4"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000001.mp4", "step-000002.mp4"]
