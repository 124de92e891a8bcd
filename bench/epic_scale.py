"""EPIC-KITCHENS-100 at scale, end to end: RULSTM LMDB -> import-features -> one epoch of student reads.

What a user with EK100's RULSTM features gets, on an EK100-shaped synthetic LMDB: the 700
videos and 76,885 labelled segments of ``../shared/data/ek100`` (each video as long as its
last annotated frame + 5 s), 1024-d float32 values under RULSTM's keys, frames numbered at
30 fps, every ``--step``-th frame (1: the full release; larger: a sparse LMDB, for disks
that cannot hold the full one: LMDB stores a 4 KiB value in two 4 KiB pages). Stages, each
in its own process so that its peak RSS is its own:

- ``lmdb``: write the LMDB (and, for the second size, one of the first quarter of the videos);
- ``import``: ``import_lmdb`` full, ``--fps 1``, ``--windows`` (tau_a 1 s, 10 frames at 1 fps:
  AVT's EK100 window) and ``--windows`` over tau_a 0.5-2 s, from a cold LMDB: seconds,
  MB/s read and written, peak RSS, store size; the full import also at the quarter size;
- ``epoch``: one shuffled epoch of the training split through ``StudentData`` and
  ``BatchLoader`` (AVT window: 10 frames at 1 fps, tau_a 1 s, batch 64) from each store,
  with the store's files evicted from the page cache first (cold) and again at once (warm);
  cold again after ``posix_fadvise(WILLNEED)`` on the feature file (cold-willneed), and cold
  with ``FeatureSet.preread`` first, inside the timed epoch (cold-preread: what
  ``train-student`` does under ``preread``); the windows stores are checked to give the
  full store's frames, bit for bit;
- ``lmdb-reader``: on the same samples, cold and warm, two per-sample LMDB readers: one
  ``txn.get`` per frame the student keeps (10 a sample) and AVT's ``EpicRULSTMFeatsReader``
  with ``read_type: normal`` (every 30 fps frame of the 10 s observed window, each in its
  own transaction with AVT's search back over up to 10 missing frames, then every 30th
  frame from the end): ``--reader-batches`` batches, scaled to an epoch;
- ``ceiling``: the disk's sequential read bandwidth on each store's feature file, cold (and
  warm: a cold read far slower than the warm one shows that the eviction worked).

Eviction is ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file of a store or LMDB (after
an fsync: dirty pages are not dropped), with no process mapping them. Rows go to
``bench/results/epic_scale.csv``.

    python bench/epic_scale.py --tmp-dir /work/tmp --step 5    # EK100, 1/5 of the frames (~2.1 M)
    python bench/epic_scale.py --tiny                           # 6 synthetic videos, D = 32: seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import append_row, read_ahead_kb  # noqa: E402

BENCH = "epic_scale"
EK100 = ROOT.parent / "shared/data/ek100"
RULSTM_FPS = 30.0
TAIL_S = 5.0  # each video lasts this long after its last annotated frame
# the student's window: AVT on EPIC (10 frames at 1 fps, 1 s before the action), batch 64
STUDENT = dict(tau_a=1.0, fps=1.0, num_frames=10, batch_size=64)
TAU_O = STUDENT["num_frames"] / STUDENT["fps"]  # AVT's observed seconds (tau_o)
VARIANTS = {  # name -> import options (WindowSpec fields as a dict)
    "full": {},
    "fps1": {"fps": 1.0},
    "windows": {"windows": dict(tau_min=1.0, tau_max=1.0, num_frames=10, fps=1.0)},
    "windows-range": {"windows": dict(tau_min=0.5, tau_max=2.0, num_frames=10, fps=1.0)},
}
FULL = dict(dim=1024, step=5, reader_batches=100, videos=None)
TINY = dict(dim=32, step=1, reader_batches=1, videos=6)


# ---------------------------------------------------------------------------------------
# the segment table


def ek100_table(videos: int | None = None) -> tuple[list[str], np.ndarray, dict[str, list[tuple[int, int, str]]]]:
    """(video names, lengths in 30 fps frames, segments per video as (start frame, action, split)) of
    EK100's RULSTM CSVs (narration ids are strings: segments are numbered in file order)."""
    length: dict[str, int] = {}
    segs: dict[str, list] = {}
    for split, f in (("training", "training.csv"), ("validation", "validation.csv"), (None, "test_timestamps.csv")):
        with open(EK100 / f, newline="") as fh:
            for row in csv.reader(fh):
                if not row or not row[0].strip() or row[0].startswith("narration"):
                    continue
                video, end = row[1].strip(), int(row[3])
                length[video] = max(length.get(video, 0), end)
                if split:
                    segs.setdefault(video, []).append((int(row[2]), int(row[6]), split))
    names = sorted(length)[:videos]
    return names, np.array([length[v] + int(TAIL_S * RULSTM_FPS) for v in names]), {v: segs.get(v, []) for v in names}


