"""Drift monitoring: the in-server recorder, the reference builder and the offline drift job."""

from hotpath.drift.features import DriftError
from hotpath.drift.recorder import DriftRecorder

__all__ = ["DriftError", "DriftRecorder"]
