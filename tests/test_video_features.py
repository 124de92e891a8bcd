"""Video features: decoding, sampling, backbones, the build command, imports, resume, torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import cli
from kdstore.annotations import ClassTable, SegmentTable
from kdstore.errors import ConfigError, DataError, MissingError
from kdstore.store import Store
from trainers.video.backbones import load_backbone
from trainers.video.decode import Preprocess, VideoSource, decode, find_videos, iter_frames, read_image
from trainers.video.extract import build_video_features
from trainers.video.imports import import_arrays, import_lmdb

REPO = Path(__file__).resolve().parents[1]
# (file, codec, native fps, frames): 2 s, 3 s and 2 s of 64x48 video
VIDEOS = [("a.mp4", "mpeg4", 25, 50), ("b.mkv", "libx264", 10, 30), ("c.webm", "libvpx", 20, 40)]


def encode_video(path: Path, codec: str, fps: int, frames: int, w: int = 64, h: int = 48) -> None:
    """A coloured square moving over a background whose hue changes frame by frame."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
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


# ---------------------------------------------------------------------------------------
# the build


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_build_matches_the_model_on_decoded_frames(tmp_path, video_dir, tiny, suffix):
    store = tiny_store(tmp_path / f"s{suffix}")
    report = build_video_features(store, video_dir, tiny, "tiny", fps=2, dtype="float32", batch_size=3, workers=2, progress=False)
    assert (report.videos, report.frames, report.bad, report.committed) == (3, 4 + 6 + 4, [], True)
    fs = Store.open(tmp_path / f"s{suffix}").video("tiny")
    assert fs.videos == ["a", "b", "c"] and fs.dim == 32 and fs.frame_rate == 2.0
    assert fs.attrs["backbone"] == "vit-tiny" and fs.attrs["random_init"] is True
    frames, ts = decode(VideoSource("b", video_dir / "b.mkv", False), 2.0)
    feats, stamps = fs.frames("b")
    np.testing.assert_allclose(stamps, ts)
    np.testing.assert_allclose(feats[3], features_of(tiny, frames[3:4])[0], atol=1e-5)
    assert len(Store.open(tmp_path / f"s{suffix}").manifest["provenance"]) == 2


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

    with pytest.raises(RuntimeError, match="killed after a"):
        build_video_features(store, video_dir, tiny, "r", fps=2, dtype="float32", workers=2, progress=False, on_video=crash)
    assert "r" not in Store.open(tmp_path / "s.zarr").feature_sets()
    report = build_video_features(store, video_dir, tiny, "r", fps=2, dtype="float32", progress=False)
    assert (report.skipped, report.videos) == (1, 2)
    clean = tiny_store(tmp_path / "clean.zarr")
    build_video_features(clean, video_dir, tiny, "r", fps=2, dtype="float32", workers=0, progress=False)
    np.testing.assert_array_equal(Store.open(tmp_path / "s.zarr").video("r").features, clean.video("r").features)
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
        import_arrays(tmp_path / "s.zarr", bad, "x", native_fps=1, progress=False)
    np.save(bad / "a.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"a\.npy: cannot read the array"):
        import_arrays(tmp_path / "s.zarr", bad, "x", native_fps=1, progress=False)
    np.save(bad / "a.npy", np.zeros((4, 16), np.float32))  # video/np holds 8-d features
    with pytest.raises(DataError, match="feature dimension 16 differs from the stored 8"):
        import_arrays(tmp_path / "s.zarr", bad, "np", native_fps=1, progress=False)
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
    store = tiny_store(tmp_path / "s.h5")
    args = ["build-video-features", str(tmp_path / "s.h5"), "--videos", str(videos), "--backbone", "vit-tiny",
            "--random-init", "--name", "v", "--fps", "1", "--no-progress"]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code != 0 and isinstance(res.exception, DataError)
    msg = str(res.exception)
    assert "\n" not in msg and msg.startswith("3 bad video(s) skipped (the other 2 are in video/v)")
    assert "cut.webm: truncated video" in msg and "junk.mp4: cannot decode video" in msg
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
