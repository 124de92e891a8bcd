"""Video features: decoding, sampling, the decoding workers, device preprocessing, backbones,
the build command, imports, resume, torchrun."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cli
from kdstore.tables import ClassTable, SegmentTable
from kdstore.errors import ConfigError, DataError, MissingError
from kdstore.store import Store
from trainers.video.backbones import load_backbone
from trainers.video.decode import (RESTART, DecodeOptions, SampledFrames, VideoSource, _load_image, decode, find_videos,
                                   iter_frames, probe_hwaccel, read_image, resized_size)
from trainers.video.extract import build_video_features
from kdstore.feature_import import import_arrays, import_lmdb
from trainers.video.preprocess import Preprocess
from trainers.video.workers import Chunk, DecodePool, Failed, Finished

REPO = Path(__file__).resolve().parents[1]
# (file, codec, native fps, frames): 2 s, 3 s and 2 s of 64x48 video
VIDEOS = [("a.mp4", "mpeg4", 25, 50), ("b.mkv", "libx264", 10, 30), ("c.webm", "libvpx", 20, 40)]
# short GOPs with B-frames, an open GOP, VP9: (file, codec, native fps, frames, encoder options)
GOP_VIDEOS = [("gop.mp4", "libx264", 30, 90, {"g": "6", "bf": "2"}),
              ("open.mkv", "libx264", 30, 90, {"x264-params": "keyint=7:open-gop=1:bframes=3"}),
              ("vp9.webm", "libvpx-vp9", 30, 60, {"g": "5"})]


def encode_video(path: Path, codec: str, fps: int, frames: int, w: int = 64, h: int = 48, options: dict | None = None) -> None:
    """A coloured square moving over a background whose hue changes frame by frame."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps, options=options or {})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0], img[..., 2] = (i * 9) % 256, 255 - (i * 5) % 256
            x = (i * 3) % (w - 12)
            img[16:28, x : x + 12] = (40, 220, 90)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def tiny_store(path: Path, videos=("a", "b", "c"), starts=(30, 40, 20), fps: float = 24.0) -> Store:
    """One action; one segment per video starting at ``starts`` (annotation frames at ``fps``)."""
    classes = ClassTable(["cut_x"], ["cut"], ["x"], np.zeros(1, np.int32), np.zeros(1, np.int32))
    n = len(videos)
    seg = SegmentTable(
        uid=np.arange(1, n + 1), video=np.arange(n, dtype=np.int32), start_frame=np.asarray(starts, np.int64),
        end_frame=np.asarray(starts, np.int64) + 10, verb=np.zeros(n, np.int32), noun=np.zeros(n, np.int32),
        action=np.zeros(n, np.int32), split=np.zeros(n, np.int8), videos=list(videos), splits=["train"], fps=fps,
    )
    return Store.create(path, classes, seg)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    for name, codec, fps, n in VIDEOS:
        encode_video(d / name, codec, fps, n)
    return d


@pytest.fixture(scope="module")
def gop_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gops")
    for name, codec, fps, n, options in GOP_VIDEOS:
        encode_video(d / name, codec, fps, n, options=options)
    return d


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("vit-tiny", random_init=True, seed=0)


def features_of(backbone, frames: np.ndarray) -> np.ndarray:
    """The backbone run directly on decoded frames: [n, D]."""
    with torch.inference_mode():
        return backbone(backbone.preprocess(frames)).numpy()


# ---------------------------------------------------------------------------------------
# decoding and sampling


@pytest.mark.parametrize("name,codec,native,n", VIDEOS)
def test_sampling_counts_and_timestamps(video_dir, name, codec, native, n):
    src = find_videos(video_dir)[[v[0] for v in VIDEOS].index(name)]
    assert src.video == Path(name).stem and not src.is_folder
    duration = n / native
    for fps in (1.0, 2.0, 3.0):
        frames, ts = decode(src, fps)
        k = np.arange(int(np.floor(duration * fps + 1e-9)))
        assert len(ts) == len(k) and frames.shape[1:] == (48, 64, 3)
        # the frame on screen at k / fps: starts at most one native frame earlier
        assert np.all(ts <= k / fps + 1e-6) and np.all(ts > k / fps - 1 / native - 1e-6)
    _, every = decode(src, 0)
    np.testing.assert_allclose(every, np.arange(n) / native, atol=1e-6)


def test_preprocess_resizes_crops_and_normalises():
    frames = np.zeros((2, 48, 64, 3), np.uint8)
    frames[:, :, 8:56] = 255  # the center 48 columns are white, the borders black
    x = Preprocess(crop=32, resize=32, mean=(0.5,) * 3, std=(0.5,) * 3)(frames)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    np.testing.assert_allclose(x[:, :, :, 2:-2].numpy(), 1.0, atol=1e-5)  # resized to 32x43, cropped to the white middle


