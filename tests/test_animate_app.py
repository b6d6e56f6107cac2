"""The animate app on a real photo: raw driving video end to end, frame counts, bad inputs, EXIF
orientation, lossless frames."""

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from skimage.data import astronaut

import dynamictrl.animate.run as animate_run
from dynamictrl import config
from dynamictrl.animate.run import fit, run
from dynamictrl.errors import UserError
from dynamictrl.utils.video import read_frames_dir, read_image, read_video, write_video


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
    # A phone photo held upright: a portrait whose pixels are stored landscape, rotated a quarter turn
    # counter-clockwise, and EXIF orientation 6 (rotate 90 degrees clockwise to show it).
    portrait = img[:, 96:416]  # (512, 320)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(portrait)).save(d / "phone.jpg", quality=95, exif=exif)
    np.save(d / "portrait.npy", portrait)
    return d


def test_exif_orientation_is_applied(media):
    upright = np.load(media / "portrait.npy")
    with Image.open(media / "phone.jpg") as im:
        assert im.size == (512, 320) and im.getexif()[0x0112] == 6  # stored landscape
    image = read_image(media / "phone.jpg")
    assert image.shape == upright.shape and image.dtype == np.uint8
    error = np.abs(image.astype(float) - upright).mean()
    assert error < 3  # JPEG loss only; a quarter turn the wrong way is far off
    assert error < np.abs(image.astype(float) - upright[::-1, ::-1]).mean() / 10


def test_a_sideways_stored_phone_photo_animates_upright(media, tiny_model, tmp_path):
    cfg = animate_cfg(image=media / "phone.jpg", driving=media / "driving.mp4", prompt="'an astronaut'",
                      output=tmp_path / "o.mp4", model=tiny_model, steps=1, num_frames=3)  # fmt: skip
    run(cfg)
    frames, _ = read_video(tmp_path / "o.mp4")
    assert frames.shape[1:3] == (96, 64)  # the portrait bucket, as the photo is shown
    side, _ = read_video(tmp_path / "o_side.mp4")  # reference | pose | output
    upright = fit(np.load(media / "portrait.npy"), 96, 64).astype(float)
    assert np.abs(side[0, :, :64] - upright).mean() < 8  # the reference panel is the upright photo


def test_frames_dir_holds_exactly_the_frames_before_encoding(media, tiny_model, tmp_path, monkeypatch):
    written = {}

    def spy(path, frames, fps, crf=16):
        written.setdefault("output", frames.copy())  # the first: the output video
        return write_video(path, frames, fps, crf)

    monkeypatch.setattr(animate_run, "write_video", spy)
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "00099.png").write_bytes(b"")  # a stale frame from an earlier, longer run
    (tmp_path / "frames" / "notes.txt").write_text("kept")
    cfg = animate_cfg(image=media / "ref.png", driving=media / "driving.mp4", prompt="'an astronaut'",
                      output=tmp_path / "o.mp4", model=tiny_model, steps=1, num_frames=5,
                      frames_dir=tmp_path / "frames")  # fmt: skip
    assert run(cfg)["frames_dir"] == str(tmp_path / "frames")
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == [f"{i:05d}.png" for i in range(5)] + ["notes.txt"]
    with Image.open(tmp_path / "frames" / "00000.png") as im:
        assert im.mode == "RGB"
    np.testing.assert_array_equal(read_frames_dir(tmp_path / "frames"), written["output"])
    decoded, _ = read_video(tmp_path / "o.mp4")
    assert not np.array_equal(decoded, written["output"])  # the mp4 is lossy; the PNGs are not


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
