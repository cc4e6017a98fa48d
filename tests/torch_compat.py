"""Import torchvision / timm on the CPU build of torch (test and export-check side only).

torchvision 0.28.0 from pip is a CUDA build; with the CPU torch its import fails on two missing
operator schemas unless they are defined first (see ../shared/ENVIRONMENT.md).
"""

import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch checks need the test extra: pip install -e '.[test]'"
)

_LIB = torch.library.Library("torchvision", "FRAGMENT")  # must stay referenced
for _schema in (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
):
    try:
        _LIB.define(_schema)
    except RuntimeError:  # already defined by another import
        pass

import timm  # noqa: E402
import torchvision  # noqa: E402

__all__ = ["timm", "torch", "torchvision"]