def _sampled(source: VideoSource, **options) -> tuple[list[float], list[np.ndarray], SampledFrames]:
    """Times and frames of SampledFrames, after its last RESTART if any."""
    frames = SampledFrames(source, DecodeOptions(**options))
    items = list(frames)
    if RESTART in items:
        items = items[len(items) - items[::-1].index(RESTART) :]
    return [t for t, _ in items], [f for _, f in items], frames


def _sources(video_dir: Path, gop_dir: Path) -> list[VideoSource]:
    return find_videos(video_dir) + find_videos(gop_dir)


@pytest.mark.parametrize("fps", [0.7, 1.0, 2.0, 3.0, 7.0, 0.0])
def test_sampled_frames_equal_the_reference(video_dir, gop_dir, fps):
    for source in _sources(video_dir, gop_dir):
        ref_frames, ref_times = decode(source, fps)
        for skip, threads in ((True, 0), (True, 1), (False, 0)):  # one thread: unreferenced frames dropped too
            times, frames, reader = _sampled(source, fps=fps, skip=skip, threads=threads)
            assert times == list(ref_times), (source.video, skip, threads)
            np.testing.assert_array_equal(np.stack(frames), ref_frames, err_msg=f"{source.video} skip={skip} threads={threads}")
            assert reader.decoder == "software" and reader.source_size == (48, 64)
    # short GOPs at a low rate: only the GOPs that hold sampled frames are decoded, and with one
    # thread not their unreferenced B-frames either
    gop = VideoSource("gop", gop_dir / "gop.mp4", False)
    assert _sampled(gop, fps=1.0, threads=1)[2].decoded < _sampled(gop, fps=1.0)[2].decoded < 0.25 * 90
    assert _sampled(gop, fps=1.0, skip=False)[2].decoded == 90


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fps=st.floats(0.4, 40.0))  # the video lasts 3 s
def test_gop_plan_keeps_the_reference_frames_at_any_rate(gop_dir, fps):
    source = VideoSource("gop", gop_dir / "gop.mp4", False)
    ref_frames, ref_times = decode(source, fps)
    times, frames, _ = _sampled(source, fps=fps, threads=1)
    assert times == list(ref_times)
    np.testing.assert_array_equal(np.stack(frames), ref_frames)


def test_a_wrong_plan_restarts_from_a_full_decode(gop_dir, monkeypatch):
    source = VideoSource("gop", gop_dir / "gop.mp4", False)
    plan = SampledFrames._plan

    def wrong(self):  # plans a frame that no packet holds
        kept, known, feed, keep = plan(self)
        return {**kept, max(known) + 1: 99.0}, known, feed, keep

    monkeypatch.setattr(SampledFrames, "_plan", wrong)
    items = list(SampledFrames(source, DecodeOptions(fps=2.0)))
    assert items.count(RESTART) == 1 and items.index(RESTART) > 0  # it had yielded frames before noticing
    ref_frames, ref_times = decode(source, 2.0)
    after = items[items.index(RESTART) + 1 :]
    assert [t for t, _ in after] == list(ref_times)
    np.testing.assert_array_equal(np.stack([f for _, f in after]), ref_frames)


