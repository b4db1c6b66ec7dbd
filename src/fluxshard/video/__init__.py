"""Video input/output: PyAV decoding with codec motion-vector side data, and H.264 writing."""

from fluxshard.video.decode import DecodedFrame, VideoInfo, open_video
from fluxshard.video.encode import VideoWriter

__all__ = ["DecodedFrame", "VideoInfo", "VideoWriter", "open_video"]
