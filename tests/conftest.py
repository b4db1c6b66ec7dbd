from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from synth import SynthClip, make_clip


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A ``$FLUXSHARD_CACHE`` of the test session's own (subprocesses inherit it): tiling and deployment
    profiles measured by the tests land there, never in the user's cache. Its ``data`` links to the user's
    clip cache, so the real clips are read (and fetched once) where they always are."""
    from fluxshard.data.fetch import cache_dir

    data = cache_dir()  # resolved before the variable changes
    data.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("fluxshard-cache")
    (root / "data").symlink_to(data, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUXSHARD_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def clip_p(synth_dir: Path) -> SynthClip:
    """P-frames only, one reference frame: the codec's vectors are the truth."""
    return make_clip(synth_dir / "p.mp4")


@pytest.fixture(scope="session")
def clip_b(synth_dir: Path) -> SynthClip:
    """Two B-frames between anchors (display order ≠ decode order, two rows per block)."""
    return make_clip(synth_dir / "b.mp4", options={"bf": "2", "x264-params": "b-adapt=0"})


@pytest.fixture(scope="session")
def clip_ref(synth_dir: Path) -> SynthClip:
    """Four reference frames: x264 points many vectors 2-4 frames back."""
    return make_clip(synth_dir / "ref.mp4", options={"refs": "4"})


@pytest.fixture(scope="session")
def clip_hevc(synth_dir: Path) -> SynthClip:
    """HEVC: FFmpeg exports no motion vectors, so the block-matching fallback must be used."""
    return make_clip(synth_dir / "hevc.mp4", codec="libx265")