def test_preprocessing_on_the_device_matches_the_cpu_reference(tmp_path):
    rng = np.random.default_rng(0)
    encode_video(tmp_path / "qvga.mp4", "libx264", 10, 20, w=320, h=240)
    source = VideoSource("qvga", tmp_path / "qvga.mp4", False)
    ref_frames, _ = decode(source, 2.0)
    for pp in (Preprocess(crop=64, resize=64, mean=(0.5,) * 3, std=(0.5,) * 3),  # ViT: the short side is the crop
               Preprocess(crop=56, resize=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),  # DINOv2-style
               Preprocess(crop=288, resize=320, mean=(0.5,) * 3, std=(0.5,) * 3)):  # frames upscaled
        # full-size frames: the same operations as the reference
        frames = rng.integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
        np.testing.assert_allclose(pp.on_device(torch.from_numpy(frames), (48, 64)).numpy(), pp(frames).numpy(), atol=1e-5)
        # frames scaled by FFmpeg to the resized size (never up): within a grey level of the reference on average
        _, scaled, reader = _sampled(source, fps=2.0, resize=pp.resize, crop=pp.crop)
        h, w = resized_size(240, 320, pp.resize, pp.crop)
        assert scaled[0].shape == ((h, w, 3) if h < 240 else (240, 320, 3)) and reader.source_size == (240, 320)
        got = pp.on_device(torch.from_numpy(np.stack(scaled)), reader.source_size)
        diff = (got - pp(ref_frames)).abs() * torch.tensor(pp.std).view(1, 3, 1, 1) * 255  # grey levels
        assert diff.mean() < 1.0 and (diff > 10).float().mean() < 0.005 and diff.max() < 40, (pp, diff.mean(), diff.max())
    # a large JPEG decodes at a reduced DCT scale, then resizes on the device
    from PIL import Image

    img = np.zeros((240, 320, 3), np.uint8)
    img[60:180, 100:220] = (200, 40, 90)
    img[..., 1] = np.arange(320, dtype=np.uint8)[None, :] // 2
    Image.fromarray(img).save(tmp_path / "frame_0000000001.jpg", quality=95)
    pp = Preprocess(crop=32, resize=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    small, full = _load_image(tmp_path / "frame_0000000001.jpg", pp.resize, pp.crop)
    assert full == (240, 320) and small.shape == (60, 80, 3)  # 1/4: the largest reduction that keeps >= 32 x 43
    got = pp.on_device(torch.from_numpy(small[None]), full)
    ref = pp(read_image(tmp_path / "frame_0000000001.jpg")[None])
    assert ((got - ref).abs() * 127.5).mean() < 2.0


def test_hardware_decoding_falls_back_to_software(tmp_path, video_dir):
    note = probe_hwaccel("cuda")
    if note is None:
        pytest.skip("this machine decodes on CUDA; the fallback is not reachable")
    assert note.startswith("cuda") or "no cuda" in note or "no hardware" in note
    assert probe_hwaccel("nosuchdevice").startswith("this FFmpeg has no nosuchdevice decoding")
    source = VideoSource("b", video_dir / "b.mkv", False)
    ref_frames, ref_times = decode(source, 2.0)
    with DecodePool([source], DecodeOptions(fps=2.0, hwaccel="cuda"), workers=1, chunk=4) as pool:
        events = list(_copied(pool))
    assert pool.notes == [note]
    done = [e for e in events if isinstance(e, Finished)]
    assert len(done) == 1 and done[0].decoder == "software" and done[0].frames == len(ref_times)
    np.testing.assert_array_equal(np.concatenate([e.frames for e in events if isinstance(e, Chunk)]), ref_frames)
    # the command says which decoder ran, and why not the one asked for
    tiny_store(tmp_path / "s.zarr")
    res = CliRunner().invoke(cli.app, ["build-video-features", str(tmp_path / "s.zarr"), "--videos", str(video_dir),
                                       "--backbone", "vit-tiny", "--random-init", "--name", "hw", "--fps", "2",
                                       "--hwaccel", "cuda", "--device", "cpu", "--workers", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("decoding: "))
    assert line.startswith("decoding: software for 3 video(s); ") and line.endswith(f"; {note}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_hardware_decoding_on_cuda(tmp_path):
    """NVDEC through PyAV gives the software decoder's frames (H.264 decoding is bit-exact)."""
    note = probe_hwaccel("cuda")
    if note is not None:
        pytest.skip(f"no CUDA decoding on this machine: {note}")
    encode_video(tmp_path / "h264.mp4", "libx264", 24, 72, w=320, h=240, options={"g": "12", "bf": "2"})
    source = VideoSource("h264", tmp_path / "h264.mp4", False)
    ref_frames, ref_times = decode(source, 2.0)
    for skip in (True, False):
        times, frames, reader = _sampled(source, fps=2.0, skip=skip, hwaccel="cuda", hw_device="0")
        assert reader.decoder == "cuda" and times == list(ref_times)
        assert np.abs(np.stack(frames).astype(int) - ref_frames).mean() < 1.0


# ---------------------------------------------------------------------------------------
# decoding workers


def _copied(pool: DecodePool):
    """The pool's events, each chunk's frames copied out of shared memory and released."""
    for e in pool:
        if isinstance(e, Chunk):
            e.frames = e.frames.copy()
            e.release()
        yield e


def _by_video(events) -> dict[int, tuple]:
    """index -> (times, frames, finished or failed) from a pool's events."""
    out: dict[int, list] = {}
    for e in events:
        v = out.setdefault(e.index, [[], [], None])
        if isinstance(e, Chunk):
            assert e.start == sum(len(t) for t in v[0])  # in order within the video
            v[0].append(e.times)
            v[1].append(e.frames)
        else:
            v[2] = e
    return {i: (np.concatenate(t) if t else None, np.concatenate(f) if f else None, end) for i, (t, f, end) in out.items()}


def test_workers_give_the_in_process_frames(video_dir, gop_dir, tmp_path):
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    sources = _sources(video_dir, gop_dir) + find_videos(tmp_path)
    options = DecodeOptions(fps=3.0, resize=32, crop=32)
    runs = {}
    for workers in (0, 2):
        with DecodePool(sources, options, workers, chunk=4) as pool:
            runs[workers] = _by_video(_copied(pool))
    assert sorted(runs[0]) == sorted(runs[2]) == list(range(len(sources)))
    for i, s in enumerate(sources):
        (t0, f0, end0), (t2, f2, end2) = runs[0][i], runs[2][i]
        if s.video == "junk":
            assert isinstance(end0, Failed) and isinstance(end2, Failed) and "junk.mp4: cannot decode video" in end2.message
            continue
        assert isinstance(end2, Finished) and end2.frames == len(t2) == len(t0)
        np.testing.assert_array_equal(t2, t0)
        np.testing.assert_array_equal(f2, f0)
        assert f2.shape[1:] == (32, 43, 3)  # scaled by FFmpeg in the worker


def test_a_frame_too_large_for_a_slot_fails_its_video(video_dir):
    sources = find_videos(video_dir)
    with DecodePool(sources, DecodeOptions(fps=1.0), workers=1, chunk=4, slot_mib=0.005) as pool:
        ends = [e for e in pool if not isinstance(e, Chunk)]
    assert all(isinstance(e, Failed) for e in ends) and len(ends) == 3
    assert "a 64x48 frame (0.0 MiB) does not fit a shared-memory slot" in ends[0].message


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pids, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _ring_files(pid: int) -> list[str]:
    return glob.glob(f"/dev/shm/kdstore-frames-{pid}-*") + glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"kdstore-frames-{pid}-*"))


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory) -> Path:
    """Six videos each decoded in many chunks: a worker stays busy until its slots are read."""
    d = tmp_path_factory.mktemp("long")
    encode_video(d / ".base.mp4", "mpeg4", 25, 100)  # a dot file: not one of the folder's videos
    for i in range(6):
        (d / f"v{i}.mp4").symlink_to(d / ".base.mp4")
    return d


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_leaving_early_ends_the_workers(long_dir):
    pool = DecodePool(find_videos(long_dir), DecodeOptions(fps=0.0), workers=2, chunk=2)
    events = iter(pool)
    assert isinstance(next(events), Chunk)
    pids = pool.pids
    assert len(pids) == 2 and all(_alive(p) for p in pids) and not _ring_files(os.getpid())
    events.close()  # what a break or an exception in the consumer does
    assert _gone(pids, timeout=5.0) and pool.pids == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_that_dies_fails_its_video_only(long_dir):
    sources = find_videos(long_dir)
    pool = DecodePool(sources, DecodeOptions(fps=0.0), workers=2, chunk=4)
    ends, killed = [], None
    with pool:
        for e in pool:
            if isinstance(e, Chunk):
                if killed is None:  # the worker that sent it is mid-video: its slots are not read yet
                    killed = e.index
                    victim = next(p for p in pool._procs if e.index in p.tasks)
                    os.kill(victim.proc.pid, signal.SIGKILL)
                e.release()
            else:
                ends.append(e)
    failed = [e for e in ends if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].index == killed and "the decoding process died (signal SIGKILL)" in failed[0].message
    assert sorted(e.index for e in ends if isinstance(e, Finished)) == sorted(set(range(6)) - {killed})