def synthetic_table(videos: int, seed: int = 0):
    """The same shape, small: EPIC names, 60-120 s videos, a segment every ~3 s, every 3rd video validation."""
    rng = np.random.default_rng(seed)
    names = [f"P{1 + v // 4:02d}_{1 + v % 4:02d}" for v in range(videos)]
    lengths = rng.integers(60, 121, videos) * int(RULSTM_FPS)
    segs = {v: [(int(s), int(rng.integers(0, 5)), "validation" if i % 3 == 2 else "training")
                for s in np.sort(rng.integers(1, n - 30, n // 90))] for i, (v, n) in enumerate(zip(names, lengths))}
    return names, lengths, segs


def create_store(path: Path, names: list[str], segs: dict) -> None:
    from kdstore.tables import ClassTable, SegmentTable
    from kdstore.store import Store

    rows = [(v, *s) for v in names for s in segs[v]]
    actions = max(a for _, _, a, _ in rows) + 1
    classes = ClassTable([f"action {a}" for a in range(actions)], ["verb"], ["noun"], np.zeros(actions, np.int32),
                         np.zeros(actions, np.int32))
    index = {v: i for i, v in enumerate(names)}
    n = len(rows)
    start = np.array([s for _, s, _, _ in rows], np.int64)
    z = np.zeros(n, np.int32)
    seg = SegmentTable(
        uid=np.arange(n, dtype=np.int64), video=np.array([index[v] for v, *_ in rows], np.int32), start_frame=start,
        end_frame=start + 30, verb=z, noun=z, action=np.array([a for _, _, a, _ in rows], np.int32),
        split=np.array([0 if sp == "training" else 1 for *_, sp in rows], np.int8), videos=names,
        splits=["training", "validation"], fps=RULSTM_FPS,
    )
    Store.create(path, classes, seg)


# ---------------------------------------------------------------------------------------
# files: sizes, eviction, sequential reads


def files_of(path: Path) -> list[Path]:
    path = Path(path)
    return [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in files_of(path))


def evict(path: Path) -> None:
    """Drop ``path``'s files (a file or a folder) from the page cache."""
    for p in files_of(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages in the page cache (``mincore`` on a map that touches none)."""
    import ctypes

    size = path.stat().st_size
    if not size:
        return 0.0
    m = np.memmap(path, dtype=np.uint8, mode="r")
    pages = -(-size // os.sysconf("SC_PAGE_SIZE"))
    vec = (ctypes.c_ubyte * pages)()
    if ctypes.CDLL(None, use_errno=True).mincore(ctypes.c_void_p(m.ctypes.data), ctypes.c_size_t(size), vec):
        raise OSError(ctypes.get_errno(), f"mincore on {path}")
    del m
    return sum(b & 1 for b in vec) / pages


def sequential_read(path: Path, block: int = 8 << 20) -> float:
    """Seconds to read ``path`` front to back in ``block``-byte reads."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------
# stages that run in their own process


def child_lmdb(a: dict) -> dict:
    """Write an EK100-shaped RULSTM LMDB: ``videos`` with ``lengths`` frames, every ``step``-th."""
    from kdstore.rulstm_lmdb import write_rulstm_lmdb

    rng = np.random.default_rng(a["seed"])

    def items():
        for v, n in zip(a["videos"], a["lengths"]):
            numbers = np.arange(1, n + 1, a["step"])
            yield v, numbers, rng.standard_normal((len(numbers), a["dim"]), dtype=np.float32)

    t0 = time.perf_counter()
    entries = write_rulstm_lmdb(a["path"], items())
    return {"seconds": time.perf_counter() - t0, "entries": entries}


def peak_rss_kib(reset: bool = False) -> int:
    """This process's peak resident set (VmHWM); ``reset`` starts a new peak from now."""
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return peak


def child_import(a: dict) -> dict:
    """``import_lmdb``, with the peak RSS of reading + staging and of the commit apart."""
    from kdstore.features import VideoWriter
    from kdstore.store import Store
    from kdstore.feature_import import import_lmdb
    from kdstore.selection import WindowSpec

    opts = dict(a["options"])
    if "windows" in opts:
        opts["windows"] = WindowSpec(**opts["windows"])
    commit, staging = VideoWriter.commit, {}

    def timed_commit(self, *args, **kw):
        staging["peak"], staging["t"] = peak_rss_kib(reset=True), time.perf_counter()
        out = commit(self, *args, **kw)
        staging["commit_s"] = time.perf_counter() - staging["t"]
        return out

    VideoWriter.commit = timed_commit
    r = import_lmdb(Store.open(a["store"]), a["lmdb"], a["name"], native_fps=RULSTM_FPS, progress=False, **opts)
    return {"seconds": r.seconds, "commit_s": staging["commit_s"], "source_frames": r.source_frames,
            "kept_frames": r.kept_frames, "bytes_written": r.bytes_written, "staging_peak_rss_mib": staging["peak"] / 1024,
            "commit_peak_rss_mib": peak_rss_kib() / 1024}


def _student_data(store_path: str, name: str):
    from kdstore.store import Store
    from trainers.student.config import preset
    from trainers.student.data import StudentData

    cfg = preset("egtea", **STUDENT)
    return StudentData(Store.open(store_path), name, "training", cfg), cfg


def child_epoch(a: dict) -> dict:
    """A shuffled epoch (or its first ``batches``) of student batches from ``video/<name>``,
    twice: from the page cache as the parent left it (cold), then again (warm: a training
    run's next epoch)."""
    from trainers.student.data import BatchLoader, epoch_order

    t0 = time.perf_counter()
    data, cfg = _student_data(a["store"], a["name"])
    out = {"setup_s": time.perf_counter() - t0}
    order = epoch_order(len(data), seed=0, epoch=0, shuffle=True)
    if a.get("batches"):
        order = order[: a["batches"] * cfg.batch_size]
    for state in a.get("passes", ("cold", "warm")):
        t0, samples, nbytes = time.perf_counter(), 0, 0
        if a.get("willneed"):  # ask the kernel to read the whole feature file ahead, sequentially
            fd = os.open(features_file(Path(a["store"]), a["name"]), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            os.close(fd)
        if a.get("preread"):  # what train-student's preread does: one sequential read, timed with the epoch
            data.features.preread()
        t1 = time.perf_counter()
        for b in BatchLoader(data, order, cfg.batch_size):
            samples += len(b.uids)
            nbytes += b.frames.shape[1] * b.frames.shape[0] * data.dim * data.features.features.dtype.itemsize
        out[state] = {"seconds": time.perf_counter() - t0, "preread_s": t1 - t0, "samples": samples, "bytes_delivered": nbytes}
    if a.get("reference"):  # the same windows as the full store's, bit for bit
        ref, _ = _student_data(a["store"], a["reference"])
        same_ts = np.array_equal(data.features.timestamps[data.frame_idx], ref.features.timestamps[ref.frame_idx])
        same = same_ts and all(np.array_equal(data.features.gather(data.frame_idx[i : i + 4096]),
                                              ref.features.gather(ref.frame_idx[i : i + 4096]))
                               for i in range(0, len(data), 4096))
        out["same_frames_as_full"] = bool(same)
    return out


def child_plan(a: dict) -> dict:
    """What the per-sample readers read, in the epoch's order: each sample's video, segment
    start (s) and the 30 fps frame numbers of the student's frames in the full store."""
    from trainers.student.data import epoch_order

    data, cfg = _student_data(a["store"], a["name"])
    order = epoch_order(len(data), seed=0, epoch=0, shuffle=True)
    seg = data.features.store.segments
    rows = data.rows[order]
    numbers = np.rint(data.features.timestamps[data.frame_idx[order]] * RULSTM_FPS).astype(np.int64)  # [n, T]
    np.savez(a["out"], video=np.array([seg.videos[v] for v in seg.video[rows]]), start=seg.start_seconds()[rows],
             numbers=numbers, want=data.features.gather(data.frame_idx[order[: cfg.batch_size]]))
    return {"samples": len(order)}


class PerFrameReader:
    """One ``txn.get`` per frame the student keeps, a transaction per sample, then stack
    (RULSTM's ``read_representations`` with the frames already chosen)."""

    def __init__(self, env, dim: int):
        self.env, self.dim = env, dim

    def sample(self, video: str, start: float, numbers: np.ndarray) -> np.ndarray:
        with self.env.begin() as txn:
            return np.stack([np.frombuffer(txn.get(f"{video}_frame_{n:010d}.jpg".encode()), np.float32) for n in numbers.tolist()])


class AvtNormalReader:
    """AVT's ``EpicRULSTMFeatsReader`` with ``read_type: normal`` and its ``last_clip`` sampling:
    every 30 fps frame of the observed window ``(start - tau_a - tau_o, start - tau_a]``, each
    in its own transaction, searching back over up to 10 frames for a stored one (zeros when
    none), then every ``round(30 / fps)``-th frame from the end, the last ``num_frames``."""

    def __init__(self, env, dim: int):
        self.env, self.dim = env, dim

    def sample(self, video: str, start: float, numbers: np.ndarray) -> np.ndarray:
        end_s = start - STUDENT["tau_a"]
        first, last = np.floor((end_s - TAU_O) * RULSTM_FPS), np.floor(end_s * RULSTM_FPS)
        frames = np.arange(last, first, -1).astype(int)[::-1]
        frames[frames < 1] = frames[frames >= 1].min() if (frames >= 1).any() else 1
        feats = []
        for f in frames.tolist():
            with self.env.begin() as txn:
                value = None
                for radius in range(10):
                    value = txn.get(f"{video}_frame_{f - radius:010d}.jpg".encode())
                    if value is not None:
                        break
            feats.append(None if value is None else np.frombuffer(value, np.float32))
        feats = np.array([np.zeros(self.dim, np.float32) if x is None else x for x in feats])  # [300, D]
        keep = list(range(len(feats)))[:: -max(int(round(RULSTM_FPS / STUDENT["fps"])), 1)][::-1]
        out = feats[keep]
        if len(out) < STUDENT["num_frames"]:  # pad by repeating the first frame
            out = np.concatenate([np.repeat(out[:1], STUDENT["num_frames"] - len(out), 0), out])
        return out[-STUDENT["num_frames"]:]


def child_reader(a: dict) -> dict:
    import lmdb

    plan = np.load(a["plan"])
    n = len(plan["start"]) if a.get("batches") is None else a["batches"] * STUDENT["batch_size"]
    video, start, numbers = plan["video"][:n].tolist(), plan["start"][:n], plan["numbers"][:n]
    env = lmdb.open(a["lmdb"], readonly=True, lock=False)
    reader = {"per_frame": PerFrameReader, "avt_normal": AvtNormalReader}[a["reader"]](env, a["dim"])
    bs, out = STUDENT["batch_size"], {}
    for state in ("cold", "warm"):  # as the parent left the page cache, then again
        t0, first = time.perf_counter(), None
        for i in range(0, len(video), bs):
            batch = np.stack([reader.sample(video[j], start[j], numbers[j]) for j in range(i, min(i + bs, len(video)))])
            first = batch if first is None else first
        out[state] = {"seconds": time.perf_counter() - t0, "samples": len(video)}
    env.close()
    want = plan["want"]  # [B, T, D] the store's first batch (its dtype)
    out["same_frames_as_store"] = float((first.astype(want.dtype) == want).all(axis=(1, 2)).mean())
    return out


def child_ceiling(a: dict) -> dict:
    """The disk's sequential read time of ``file``: the best of two cold reads, and a warm one."""
    path = Path(a["file"])
    evict(path)
    evicted = resident_fraction(path)
    cold = sequential_read(path)
    warm = sequential_read(path)
    cached = resident_fraction(path)
    evict(path)
    return {"cold_s": min(cold, sequential_read(path)), "warm_s": warm, "bytes": path.stat().st_size,
            "resident_after_evict": evicted, "resident_after_read": cached}


CHILDREN = {"lmdb": child_lmdb, "import": child_import, "epoch": child_epoch, "plan": child_plan,
            "reader": child_reader, "ceiling": child_ceiling}


def in_child(stage: str, args: dict) -> dict:
    """Run ``stage`` in a fresh process; its result with ``peak_rss_mib`` (that process's own)."""
    p = subprocess.run([sys.executable, __file__, "--child", stage, json.dumps(args)], capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{stage} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    return {**result, "peak_rss_mib": result.pop("_peak_rss_kib") / 1024}


def child_main(stage: str, args: str) -> None:
    result = CHILDREN[stage](json.loads(args))
    result["_peak_rss_kib"] = peak_rss_kib()  # not ru_maxrss: Linux carries the parent's peak across fork + exec into it
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------
# the run


def features_file(store: Path, name: str) -> Path:
    return store / "video" / name / "features" / "c" / "0" / "0"


def run(tiny: bool = False, out_dir: str | Path | None = None, tmp_dir: str | Path | None = None, step: int | None = None,
        videos: int | None = None, reader_batches: int | None = None) -> list[dict]:
    """Every stage; returns the rows appended to ``<out_dir>/epic_scale.csv``."""
    cfg = dict(TINY if tiny else FULL)
    cfg.update({k: v for k, v in dict(step=step, videos=videos, reader_batches=reader_batches).items() if v is not None})
    real = not tiny and (EK100 / "training.csv").is_file()
    names, lengths, segs = ek100_table(cfg["videos"]) if real else synthetic_table(cfg["videos"] or 700)
    source = "ek100" if real else "synthetic"
    quarter = int(np.searchsorted(np.cumsum(lengths), lengths.sum() / 4)) + 1  # videos holding a quarter of the frames
    frames = int(sum(len(range(1, n + 1, cfg["step"])) for n in lengths))
    frames_q = int(sum(len(range(1, n + 1, cfg["step"])) for n in lengths[:quarter]))
    rows: list[dict] = []
    base = {"source": source, "videos": len(names), "segments": sum(len(s) for s in segs.values()), "dim": cfg["dim"],
            "step": cfg["step"], "lmdb_frames": frames, "tiny": tiny, "load": os.getloadavg()[0]}
    base["read_ahead_kb"] = read_ahead_kb(Path(tmp_dir or tempfile.gettempdir()))

    def row(stage: str, config: dict, result: dict) -> None:
        rows.append(append_row(BENCH, {**base, "stage": stage, **config}, result, out_dir=out_dir))

    tmp_root = Path(tmp_dir or tempfile.gettempdir())
    value = cfg["dim"] * 4  # LMDB keeps a value over ~2 KB in whole pages, after a 16-byte header
    per_frame = (-(-(value + 16) // 4096) * 4096 if value > 2000 else value) + 64
    need = (frames + frames_q) * per_frame + frames * cfg["dim"] * 2 * 3.5  # + stores and their staging
    free = shutil.disk_usage(tmp_root).free
    if need > free * 0.8:
        raise SystemExit(f"{tmp_root}: this run needs about {need / 1e9:.0f} GB, {free / 1e9:.0f} GB free: use a larger --step")
    with tempfile.TemporaryDirectory(dir=tmp_root, prefix="kdstore-epic-") as d:
        d = Path(d)
        lmdb, lmdb_q, store, plan = d / "rgb.lmdb", d / "rgb-quarter.lmdb", d / "ek.zarr", d / "plan.npz"

        # -- the LMDBs
        for path, vids, lens, n in ((lmdb, names, lengths, frames), (lmdb_q, names[:quarter], lengths[:quarter], frames_q)):
            r = in_child("lmdb", {"path": str(path), "videos": vids, "lengths": lens.tolist(), "step": cfg["step"],
                                  "dim": cfg["dim"], "seed": 0})
            row("lmdb", {"size": "quarter" if path == lmdb_q else "all", "frames": n},
                {"seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"], "bytes": disk_bytes(path), "entries": r["entries"]})
        create_store(store, names, segs)

        def do_import(name: str, options: dict, src: Path, size: str, at: Path = store) -> None:
            evict(src)
            r = in_child("import", {"store": str(at), "lmdb": str(src), "name": name, "options": options})
            group_bytes = disk_bytes(at / "video" / name) if at.is_dir() else disk_bytes(at)
            row("import", {"variant": name.split("@")[0], "size": size, "options": options, "backend": at.suffix[1:]},
                {**{k: r[k] for k in ("seconds", "commit_s", "peak_rss_mib", "staging_peak_rss_mib", "commit_peak_rss_mib",
                                      "source_frames", "kept_frames")},
                 "kept_fraction": r["kept_frames"] / r["source_frames"], "store_bytes": group_bytes,
                 "lmdb_bytes": disk_bytes(src), "mb_read_per_s": r["kept_frames"] * cfg["dim"] * 4 / 1e6 / r["seconds"],
                 "mb_written_per_s": r["bytes_written"] / 1e6 / r["seconds"], "frames_per_s": r["source_frames"] / r["seconds"]})

        def delete(name: str) -> None:
            from kdstore.store import Store

            Store.open(store).backend.delete_group(f"video/{name}")

        def epochs(name: str) -> None:
            """The sequential ceiling; a whole epoch and the readers' batches, cold then warm."""
            file_bytes = features_file(store, name).stat().st_size
            c = in_child("ceiling", {"file": str(features_file(store, name))})
            row("ceiling", {"variant": name}, {**c, "gb_per_s": c["bytes"] / 1e9 / c["cold_s"],
                                               "warm_gb_per_s": c["bytes"] / 1e9 / c["warm_s"]})
            evict(store)
            r = in_child("epoch", {"store": str(store), "name": name, "reference": "full" if name.startswith("windows") else None})
            for state in ("cold", "warm"):
                t = r[state]
                row("epoch", {"variant": name, "cache": state},
                    {"seconds": t["seconds"], "setup_s": r["setup_s"], "samples": t["samples"],
                     "samples_per_s": t["samples"] / t["seconds"], "peak_rss_mib": r["peak_rss_mib"],
                     "gb_delivered_per_s": t["bytes_delivered"] / 1e9 / t["seconds"], "file_bytes": file_bytes,
                     "file_gb_per_s": file_bytes / 1e9 / t["seconds"],
                     **({"same_frames_as_full": r["same_frames_as_full"]} if "same_frames_as_full" in r else {})})
            for how in ("willneed", "preread"):  # a cold epoch helped by one way of reading ahead
                evict(store)
                r = in_child("epoch", {"store": str(store), "name": name, how: True, "passes": ["cold"]})
                t = r["cold"]
                row("epoch", {"variant": name, "cache": f"cold-{how}"},
                    {"seconds": t["seconds"], "preread_s": t["preread_s"], "setup_s": r["setup_s"], "samples": t["samples"],
                     "samples_per_s": t["samples"] / t["seconds"], "peak_rss_mib": r["peak_rss_mib"],
                     "file_bytes": file_bytes, "file_gb_per_s": file_bytes / 1e9 / t["seconds"]})
            evict(store)
            r = in_child("epoch", {"store": str(store), "name": name, "batches": cfg["reader_batches"]})
            for state in ("cold", "warm"):
                t = r[state]
                row("reader", {"reader": f"store-{name}", "cache": state, "batches": cfg["reader_batches"]},
                    {"seconds": t["seconds"], "samples": t["samples"], "samples_per_s": t["samples"] / t["seconds"],
                     "peak_rss_mib": r["peak_rss_mib"]})

        # -- peak RSS at two sizes, on both backends (an HDF5 store a size: HDF5 does not reclaim deleted groups)
        do_import("full@quarter", VARIANTS["full"], lmdb_q, "quarter")
        delete("full@quarter")
        for src, size in ((lmdb_q, "quarter"), (lmdb, "all")):
            create_store(d / f"{size}.h5", names, segs)
            do_import("full", VARIANTS["full"], src, size, d / f"{size}.h5")
            (d / f"{size}.h5").unlink()
            shutil.rmtree(d / f"{size}.h5.staging", ignore_errors=True)
        shutil.rmtree(lmdb_q)
        # -- the full import and its epoch; the LMDB readers on the same samples (AVT's on the first batches)
        do_import("full", VARIANTS["full"], lmdb, "all")
        epochs("full")
        in_child("plan", {"store": str(store), "name": "full", "out": str(plan)})
        for reader, batches in (("per_frame", None), ("avt_normal", cfg["reader_batches"])):
            evict(lmdb)
            r = in_child("reader", {"plan": str(plan), "lmdb": str(lmdb), "reader": reader, "dim": cfg["dim"], "batches": batches})
            for state in ("cold", "warm"):
                t = r[state]
                row("reader", {"reader": reader, "cache": state, "batches": batches},
                    {"seconds": t["seconds"], "samples": t["samples"], "samples_per_s": t["samples"] / t["seconds"],
                     "peak_rss_mib": r["peak_rss_mib"], "same_frames_as_store": r["same_frames_as_store"]})
        # -- the subsampled imports and their epochs
        for name in ("windows", "windows-range", "fps1"):
            do_import(name, VARIANTS[name], lmdb, "all")
            epochs(name)
            delete(name)
    return rows


def report(rows: list[dict]) -> str:
    """The rows as short lines, one per stage."""
    out = []
    for r in rows:
        c = json.loads(r["config"])
        what = " ".join(str(c[k]) for k in ("stage", "variant", "reader", "size", "cache") if k in c)
        shown = {k: r[k] for k in r if k not in ("time", "bench", "machine", "config") and r[k] != ""}
        out.append(f"{what:32} {shown}")
    return "\n".join(out)


def markdown(rows: list[dict]) -> str:
    """The rows of one run as the tables of docs/results.md."""
    def f(x, fmt=".2f"):
        return "" if x in ("", None) else format(float(x), fmt)

    rs = [(json.loads(r["config"]), r) for r in rows]
    c0 = rs[0][0]
    kept = "every 30 fps frame" if c0["step"] == 1 else f"one 30 fps frame in {c0['step']}"
    out = [f"{c0['source']}: {c0['videos']} videos, {c0['segments']} segments, {c0['lmdb_frames']} LMDB frames ({kept}),"
           f" D = {c0['dim']}; load average at the start {c0['load']:.1f}; read-ahead {c0.get('read_ahead_kb')} KiB", ""]
    out += ["| LMDB | frames | GB on disk | write s |", "|---|---|---|---|"]
    out += [f"| {c['size']} | {r['entries']} | {f(int(r['bytes']) / 1e9)} | {f(r['seconds'], '.0f')} |" for c, r in rs if c["stage"] == "lmdb"]
    out += ["", "| import | LMDB | backend | kept | store GB | s | MB/s read | MB/s written | peak RSS MiB: staging / commit |",
            "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {c['variant']} | {c['size']} | {c['backend']} | {float(r['kept_fraction']):.1%} | {f(int(r['store_bytes']) / 1e9)} "
            f"| {f(r['seconds'], '.0f')} | {f(r['mb_read_per_s'], '.0f')} | {f(r['mb_written_per_s'], '.0f')} "
            f"| {f(r['staging_peak_rss_mib'], '.0f')} / {f(r['commit_peak_rss_mib'], '.0f')} |" for c, r in rs if c["stage"] == "import"]
    ceiling = {c["variant"]: float(r["gb_per_s"]) for c, r in rs if c["stage"] == "ceiling"}
    out += ["", "| epoch from | page cache | s | samples/s | feature file GB | file GB / epoch s | of sequential (cold read GB/s) | same frames as full |",
            "|---|---|---|---|---|---|---|---|"]
    for c, r in rs:
        if c["stage"] == "epoch":
            # a share of the ceiling only for the stores an epoch reads nearly whole
            whole = c["variant"] in ceiling and c["variant"].startswith("windows") and "range" not in c["variant"]
            share = float(r["file_gb_per_s"]) / ceiling[c["variant"]] if whole else None
            out.append(f"| {c['variant']} | {c['cache']} | {f(r['seconds'])} | {f(r['samples_per_s'], '.0f')} "
                       f"| {f(int(r['file_bytes']) / 1e9)} | {f(r['file_gb_per_s'])} | {'' if share is None else f'{share:.0%}'} "
                       f"({f(ceiling.get(c['variant']))}) | {r.get('same_frames_as_full', '')} |")
    out += ["", "| sequential read of | GB | cold GB/s (best of 2) | warm GB/s | pages cached after eviction / after a read |",
            "|---|---|---|---|---|"]
    out += [f"| {c['variant']} | {f(int(r['bytes']) / 1e9)} | {f(r['gb_per_s'])} | {f(r['warm_gb_per_s'])} "
            f"| {f(r.get('resident_after_evict'), '.0%')} / {f(r.get('resident_after_read'), '.0%')} |"
            for c, r in rs if c["stage"] == "ceiling"]
    rate = {(c["reader"], c["cache"], c["batches"]): float(r["samples_per_s"]) for c, r in rs if c["stage"] == "reader"}
    rate.update({(f"store-{c['variant']}", c["cache"], None): float(r["samples_per_s"]) for c, r in rs
                 if c["stage"] == "epoch"})
    out += ["", "| reader | batches | page cache | samples/s | full store / it | windows store / it "
            "| windows store, preread / it | reads the store's frames |", "|---|---|---|---|---|---|---|---|"]
    for c, r in rs:
        if c["stage"] == "reader" and not c["reader"].startswith("store-"):
            b = c["batches"]
            mine = [rate.get((f"store-{v}", c["cache"], b)) for v in ("full", "windows")]
            mine.append(rate.get(("store-windows", "cold-preread", b)) if c["cache"] == "cold" else None)
            ratios = " | ".join("" if m is None else f"{m / float(r['samples_per_s']):.1f}x" for m in mine)
            out.append(f"| {c['reader']} | {b or 'epoch'} | {c['cache']} | {f(r['samples_per_s'], '.0f')} | {ratios} "
                       f"| {float(r['same_frames_as_store']):.0%} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="6 synthetic videos, D=32 (seconds)")
    ap.add_argument("--step", type=int, default=None, help="keep every step-th 30 fps frame in the LMDB (1: full release)")
    ap.add_argument("--videos", type=int, default=None, help="only the first N videos")
    ap.add_argument("--reader-batches", type=int, default=None, help="batches read by the per-sample LMDB readers")
    ap.add_argument("--out-dir", default=None, help="where epic_scale.csv goes (default bench/results)")
    ap.add_argument("--tmp-dir", default=None, help="where the LMDB and the store are written")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(*args.child)
    rows = run(tiny=args.tiny, out_dir=args.out_dir, tmp_dir=args.tmp_dir, step=args.step, videos=args.videos,
               reader_batches=args.reader_batches)
    print(report(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
