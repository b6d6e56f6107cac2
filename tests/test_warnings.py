"""Warnings: dynamictrl's own fail the tests; the apps show every warning but the third-party noise
named in dynamictrl.utils.warnings, and make no longer silences them all."""

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from dynamictrl.errors import user_errors
from dynamictrl.utils.warnings import NOISE, ignore_noise

ROOT = Path(__file__).resolve().parents[1]


def warn_from(module: str, message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` as a line of `module` would call it."""
    code = compile(f"import warnings\nwarnings.warn({message!r}, {category.__name__}, stacklevel=1)",
                   module.replace(".", "/") + ".py", "exec")  # fmt: skip
    exec(code, {"__name__": module})


@pytest.mark.parametrize("category", [UserWarning, DeprecationWarning, RuntimeWarning])
def test_a_warning_from_dynamictrl_fails_the_test(category):
    with pytest.raises(category, match="ours"):
        warn_from("dynamictrl.models.transformer", "ours", category)


def test_a_third_party_warning_does_not_fail_the_test():
    with pytest.warns(UserWarning, match="theirs"):
        warn_from("somepackage.module", "theirs")


def shown(emit) -> list[str]:
    """The warnings `emit` shows once the noise is ignored."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_noise()
        emit()
    return [str(w.message) for w in caught]


def literal(regex: str) -> str:
    return regex.replace("\\", "")  # NOISE's regexes only escape literal characters


@pytest.mark.parametrize(("message", "category", "module"), NOISE, ids=[module for _, _, module in NOISE])
def test_noise_is_ignored_by_message_category_and_module(message, category, module):
    message, module = literal(message), literal(module)
    assert shown(lambda: warn_from(module, message, category)) == []
    assert shown(lambda: warn_from("dynamictrl.eval.run", message, category)) == [message]  # another module
    assert shown(lambda: warn_from(module, "something else", category)) == ["something else"]


def test_the_named_noise_matches_what_the_libraries_say():
    from lightning.pytorch.utilities._pytree import _tree_flatten
    from torchvision.models import squeezenet1_1

    assert shown(lambda: _tree_flatten(1)) == []  # Lightning's LeafSpec
    assert shown(lambda: squeezenet1_1(pretrained=False)) == []  # lpips' way of building its backbone
    with warnings.catch_warnings(record=True) as caught:  # and without the filters they do warn
        warnings.simplefilter("always")
        _tree_flatten(1)
        squeezenet1_1(pretrained=False)
    assert len(caught) == 3


def test_the_tests_ignore_the_noise_too():  # conftest
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        _tree_flatten(1)
    assert caught == []


def test_the_apps_ignore_the_noise():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with user_errors("stage"):
            message, category, module = NOISE[0]
            warn_from(literal(module), literal(message), category)
            warn_from("somepackage.module", "theirs")
    assert [str(w.message) for w in caught] == ["theirs"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_does_not_silence_warnings():
    proc = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "--eval", 'env-check: ; @echo "[$$PYTHONWARNINGS]"',
                           "env-check"], capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc.stdout.strip() == "[]", proc.stderr