# The holder handles Ctrl-C as an interactive Python does even where it was started with
# SIGINT ignored (a background job of a non-interactive shell passes SIG_IGN on, and Python
# then installs no handler), and says so before it reports ready.
_HOLDER = """
import json, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {repo!r})
from trainers.video.decode import DecodeOptions, find_videos
from trainers.video.workers import DecodePool
pool = DecodePool(find_videos({videos!r}), DecodeOptions(fps=0.0), workers=2, chunk=2)
events = iter(pool)
next(events)
print(json.dumps(pool.pids), flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_workers_end_with_the_main_process(long_dir, sig):
    """Killed: the kernel ends the workers (PR_SET_PDEATHSIG). Ctrl-C: the pool shuts them down."""
    main = subprocess.Popen([sys.executable, "-c", _HOLDER.format(repo=str(REPO), videos=str(long_dir))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = json.loads(main.stdout.readline())
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        main.send_signal(sig)
        main.wait(90)  # generous: a loaded 2-core CI machine slows interpreter teardown, not the shutdown logic
        assert _gone(pids), "orphan decoding workers"
        assert not _ring_files(main.pid)
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in main.stderr.read()
    finally:
        main.kill()
        main.wait()
        main.stdout.close()
        main.stderr.close()


# ---------------------------------------------------------------------------------------
# the build


@pytest.mark.parametrize("suffix,scaled,workers", [(".zarr", True, 2), (".h5", False, 0)])
def test_build_matches_the_model_on_decoded_frames(tmp_path, video_dir, tiny, suffix, scaled, workers):
    """Against the reference (every frame decoded, full-size frames preprocessed on the CPU):
    equal when full-size frames are uploaded, close when FFmpeg scaled them."""
    store = tiny_store(tmp_path / f"s{suffix}")
    report = build_video_features(store, video_dir, tiny, "tiny", fps=2, dtype="float32", batch_size=3, workers=workers,
                                  scale_in_decoder=scaled, progress=False)
    assert (report.videos, report.frames, report.bad, report.committed) == (3, 4 + 6 + 4, [], True)
    assert report.decoders == {"software": 3} and report.decoding.startswith("software for 3 video(s); ")
    fs = Store.open(tmp_path / f"s{suffix}").video("tiny")
    assert fs.videos == ["a", "b", "c"] and fs.dim == 32 and fs.frame_rate == 2.0
    assert fs.attrs["backbone"] == "vit-tiny" and fs.attrs["random_init"] is True and fs.attrs["scaled_in_decoder"] is scaled
    for source in find_videos(video_dir):
        frames, ts = decode(source, 2.0)
        feats, stamps = fs.frames(source.video)
        np.testing.assert_array_equal(stamps, ts)
        ref = features_of(tiny, frames)
        if scaled:
            assert np.abs(feats - ref).mean() < 0.02 and np.abs(feats - ref).max() < 0.1
        else:
            np.testing.assert_allclose(feats, ref, atol=1e-5)
    assert len(Store.open(tmp_path / f"s{suffix}").manifest["provenance"]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_build_on_cuda_matches_the_cpu_reference(tmp_path, video_dir, monkeypatch):
    """Pinned staging buffers, uploads on a side stream, preprocessing and batches on the device."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, to compare at 1e-4
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    bb = load_backbone("vit-tiny", random_init=True, seed=0)
    ref = {s.video: features_of(bb, decode(s, 2.0)[0]) for s in find_videos(video_dir)}
    for scaled in (False, True):
        store = tiny_store(tmp_path / f"s{scaled}.zarr")
        report = build_video_features(store, video_dir, bb, "g", fps=2, dtype="float32", batch_size=3, workers=2,
                                      device="cuda", precision="fp32", scale_in_decoder=scaled,
                                      hwaccel="auto" if scaled else "none", progress=False)
        assert (report.videos, report.frames, report.bad) == (3, 14, [])
        fs = Store.open(tmp_path / f"s{scaled}.zarr").video("g")
        for video, want in ref.items():
            got = fs.frames(video)[0]
            if scaled:
                assert np.abs(got - want).mean() < 0.02
            else:
                np.testing.assert_allclose(got, want, atol=1e-4)
        bb.to("cpu")


