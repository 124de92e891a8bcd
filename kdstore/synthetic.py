"""A synthetic kitchen dataset: recipe-structured action sequences and matching frame features.

Action sequences come from a probabilistic grammar: each video follows one recipe, a
list of stages; a stage's steps happen in a random order, a step may be skipped, and a
few distractor actions are inserted. The next action is thus predictable from the
history (which recipe, which stage), which a text teacher learns from labels alone.

Two knobs make the data more like real kitchens (both off by default, on in the demo):

- ``shared_stages=N``: recipes are built from one pool of ``N`` stages (sub-routines such
  as fetching tools, washing, cutting, cleaning up), each recipe an ordered pick of them.
  A stage then occurs in several recipes with different successors, so what follows it
  depends on the recipe, which shows only in the stages further back than the last two
  actions: long-range structure that an n-gram over the last two actions cannot see.
  Without it (``0``) each recipe has its own stages, the grammar is local and a 3-gram
  is close to optimal.
- ``corpus_size=M``: also write ``recipes.txt``, ``M`` further sequences drawn from the
  same recipes (never one of the videos' sequences), one a line in the teacher's text
  format ``verb <v> noun <a> verb <v> noun``: the stand-in for the recipe text corpus
  (Recipe1M in the paper) that a text teacher is masked-LM pretrained on.

Frame features show the action in progress (verb and noun embeddings) under noise and a
per-video offset, so a video student can recognise past actions only approximately and
gains from a teacher that knows the history exactly. Features can be made for any
segment table, so real EGTEA sequences can be paired with synthetic frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tables import ClassTable, SegmentTable
from .text import pair_words

VERBS = [
    "Take", "Put", "Open", "Close", "Cut", "Wash", "Mix", "Pour", "Turn on", "Turn off",
    "Spread", "Crack", "Peel", "Stir", "Inspect/Read", "Squeeze",
]
NOUNS = [
    "tomato", "bell:pepper", "cucumber", "onion", "bread", "egg", "cheese", "pasta", "pot", "pan",
    "bowl", "cutting:board", "knife", "eating:utensil", "fridge", "cabinet", "faucet", "stove",
    "oil", "salt", "recipe", "lettuce", "condiment:container", "plate",
]
ANNOTATION_FPS = 24.0  # the frame numbering of the synthetic CSVs
CORPUS_FILE = "recipes.txt"  # the recipe text corpus beside the annotations (``corpus_size``)


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator; the defaults make a dataset the demo trains on in minutes."""

    n_videos: int = 64
    n_recipes: int = 8
    stages: tuple[int, int] = (6, 10)  # stages per recipe (min, max)
    steps: tuple[int, int] = (1, 3)  # steps per stage
    p_skip: float = 0.1
    p_distract: float = 0.08
    val_fraction: float = 0.2  # of the videos (EK55-like splits by video: histories have no gaps)
    seed: int = 0
    shared_stages: int = 0  # > 0: recipes pick their stages from one pool of this many (see the module doc)
    corpus_size: int = 0  # > 0: also write recipes.txt with this many sequences not among the videos'


