"""Compact Results downlink: decoded detections / keypoints survive the wire bit for bit, anything else is refused
cleanly, and a server asked for RESULTS_DETECTIONS sends the adapter's ``postprocess_input`` of its engine's
outputs, far smaller than the raw outputs."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fluxshard.data.fetch import clip_path
from fluxshard.edgecloud import wire
from fluxshard.edgecloud.dispatch import input_tensor, integer_input
from fluxshard.edgecloud.proto import fluxshard_pb2 as pb
from fluxshard.edgecloud.results import decode_results, encode_results
from fluxshard.edgecloud.server import CloudServer
from fluxshard.engine import Engine, EngineConfig
from fluxshard.engine.inputs import mapper_for
from fluxshard.models import load_model
from fluxshard.models.base import Detections, Keypoints, Segmentations
from fluxshard.video.decode import VideoSource


def _roundtrip(outputs: dict[str, pb.Tensor]) -> pb.Result:
    r = pb.Result(seq=1, outputs=outputs, checksum="0" * 16)
    msg = wire.parse_cloud_message(pb.CloudMessage(result=r).SerializeToString())
    return msg.result


@pytest.mark.parametrize("n", [0, 1, 37])
def test_detections_round_trip_exact(n: int) -> None:
    rng = np.random.default_rng(n)
    det = Detections(rng.normal(size=(n, 4)).astype(np.float32) * 100, rng.random(n, dtype=np.float32),
                     rng.integers(0, 80, n))
    got = decode_results(_roundtrip(encode_results(det)))
    assert isinstance(got, Detections) and not isinstance(got, Segmentations)
    assert got.boxes.dtype == np.float32 and got.class_ids.dtype == np.int64
    for a, b in ((got.boxes, det.boxes), (got.scores, det.scores), (got.class_ids, det.class_ids)):
        assert a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("n", [0, 3])
def test_keypoints_round_trip_exact(n: int) -> None:
    rng = np.random.default_rng(n)
    kp = Keypoints(rng.normal(size=(n, 17, 3)).astype(np.float32), rng.random(n, dtype=np.float32),
                   rng.normal(size=(n, 4)).astype(np.float32))
    got = decode_results(encode_results(kp))
    assert isinstance(got, Keypoints)
    for a, b in ((got.keypoints, kp.keypoints), (got.scores, kp.scores), (got.boxes, kp.boxes)):
        assert a.shape == b.shape and a.tobytes() == b.tobytes()


def test_bad_compact_results_are_refused() -> None:
    with pytest.raises(ValueError, match="segmentation"):
        encode_results(Segmentations(np.zeros((0, 4)), np.zeros(0), np.zeros(0), masks=np.zeros((0, 2, 2), bool)))
    raw = {"out0": wire.encode_tensor(np.zeros((1, 5), np.float32))}
    with pytest.raises(wire.WireError, match="neither"):
        decode_results(raw)
    det = encode_results(Detections(np.zeros((2, 4)), np.zeros(2), [1, 2]))
    with pytest.raises(wire.WireError, match=r"result\.scores"):
        decode_results({**det, "scores": wire.encode_tensor(np.zeros(3, np.float32))})
    with pytest.raises(wire.WireError, match=r"result\.classes"):
        decode_results({**det, "classes": wire.encode_tensor(np.array([1, 80], np.int32))})
    with pytest.raises(wire.WireError, match=r"result\.boxes"):
        decode_results({**det, "boxes": wire.encode_tensor(np.zeros((2, 4), np.int32))})


def _result_sizes(factor: int, frames: int) -> tuple[list[pb.Result], list[pb.Result], list[np.ndarray], object]:
    """Keyframes of cup to one server, RAW on one stream and DETECTIONS on another."""
    adapter = load_model("nanodet")
    src = VideoSource(clip_path("cup"), max_frames=frames)
    mapper = mapper_for(adapter, (src.info.height, src.info.width), factor)
    inputs = [integer_input(mapper, f.rgb) for f in src]
    server = CloudServer(adapter, insecure=True)

    async def main() -> tuple[list[pb.Result], list[pb.Result]]:
        import grpc

        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=wire.channel_options()) as ch:
                out: dict[int, list[pb.Result]] = {}
                for results in (pb.RESULTS_RAW, pb.RESULTS_DETECTIONS):
                    call = ch.stream_stream("/fluxshard.edgecloud.v1.Inference/Stream",
                                            request_serializer=pb.EdgeMessage.SerializeToString,
                                            response_deserializer=pb.CloudMessage.FromString)()
                    x0 = inputs[0]
                    await call.write(pb.EdgeMessage(hello=pb.Hello(
                        protocol_version=wire.PROTOCOL_VERSION, stream_id=f"s{results}", model_name=server.model_name,
                        model_hash=server.model_hash, mode=pb.ENGINE_MODE_EXACT, input_shape=x0.shape,
                        input_dtype=x0.dtype.name, block_size=mapper.input_block, input_factor=factor,
                        payload_kind=pb.PAYLOAD_KIND_RESIDUAL, results=results)))
                    assert (await call.read()).WhichOneof("body") == "welcome"
                    out[results] = []
                    for t, x in enumerate(inputs):
                        await call.write(pb.EdgeMessage(keyframe=pb.Keyframe(
                            seq=t, input=wire.encode_tensor(x), checksum=wire.checksum(x))))
                        reply = await call.read()
                        assert reply.WhichOneof("body") == "result", reply
                        out[results].append(reply.result)
                    await call.done_writing()
                return out[pb.RESULTS_RAW], out[pb.RESULTS_DETECTIONS]
        finally:
            await server.stop(0.5)

    raw, det = asyncio.run(asyncio.wait_for(main(), 120))
    return raw, det, inputs, (adapter, mapper)


def test_server_sends_the_adapters_detections_of_its_engine_outputs() -> None:
    """cup at factor 4 (128x160 input): each DETECTIONS Result decodes to ``postprocess_input`` of a local engine's
    outputs on the same input, and is far smaller than the RAW Result of the same frame."""
    raw, det, inputs, (adapter, mapper) = _result_sizes(4, 3)
    local = Engine(adapter.body, mapper.input_hw, EngineConfig())
    for r_raw, r_det, x in zip(raw, det, inputs, strict=True):
        local.reset()
        out, _ = local.step(input_tensor(mapper, x), None)
        want = adapter.postprocess_input(out, mapper.input_hw)
        got = decode_results(r_det)
        assert len(want) > 0  # cup shows a cup: the comparison is not vacuous
        assert got.boxes.tobytes() == want.boxes.tobytes() and got.scores.tobytes() == want.scores.tobytes()
        assert np.array_equal(got.class_ids, want.class_ids)
        assert r_det.checksum == r_raw.checksum == wire.checksum(x)
        assert r_det.ByteSize() * 20 < r_raw.ByteSize()


@pytest.mark.slow
def test_result_size_full_resolution_cup() -> None:
    """The report's figure: Result bytes at cup's native 640x480 (factor 1), RAW vs DETECTIONS."""
    raw, det, _, _ = _result_sizes(1, 3)
    sizes_raw = [pb.CloudMessage(result=r).ByteSize() for r in raw]
    sizes_det = [pb.CloudMessage(result=r).ByteSize() for r in det]
    print(f"cup 640x480 Result bytes: raw {sizes_raw}, detections {sizes_det}")
    assert max(sizes_det) * 100 < min(sizes_raw)