def test_a_video_whose_plan_fails_restarts_in_the_build(tmp_path, video_dir, tiny, monkeypatch):
    """The frames sent before a RESTART (and their features, in flight or not) are dropped."""
    plan = SampledFrames._plan

    def wrong(self):  # plans a frame that no packet holds
        kept, known, feed, keep = plan(self)
        return {**kept, max(known) + 1: 99.0}, known, feed, keep

    monkeypatch.setattr(SampledFrames, "_plan", wrong)  # in this process: workers=0
    store = tiny_store(tmp_path / "s.zarr")
    report = build_video_features(store, video_dir, tiny, "r", fps=2, dtype="float32", batch_size=3, workers=0,
                                  scale_in_decoder=False, progress=False)
    assert (report.videos, report.frames, report.bad) == (3, 14, [])
    for source in find_videos(video_dir):
        frames, ts = decode(source, 2.0)
        feats, stamps = Store.open(tmp_path / "s.zarr").video("r").frames(source.video)
        np.testing.assert_array_equal(stamps, ts)
        np.testing.assert_allclose(feats, features_of(tiny, frames), atol=1e-5)


def _write_jpgs(folder: Path, n: int, start: int = 1) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(start, start + n):
        img = np.full((36, 48, 3), (i * 7) % 256, np.uint8)
        img[10:20, (i % 30) : (i % 30) + 10] = (200, 30, 60)
        Image.fromarray(img).save(folder / f"frame_{i:010d}.jpg", quality=95)


def test_frame_folders_and_video_lists(tmp_path, video_dir, tiny, monkeypatch):
    _write_jpgs(tmp_path / "frames" / "P01_01", 60)  # 2 s at 30 fps, frame n at n / 30 s
    listing = tmp_path / "list.txt"
    listing.write_text(f"frames/P01_01\n# a comment\n{video_dir / 'a.mp4'}\n")
    sources = find_videos(listing)
    assert [(s.video, s.is_folder) for s in sources] == [("P01_01", True), ("a", False)]
    store = tiny_store(tmp_path / "s.zarr", videos=("P01_01", "a"), starts=(40, 30))
    build_video_features(store, listing, tiny, "f", fps=2, native_fps=30, dtype="float32", progress=False)
    feats, ts = Store.open(tmp_path / "s.zarr").video("f").frames("P01_01")
    np.testing.assert_allclose(ts, [15 / 30, 30 / 30, 45 / 30])  # sample periods [0.5, 1), [1, 1.5), [1.5, 2)
    direct = features_of(tiny, read_image(tmp_path / "frames/P01_01/frame_0000000030.jpg")[None])
    np.testing.assert_allclose(feats[1], direct[0], atol=1e-5)
    # without Pillow the frames decode with PyAV
    pil = read_image(tmp_path / "frames/P01_01/frame_0000000030.jpg").astype(int)
    monkeypatch.setitem(sys.modules, "PIL", None)
    via_av = read_image(tmp_path / "frames/P01_01/frame_0000000030.jpg").astype(int)
    assert via_av.shape == pil.shape and np.abs(via_av - pil).mean() < 3


