"""Edge–cloud runtime: the distributed half of FluxShard (seed 000 §III), built above the engine.

An edge process decodes the video, keeps a mirrored pair of per-endpoint dispatch layers (its own input cache and
an exact copy of the cloud's, each with an accumulated motion field), and sends each frame either to its local
engine or, as a lossless residual payload (or the camera's own compressed packets), over one gRPC bidirectional
stream per video stream to a cloud server whose receive layer rebuilds the input bit for bit. Modules here may
import ``fluxshard.motion``, ``fluxshard.engine`` and ``fluxshard.video``; nothing below imports this package.
"""
