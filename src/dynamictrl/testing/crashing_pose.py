"""A pose backend that kills its own process on one kind of input, for the test of the Ray engine's
bounded retries: a window whose worker dies (as under the OOM killer or a crash in native code, which
no `except` catches) is retried `engine.max_retries` times, then its input is rejected.

    pose._target_=dynamictrl.testing.crashing_pose.CrashingPose +pose.crash_height=120

Frames `crash_height` pixels high kill the process with SIGKILL; every other input gets MediaPipe's
poses. Never configure this outside tests.
"""

from __future__ import annotations

import os
import signal

import numpy as np

from dynamictrl.pose.mediapipe_backend import MediaPipeHolistic


class CrashingPose(MediaPipeHolistic):
    def __init__(self, crash_height: int, **kwargs):
        super().__init__(**kwargs)
        self.crash_height = int(crash_height)

    def detect_video(self, frames: np.ndarray):
        if frames.shape[1] == self.crash_height:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().detect_video(frames)