def test_resume_after_a_crash(tmp_path, video_dir, tiny):
    store = tiny_store(tmp_path / "s.zarr")

    def crash(video):
        raise RuntimeError(f"killed after {video}")

    with pytest.raises(RuntimeError, match="killed after [abc]"):  # whichever video finished first
        build_video_features(store, video_dir, tiny, "r", fps=2, dtype="float32", workers=2, progress=False, on_video=crash)
    assert "r" not in Store.open(tmp_path / "s.zarr").feature_sets()
    report = build_video_features(store, video_dir, tiny, "r", fps=2, dtype="float32", progress=False)
    assert (report.skipped, report.videos) == (1, 2)
    clean = tiny_store(tmp_path / "clean.zarr")
    build_video_features(clean, video_dir, tiny, "r", fps=2, dtype="float32", workers=0, progress=False)
    np.testing.assert_allclose(Store.open(tmp_path / "s.zarr").video("r").features, clean.video("r").features, atol=1e-6)
    # a resumed build must use the same encoder
    with pytest.raises(RuntimeError):
        build_video_features(store, video_dir, tiny, "r2", fps=2, progress=False, on_video=crash)
    other = load_backbone("vit-tiny", random_init=True, seed=1)
    with pytest.raises(ConfigError, match="partial build with other settings"):
        build_video_features(store, video_dir, other, "r2", fps=2, progress=False)


def test_torchrun_two_processes_equal_one(tmp_path, video_dir, tiny):
    one = tiny_store(tmp_path / "one.zarr")
    build_video_features(one, video_dir, tiny, "d", fps=2, dtype="float32", progress=False)
    tiny_store(tmp_path / "two.zarr")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "cli.py",
           "build-video-features", str(tmp_path / "two.zarr"), "--videos", str(video_dir), "--backbone", "vit-tiny",
           "--random-init", "--name", "d", "--fps", "2", "--dtype", "float32", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert Store.open(tmp_path / "two.zarr").manifest["provenance"][-1]["world_size"] == 2
    two = Store.open(tmp_path / "two.zarr").video("d")
    assert two.videos == one.video("d").videos
    np.testing.assert_array_equal(two.offsets, one.video("d").offsets)
    np.testing.assert_allclose(two.features, one.video("d").features, atol=1e-4)
    np.testing.assert_array_equal(two.timestamps, one.video("d").timestamps)


# ---------------------------------------------------------------------------------------
# backbones


