"""The animate app on a real photo: raw driving video end to end, frame counts, bad inputs."""

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from skimage.data import astronaut

from dynamictrl import config
from dynamictrl.animate.run import run
from dynamictrl.errors import UserError
from dynamictrl.utils.video import read_video, write_video


def animate_cfg(**kw):
    with initialize_config_dir(config_dir=str(config.conf_dir() / "animate"), version_base="1.3"):
        cfg = compose("animate", [f"{k}={v}" for k, v in kw.items()])
    cfg.progress = False
    return cfg


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The astronaut (a real photo shipped in scikit-image) and a 'driving video' of her swaying."""
    d = tmp_path_factory.mktemp("media")
    img = astronaut()
    Image.fromarray(img).save(d / "ref.png")
    frames = [np.roll(img, shift=(0, int(12 * np.sin(i / 2))), axis=(0, 1))[::2, ::2] for i in range(12)]
    write_video(d / "driving.mp4", np.stack(frames), 10)
    Image.fromarray(np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (256, 1, 3))).save(d / "empty.png")
    (d / "notvideo.mp4").write_text("hello")
    return d


def test_raw_driving_video_end_to_end(media, tiny_model, tmp_path):
    cfg = animate_cfg(image=media / "ref.png", driving=media / "driving.mp4", prompt="'an astronaut'",
                      output=tmp_path / "o.mp4", model=tiny_model, steps=1)  # fmt: skip
    result = run(cfg)
    frames, fps = read_video(tmp_path / "o.mp4")
    assert len(frames) == 12 and fps == pytest.approx(10)
    assert frames.shape[1:3] in {(96, 64), (64, 96)}  # a square photo: either bucket
    side, _ = read_video(tmp_path / "o_side.mp4")
    assert side.shape[2] == 3 * frames.shape[2]
    settings = json.loads((tmp_path / "o.json").read_text())
    assert settings["aligned"] and settings["seed"] == 0 and settings["prompt_used"] == "an astronaut"
    assert result["frames"] == 12


def test_num_frames_and_background(media, tiny_model, tmp_path):
    cfg = animate_cfg(image=media / "ref.png", driving=media / "driving.mp4", prompt="'An astronaut. The background is a lab.'",
                      output=tmp_path / "o.mp4", model=tiny_model, steps=1, num_frames=20,
                      background="'a beach'")  # fmt: skip
    assert run(cfg)["frames"] == 20
    assert json.loads((tmp_path / "o.json").read_text())["prompt_used"] == "An astronaut. The background is a beach."


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"image": "missing.png", "driving": "driving.mp4"}, "missing.png: no such file"),
        ({"image": "notvideo.mp4", "driving": "driving.mp4"}, "notvideo.mp4: unreadable image"),
        ({"image": "ref.png", "driving": "notvideo.mp4"}, "notvideo.mp4: unreadable video"),
        ({"image": "ref.png", "pose": "missing.mp4"}, "missing.mp4: no such file"),
        ({"image": "empty.png", "driving": "driving.mp4"}, "no person found in the reference"),
        ({"image": "ref.png"}, "exactly one of pose="),
    ],
)
def test_bad_inputs_get_one_line_errors(media, tiny_model, tmp_path, kw, message):
    args = {k: media / v for k, v in kw.items()} | {"prompt": "x", "output": tmp_path / "o.mp4", "model": tiny_model}
    with pytest.raises(UserError, match=message) as err:
        run(animate_cfg(**args))
    assert "\n" not in str(err.value)


def test_no_prompt_and_no_caption_is_a_clear_error(media, tiny_model, tmp_path):
    with pytest.raises(UserError, match="no prompt: give prompt="):
        run(animate_cfg(image=media / "ref.png", driving=media / "driving.mp4", output=tmp_path / "o.mp4", model=tiny_model))
