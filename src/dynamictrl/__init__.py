"""dynamictrl: text- and pose-controlled human image animation (DynamiCtrl) end to end.

Model classes are exported lazily so that diffusers can find them by name in `model_index.json`
(`["dynamictrl", "DynamiCtrlTransformer3DModel"]`) without slowing down light imports.
"""

__version__ = "0.1.0"

_LAZY = {
    "DynamiCtrlTransformer3DModel": "dynamictrl.models.transformer",
    "DynamiCtrlPipeline": "dynamictrl.models.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dynamictrl' has no attribute {name!r}")