class TimmBlock(nn.Module):
    """timm's ViT block: pre-norm attention with a fused qkv projection, then a GELU MLP."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):  # [B, N, C]
        B, N, C = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5).softmax(-1) @ v  # [B, h, N, C/h]
        x = x + self.attn.proj(a.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class TimmViT(nn.Module):
    """A pure-torch ViT in timm's ``vit_*`` parameter naming; features: normed [CLS]."""

    def __init__(self, img=32, patch=8, dim=32, depth=2, heads=2, hidden=64, classes=5):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(TimmBlock(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        for p in self.parameters():  # non-trivial norms and biases so every mapping matters
            nn.init.normal_(p, std=0.2)

    def forward_features(self, x):  # [B, 3, H, W] -> [B, dim]
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


@pytest.mark.parametrize("fmt", [".pth", ".safetensors"])
def test_timm_checkpoint_converts(tmp_path, fmt):
    torch.manual_seed(0)
    ref = TimmViT().eval()
    path = tmp_path / f"vit{fmt}"
    if fmt == ".pth":
        torch.save({"model": ref.state_dict()}, path)  # nested as training checkpoints are
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    bb = load_backbone("vit-tiny", weights=path)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(bb(pixels).numpy(), ref.forward_features(pixels).numpy(), atol=1e-4)


def test_checkpoint_that_does_not_fit(tmp_path):
    torch.save(TimmViT(dim=48, hidden=96).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ConfigError, match=r"wide\.pth: parameter .* has shape \[.*48.*\], backbone vit-tiny expects \[.*32.*\]"):
        load_backbone("vit-tiny", weights=tmp_path / "wide.pth")
    torch.save({"w": torch.zeros(2), "note": ConfigError("not a tensor")}, tmp_path / "pickled.pth")
    with pytest.raises(ConfigError, match="pickled.pth: cannot read the checkpoint"):
        load_backbone("vit-tiny", weights=tmp_path / "pickled.pth")  # weights_only refuses arbitrary objects
    with pytest.raises(ConfigError, match="vit-b16 needs --weights"):
        load_backbone("vit-b16")


def test_hf_directories(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64), add_pooling_layer=False).eval()
    vit.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit/preprocessor_config.json").write_text('{"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2], "size": {"height": 32, "width": 32}}')
    bb = load_backbone(f"hf:{tmp_path / 'vit'}")
    assert bb.preprocess == Preprocess(crop=32, resize=32, mean=(0.4,) * 3, std=(0.2,) * 3)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(bb(pixels).numpy(), vit(pixel_values=pixels).last_hidden_state[:, 0].numpy(), atol=1e-5)
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2)).eval()
    clip.save_pretrained(tmp_path / "clip")
    bb = load_backbone(f"hf:{tmp_path / 'clip'}")
    assert bb.feature == "pooled" and bb.dim == 32 and bb.preprocess.mean[0] == pytest.approx(0.4815, abs=1e-3)
    with torch.inference_mode():
        np.testing.assert_allclose(bb(pixels).numpy(), clip(pixel_values=pixels).pooler_output.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------
# imports


def write_lmdb(path: Path, videos: dict[str, range], dim: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """A RULSTM-style LMDB; returns the [n, dim] features written per video."""
    import lmdb

    rng = np.random.default_rng(seed)
    feats = {v: rng.standard_normal((len(frames), dim)).astype(np.float32) for v, frames in videos.items()}
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for v, frames in videos.items():
            for f, row in zip(frames, feats[v]):
                txn.put(f"{v}_frame_{f:010d}.jpg".encode(), row.tobytes())
    env.close()
    return feats


def test_lmdb_import(tmp_path):
    # store fps 24: segments start at 1.25 s (a), 1.67 s (b), 0.83 s (c)
    store = tiny_store(tmp_path / "s.h5")
    feats = write_lmdb(tmp_path / "rgb", {"a": range(1, 80, 2), "b": range(1, 61), "c": range(5, 30)})
    r = import_lmdb(store, tmp_path / "rgb", "rgb", native_fps=30, dtype="float32", check=True, progress=False)
    assert (r.videos, r.frames, r.bytes_written) == (3, 40 + 60 + 25, (40 + 60 + 25) * 16 * 4)
    fs = Store.open(tmp_path / "s.h5").video("rgb")
    assert fs.videos == ["a", "b", "c"] and fs.attrs["native_fps"] == 30
    for v, frames in (("a", range(1, 80, 2)), ("c", range(5, 30))):
        got, ts = fs.frames(v)
        np.testing.assert_array_equal(got, feats[v])
        np.testing.assert_allclose(ts, np.asarray(frames) / 30)


def test_lmdb_with_missing_frames_for_a_segment(tmp_path):
    store = tiny_store(tmp_path / "s.zarr", starts=(240, 240, 240))  # every segment starts at 10 s
    write_lmdb(tmp_path / "gap", {"a": range(1, 600), "b": range(1, 600)})
    with pytest.raises(MissingError, match=r"UID 3 \(video c\): the video has no frames"):
        import_lmdb(store, tmp_path / "gap", "gap", native_fps=30, check=True, window=5.0, progress=False)
    write_lmdb(tmp_path / "gap2", {v: list(range(1, 30)) + list(range(450, 600)) for v in "abc"})
    with pytest.raises(DataError, match=r"3 segment\(s\) lack frames: UID 1 \(video a\): no frame in \[5.00 s, 10.00 s\]"):
        import_lmdb(store, tmp_path / "gap2", "gap2", native_fps=30, check=True, window=5.0, progress=False)
    assert Store.open(tmp_path / "s.zarr").feature_sets() == []  # nothing committed


def test_lmdb_with_bad_keys_or_sizes(tmp_path):
    import lmdb

    tiny_store(tmp_path / "s.zarr")
    for name, entries, error in (
        ("keys", {b"a_frame_0000000001.jpg": 4, b"b_0001.jpg": 4}, "key b'b_0001.jpg' is not <video>_frame_<number>.jpg"),
        ("sizes", {b"a_frame_0000000001.jpg": 4, b"a_frame_0000000002.jpg": 3}, "'a_frame_0000000002.jpg' holds 3 float32 features, the first key 4"),
    ):
        env = lmdb.open(str(tmp_path / name), map_size=1 << 22)
        with env.begin(write=True) as txn:
            for key, n in entries.items():
                txn.put(key, np.zeros(n, np.float32).tobytes())
        env.close()
        res = CliRunner().invoke(cli.app, ["import-features", str(tmp_path / "s.zarr"), str(tmp_path / name), "--name", name, "--no-progress"])
        assert isinstance(res.exception, DataError) and error in str(res.exception), res.exception
    assert Store.open(tmp_path / "s.zarr").feature_sets() == []


def test_npy_import_and_bad_arrays(tmp_path):
    tiny_store(tmp_path / "s.zarr")
    arrays = tmp_path / "arrays"
    arrays.mkdir()
    a, b = np.random.rand(7, 8).astype(np.float32), np.random.rand(5, 8).astype(np.float32)
    np.save(arrays / "a.npy", a)
    np.savez(arrays / "b.npz", features=b)
    res = CliRunner().invoke(cli.app, ["import-features", str(tmp_path / "s.zarr"), str(arrays), "--name", "np",
                                       "--native-fps", "4", "--dtype", "float32", "--no-progress"])
    assert res.exit_code == 0, res.output
    fs = Store.open(tmp_path / "s.zarr").video("np")
    np.testing.assert_array_equal(fs.frames("b")[0], b)
    np.testing.assert_allclose(fs.frames("a")[1], np.arange(7) / 4)
    assert fs.frame_rate == 4.0
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "a.npy", np.zeros((2, 3, 8)))
    with pytest.raises(DataError, match=r"a\.npy: expected a \[frames, D\] array, found shape \[2, 3, 8\]"):
        import_arrays(Store.open(tmp_path / "s.zarr"), bad, "x", native_fps=1, progress=False)
    np.save(bad / "a.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"a\.npy: cannot read the array"):
        import_arrays(Store.open(tmp_path / "s.zarr"), bad, "x", native_fps=1, progress=False)
    (bad / "a.npy").unlink()
    np.save(bad / "c.npy", np.zeros((4, 16), np.float32))  # a new video for video/np, which holds 8-d features
    with pytest.raises(DataError, match="feature dimension 16 differs from the stored 8"):
        import_arrays(Store.open(tmp_path / "s.zarr"), bad, "np", native_fps=4, dtype="float32", progress=False, mode="append")
    np.testing.assert_array_equal(Store.open(tmp_path / "s.zarr").video("np").frames("b")[0], b)  # intact


# ---------------------------------------------------------------------------------------
# bad videos


def test_bad_videos_are_reported_and_the_rest_committed(tmp_path, video_dir):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "b.mkv"):
        (videos / name).write_bytes((video_dir / name).read_bytes())
    (videos / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    data = (video_dir / "c.webm").read_bytes()
    (videos / "cut.webm").write_bytes(data[: len(data) // 2])
    encode_video(videos / "short.mp4", "mpeg4", 10, 4)  # 0.4 s: no frame at 1 fps
    with av.open(str(videos / "sound.mkv"), "w") as c:  # audio only
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    store = tiny_store(tmp_path / "s.h5")
    args = ["build-video-features", str(tmp_path / "s.h5"), "--videos", str(videos), "--backbone", "vit-tiny",
            "--random-init", "--name", "v", "--fps", "1", "--no-progress"]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code != 0 and isinstance(res.exception, DataError)
    msg = str(res.exception)
    assert "\n" not in msg and msg.startswith("4 bad video(s) skipped (the other 2 are in video/v)")
    assert "cut.webm: truncated video" in msg and "junk.mp4: cannot decode video" in msg and "sound.mkv: no video stream" in msg
    assert "short.mp4: no frames at 1 fps (the video lasts 0.400 s" in msg
    assert Store.open(store.path).video("v").videos == ["a", "b"]


def test_unknown_backbone_and_missing_inputs(tmp_path, tiny):
    with pytest.raises(ConfigError, match="unknown backbone 'resnet'"):
        load_backbone("resnet")
    store = tiny_store(tmp_path / "s.zarr")
    with pytest.raises(ConfigError, match="no such directory or video list"):
        build_video_features(store, tmp_path / "nope", tiny, "x", fps=1, progress=False)
    (tmp_path / "list.txt").write_text("missing.mp4\n")
    with pytest.raises(ConfigError, match=r"list.txt, line 1: .*missing.mp4 does not exist"):
        build_video_features(store, tmp_path / "list.txt", tiny, "x", fps=1, progress=False)


def test_iter_frames_streams_sampled_frames(video_dir):
    got = [t for t, _ in iter_frames(VideoSource("c", video_dir / "c.webm", False), 1.0)]
    assert got == [0.0, 1.0]


def test_benchmark_tiny(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench.video_features import run

    rows = run(tiny=True, out_dir=tmp_path)
    assert {r["stage"] for r in rows} >= {"decode+preprocess", "backbone", "build", "lmdb-import"}
    assert (tmp_path / "video_features.csv").exists()
