"""Models: the DynamiCtrl transformer, its pipeline, and the embedded tiny default."""

from dynamictrl.models.transformer import DynamiCtrlBlock, DynamiCtrlTransformer3DModel, PoseAdaptiveLayerNorm

__all__ = ["DynamiCtrlBlock", "DynamiCtrlTransformer3DModel", "PoseAdaptiveLayerNorm"]
