"""Video segmentation and tracking with SAM 2 / SAM 2.1 and HQ-SAM 2: frame sources that decode frames when they
are needed, and the video predictor (sessions, prompts on any frame, propagation with memory)."""

from finesam.video.frames import FrameSource, open_frames

__all__ = ["FrameSource", "open_frames"]
