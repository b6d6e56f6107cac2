"""Third-party warnings that tell a user of the apps nothing they can act on, silenced by name (message,
category and the module that warns); every other warning shows. The apps install these through
`errors.user_errors`, the tests through conftest."""

from __future__ import annotations

import warnings

NOISE = [  # (message regex, category, module regex)
    # Lightning's own pytree helper builds torch's deprecated LeafSpec on every fit
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    # lpips builds its backbone with torchvision's old `pretrained=` argument (eval reads the weights from a file)
    (r"The parameter 'pretrained' is deprecated", UserWarning, r"torchvision\.models\._utils"),
    (r"Arguments other than a weight enum or `None` for 'weights' are deprecated", UserWarning,
     r"torchvision\.models\._utils"),
]  # fmt: skip


def ignore_noise() -> None:
    """Ignore the warnings in NOISE (and only those)."""
    for message, category, module in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
