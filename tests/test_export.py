"""A training export records what animate needs (dynamictrl.json) and animate runs it as it was trained."""

import json

import numpy as np
import pytest
from PIL import Image
from skimage.data import astronaut

from dynamictrl import config
from dynamictrl.errors import UserError
from dynamictrl.utils.video import write_video


@pytest.fixture(scope="module")
def shards41(tmp_path_factory):
    """Shards of 41-frame clips (the embedded model's own clips are 9 frames)."""
    from dynamictrl.data.synthetic import generate
    from dynamictrl.preprocess.run import run

    raw = generate(tmp_path_factory.mktemp("raw41"), num_train=1, num_test=0, num_frames=41, progress=False)
    out = tmp_path_factory.mktemp("shards41")
    run(config.load("preprocess", [f"input={raw}", f"output={out}", "progress=false", "num_frames=41"]))
    return out


def test_a_model_trained_at_41_frames_animates_in_41_frame_clips(tiny_model, shards41, tmp_path, clip_lengths):
    from dynamictrl.animate.run import run as animate_run
    from dynamictrl.train.run import run as train_run
    from test_animate_app import animate_cfg

    out = tmp_path / "run"
    train_run(config.load("train", [f"data.train_shards={shards41}/train-*.tar", f"output={out}",
                                    f"model.path={tiny_model}", "debug=default", "trainer.max_steps=1",
                                    "data.num_frames=41", "checkpoint_every=0"]))  # fmt: skip
    settings = json.loads((out / "dynamictrl.json").read_text())
    assert settings["num_frames"] == 41 and settings["buckets"] == [[96, 64]] and settings["fps"] == 8.0
    assert settings["reference_scaling"] == "diffusers" and settings["base"] == str(tiny_model.resolve())

    Image.fromarray(astronaut()).save(tmp_path / "ref.png")
    write_video(tmp_path / "pose.mp4", np.random.default_rng(0).integers(0, 255, (12, 96, 64, 3), dtype=np.uint8), 8)
    lengths = clip_lengths
    result = animate_run(animate_cfg(image=tmp_path / "ref.png", pose=tmp_path / "pose.mp4", prompt="'an astronaut'",
                                     model=out, steps=1, output=tmp_path / "o.mp4"))  # fmt: skip
    assert lengths == [41] and result["frames"] == 12  # one 41-frame clip (the base's own default is 9)
    used = json.loads((tmp_path / "o.json").read_text())
    assert used["clip_frames"] == 41 and (used["height"], used["width"]) == (96, 64)


def test_training_at_a_frame_count_the_model_cannot_take_is_a_one_line_error(tiny_model, shards41, tmp_path):
    from dynamictrl.train.run import run as train_run

    cfg = config.load("train", [f"data.train_shards={shards41}/train-*.tar", f"output={tmp_path}",
                                f"model.path={tiny_model}", "debug=default", "data.num_frames=39"])  # fmt: skip
    with pytest.raises(UserError, match=r"data.num_frames=39 is not valid .* nearest valid: 37 or 41") as err:
        train_run(cfg)
    assert "\n" not in str(err.value)


def test_precompute_takes_37_frame_clips_and_refuses_38(tiny_model, shards41, tmp_path):
    import io

    import webdataset as wds

    from dynamictrl.data.shards import decode_sample, list_shards
    from dynamictrl.models import latents as Z
    from dynamictrl.train.precompute import load_encoders, precompute_sample
    from dynamictrl.train.precompute import run as precompute

    pipe, text_len, codec = load_encoders(str(tiny_model), "cpu")
    assert codec.patch_size_t == 2  # the frame policy comes from the transformer's config
    raw = next(iter(wds.DataPipeline(wds.SimpleShardList(list_shards(shards41)), wds.tarfile_to_samples())))
    s = decode_sample(raw)
    out = precompute_sample(pipe, text_len, s, 37, "cpu", np.float32, codec)
    latents = np.load(io.BytesIO(out["latents.npy"]))
    assert latents.shape == (10, 16, 24, 16)
    expected = codec.encode_video(Z.frames_to_tensor(s["frames"][:37])[None])[0].numpy()
    np.testing.assert_allclose(latents, expected, rtol=1e-5, atol=1e-5)
    cfg = config.load("precompute", [f"input={shards41}", f"output={tmp_path}", f"model.path={tiny_model}",
                                     "num_frames=38", "progress=false"])  # fmt: skip
    with pytest.raises(UserError, match=r"num_frames=38 is not valid .* nearest valid: 37 or 41"):
        precompute(cfg)
