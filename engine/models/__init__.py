from .adapter import ADAPTER_WEIGHT_NAME, IPAdapterModules, read_adapter_file
from .standard_pose import StandardPoseEstimator
from .stage1 import (
    PoseGuider,
    ReferenceAttnProcessor,
    ReferenceBank,
    ReferenceConditioner,
    StandardizeNet,
    pose_residual,
    set_reference_processors,
)

__all__ = [
    "ADAPTER_WEIGHT_NAME",
    "IPAdapterModules",
    "PoseGuider",
    "ReferenceAttnProcessor",
    "ReferenceBank",
    "ReferenceConditioner",
    "StandardPoseEstimator",
    "StandardizeNet",
    "pose_residual",
    "read_adapter_file",
    "set_reference_processors",
]