def _recipes(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[list[list[list[tuple[int, int]]]], list[tuple[int, int]]]:
    """Recipes as stages of (verb, noun) steps; steps act on a recipe's (or a pooled stage's) own ingredients."""
    def stage(ingredients) -> list[tuple[int, int]]:
        k = rng.integers(cfg.steps[0], cfg.steps[1] + 1)
        return [(int(rng.integers(len(VERBS))), int(rng.choice(ingredients))) for _ in range(k)]

    recipes = []
    if cfg.shared_stages:
        pool = [stage(rng.choice(len(NOUNS), size=3, replace=False)) for _ in range(cfg.shared_stages)]
        for _ in range(cfg.n_recipes):
            n = min(int(rng.integers(cfg.stages[0], cfg.stages[1] + 1)), cfg.shared_stages)
            recipes.append([pool[i] for i in rng.choice(cfg.shared_stages, size=n, replace=False)])
    else:
        for _ in range(cfg.n_recipes):
            ingredients = rng.choice(len(NOUNS), size=6, replace=False)
            recipes.append([stage(ingredients) for _ in range(rng.integers(cfg.stages[0], cfg.stages[1] + 1))])
    distractors = [(VERBS.index("Wash"), NOUNS.index("eating:utensil")), (VERBS.index("Open"), NOUNS.index("fridge")),
                   (VERBS.index("Inspect/Read"), NOUNS.index("recipe"))]
    return recipes, distractors


def _sequence(rng: np.random.Generator, stages, distractors, cfg: SyntheticConfig) -> list[tuple[int, int]]:
    """One performance of a recipe: each stage's steps shuffled, some skipped, distractors inserted."""
    seq: list[tuple[int, int]] = []
    for stage in stages:
        for j in rng.permutation(len(stage)):
            if rng.random() < cfg.p_distract:
                seq.append(distractors[rng.integers(len(distractors))])
            if rng.random() >= cfg.p_skip:
                seq.append(stage[j])
    return seq


def generate_annotations(out_dir: str | Path, cfg: SyntheticConfig = SyntheticConfig()) -> Path:
    """Write ``actions.csv``, ``training1.csv`` and ``validation1.csv`` in the EGTEA format
    (and ``recipes.txt`` with ``cfg.corpus_size``)."""
    rng = np.random.default_rng(cfg.seed)
    recipes, distractors = _recipes(rng, cfg)
    videos = []
    for vi in range(cfg.n_videos):
        r = int(rng.integers(cfg.n_recipes))
        videos.append((f"S{vi:03d}-R{r:02d}", _sequence(rng, recipes[r], distractors, cfg)))
    pairs = sorted({p for _, seq in videos for p in seq})
    action_of = {p: i for i, p in enumerate(pairs)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "actions.csv", "w") as f:
        for (v, n), a in action_of.items():
            f.write(f"{a}, {v}_{n}, {VERBS[v]}_{NOUNS[n]}\n")
    rows = {"training1": [], "validation1": []}
    n_val = min(max(1, round(cfg.val_fraction * len(videos))), len(videos) - 1)
    val_videos = set(rng.permutation(len(videos))[:n_val].tolist())
    uid = 0
    for vi, (name, seq) in enumerate(videos):
        split = "validation1" if vi in val_videos else "training1"
        t = float(rng.uniform(1.0, 4.0))
        for v, n in seq:
            dur = float(rng.uniform(1.0, 4.0))
            start, end = int(t * ANNOTATION_FPS), int((t + dur) * ANNOTATION_FPS)
            rows[split].append(f"{uid},{name},{start},{end},{v},{n},{action_of[(v, n)]}")
            uid += 1
            t += dur + float(rng.uniform(0.2, 1.5))
    for split, lines in rows.items():
        (out / f"{split}.csv").write_text("\n".join(lines) + "\n")
    if cfg.corpus_size:
        _write_corpus(out / CORPUS_FILE, recipes, distractors, {tuple(seq) for _, seq in videos}, cfg)
    return out


def generate_epic100(out_dir: str | Path, cfg: SyntheticConfig = SyntheticConfig(), test_fraction: float = 0.15,
                     tail_fraction: float = 0.3) -> Path:
    """Write a synthetic dataset in the EPIC-KITCHENS-100 layout of RULSTM's ``data/ek100``.

    ``actions.csv`` (``id,verb,noun,action``, names ``verb noun``), ``training.csv`` /
    ``validation.csv`` keyed by narration ids ``<video>_<k>``, unlabelled
    ``test_timestamps.csv``, ``<split>_videos.csv``, and the validation id lists: unseen
    participants (validation videos of participants without a training video) and tail
    actions/verbs/nouns (the rarest ``tail_fraction`` of training classes; a segment is a
    tail action when its verb or noun is a tail class, as in EPIC's own rule). Frames
    count at 30 fps; splits are by video.
    """
    rng = np.random.default_rng(cfg.seed)
    recipes, distractors = _recipes(rng, cfg)
    seqs = [_sequence(rng, recipes[int(rng.integers(cfg.n_recipes))], distractors, cfg) for _ in range(cfg.n_videos)]
    pairs = sorted({p for seq in seqs for p in seq})
    action_of = {p: i for i, p in enumerate(pairs)}
    word = lambda w: w.lower().replace(" ", "-")  # noqa: E731  (EK100 verbs are one word: turn-on)
    order = rng.permutation(len(seqs))
    n_test = max(1, round(test_fraction * len(seqs)))
    n_val = min(max(2, round(cfg.val_fraction * len(seqs))), len(seqs) - n_test - 1)
    split_of = {int(v): "test_timestamps" if k < n_test else "validation" if k < n_test + n_val else "training"
                for k, v in enumerate(order)}
    # participants: n_part take turns; every other validation video is an unseen participant's
    n_part, k_val = max(2, cfg.n_videos // 4), 0
    videos = []
    for vi, seq in enumerate(seqs):
        part = vi % n_part + 1
        if split_of[vi] == "validation":
            part, k_val = (n_part + 1 if k_val % 2 == 0 else part), k_val + 1
        videos.append((f"P{part:02d}_{vi + 1:02d}", seq))
    rows: dict[str, list[tuple]] = {"training": [], "validation": [], "test_timestamps": []}
    for vi, (video, seq) in enumerate(videos):
        t = float(rng.uniform(1.0, 4.0))
        for k, (v, n) in enumerate(seq):
            dur = float(rng.uniform(1.0, 4.0))
            rows[split_of[vi]].append((f"{video}_{k}", video, int(t * 30), int((t + dur) * 30), v, n, action_of[(v, n)]))
            t += dur + float(rng.uniform(0.2, 1.5))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "actions.csv").write_text("id,verb,noun,action\n" + "".join(
        f"{a},{v},{n},{word(VERBS[v])} {word(NOUNS[n])}\n" for (v, n), a in action_of.items()))
    for split, rs in rows.items():
        cells = [r[:4] if split == "test_timestamps" else r for r in rs]
        (out / f"{split}.csv").write_text("".join(",".join(map(str, c)) + "\n" for c in cells))
        if split != "test_timestamps":
            (out / f"{split}_videos.csv").write_text("".join(v + "\n" for v in dict.fromkeys(r[1] for r in rs)))
    seen = {r[1].split("_")[0] for r in rows["training"]}
    ids = {"unseen_participants": [r[0] for r in rows["validation"] if r[1].split("_")[0] not in seen]}
    for col, kind in ((4, "verbs"), (5, "nouns")):
        counts = np.bincount([r[col] for r in rows["training"]], minlength=max(p[col - 4] for p in pairs) + 1)
        rare = set(np.argsort(counts, kind="stable")[: max(1, int(tail_fraction * len(counts)))].tolist())
        ids[f"tail_{kind}"] = [r[0] for r in rows["validation"] if r[col] in rare]
    tail = set(ids["tail_verbs"]) | set(ids["tail_nouns"])
    ids["tail_actions"] = [r[0] for r in rows["validation"] if r[0] in tail]
    for name, lst in ids.items():
        (out / f"validation_{name}_ids.csv").write_text("".join(i + "\n" for i in lst))
    return out


def _write_corpus(path: Path, recipes, distractors, exclude: set, cfg: SyntheticConfig) -> None:
    """``cfg.corpus_size`` recipe sequences as teacher text, none equal to a video's sequence.

    Drawn from their own random stream, so the videos are the same with or without a corpus.
    """
    rng = np.random.default_rng([cfg.seed, 1])
    lines = []
    while len(lines) < cfg.corpus_size:
        seq = _sequence(rng, recipes[int(rng.integers(cfg.n_recipes))], distractors, cfg)
        if seq and tuple(seq) not in exclude:
            lines.append(" <a> ".join(pair_words(VERBS[v], NOUNS[n]) for v, n in seq))
    path.write_text("\n".join(lines) + "\n")


def synthetic_features(
    classes: ClassTable,
    segments: SegmentTable,
    dim: int = 64,
    rate: float = 2.0,
    noise: float = 1.0,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-video ``(features [n, dim] float32, timestamps [n])`` sampled at ``rate`` fps.

    A frame inside a labelled segment shows ``verb_emb + noun_emb`` of its action (the
    latest-started segment if several overlap); other frames show a background vector; every
    frame adds Gaussian noise and a per-video offset.
    """
    rng = np.random.default_rng(seed)
    verb_emb = rng.normal(size=(classes.num_verbs, dim)) / np.sqrt(dim) * 2.0
    noun_emb = rng.normal(size=(classes.num_nouns, dim)) / np.sqrt(dim) * 2.0
    background = rng.normal(size=dim) / np.sqrt(dim)
    start_s, end_s = segments.start_frame / segments.fps, segments.end_frame / segments.fps
    out = {}
    for vi, video in enumerate(segments.videos):
        rows = np.flatnonzero(segments.video == vi)
        rows = rows[np.argsort(start_s[rows], kind="stable")]
        t = np.arange(0.0, end_s[rows].max() + 2.0, 1.0 / rate)  # [n]
        cover = np.searchsorted(start_s[rows], t, side="right") - 1  # latest segment started by t
        inside = (cover >= 0) & (t <= end_s[rows][cover.clip(0)])
        seg = rows[cover.clip(0)]
        signal = verb_emb[segments.verb[seg]] + noun_emb[segments.noun[seg]]  # [n, dim]
        signal[~inside | (segments.action[seg] < 0)] = background  # an unlabelled segment shows no class
        offset = rng.normal(size=dim) * 0.3 / np.sqrt(dim)
        feats = signal + offset + rng.normal(size=(len(t), dim)) * noise / np.sqrt(dim)
        out[video] = (feats.astype(np.float32), t)
    return out
