"""Text teacher: tokenizer, corpora, MLM pretraining, fine-tuning, out-of-fold build, n-gram, CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import annotation_store as new_store
import torch
from typer.testing import CliRunner

from kdstore.rulstm import load_annotations
from kdstore.tables import SegmentTable
from kdstore.errors import ConfigError, DataError, KDStoreError, MissingError
from kdstore.store import Store
from trainers.config import ConfigProblems, field_help, field_names, make, parse_set
from trainers.teacher.build import build_teacher, make_model
from trainers.teacher.folds import assign_folds
from trainers.teacher.config import PRESETS, TeacherConfig, preset
from trainers.teacher.corpus import STOP_VERBS, history_corpus, history_texts, read_corpus
from trainers.teacher.finetune import Thinning, class_weights, predict
from trainers.teacher.models import MODEL_TYPES, check_checkpoint, scratch_teacher
from trainers.teacher.ngram import NGram, action_histories, ngram_baseline
from trainers.teacher.pretrain import PretrainConfig, pretrain_mlm
from trainers.teacher.tokenizer import Tokens, encode, load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EGTEA_DIR = ROOT.parent / "shared/data/egtea"
TINY = dict(threads=1)
BUILD = dict(pretrain_epochs=2, history_dropout=0.5, **TINY)  # the shared end-to-end build




@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher_ann):
    """One tiny end-to-end build (MLM pretraining + 2 folds) shared by several tests."""
    store = new_store(tmp_path_factory.mktemp("built") / "s.zarr", teacher_ann)
    cfg = preset("tiny", **BUILD)
    result = build_teacher(store, "t", cfg, train_split="training1", eval_splits=("validation1",), show_progress=False)
    return store, cfg, result


# -- config, tokenizer, corpora -------------------------------------------------------------


def test_presets_and_config_errors():
    assert preset("egtea").hist_len == 15 and preset("ek55").hist_len == 5
    assert preset("egtea").lr == 1e-5 and preset("egtea").multi_task
    assert preset("egtea-scratch").pretrain_epochs > 0 and preset("egtea-scratch").lr == 1e-3
    assert preset("egtea-cpu").hist_len == 15 and preset("egtea-cpu").freeze_embeddings
    assert set(PRESETS) >= {"egtea", "ek55", "egtea-scratch", "egtea-cpu", "ek100-cpu", "demo", "tiny"}
    ek = preset("ek100-cpu")
    assert (ek.hist_len, ek.topk, ek.folds, ek.colon) == (5, 50, 5, "reverse")  # the paper's EK history, K = 50
    assert preset("tiny", multi_history=[2, 4]).hist_lens == (2, 4)
    with pytest.raises(ConfigError, match="preset 'nope'"):
        preset("nope")
    with pytest.raises(ConfigError, match="TeacherConfig: learning_rate: unknown option"):
        preset("egtea", learning_rate=1.0)
    with pytest.raises(ConfigError, match="TeacherConfig: family: expected one of bert, .*, got 'gpt'"):
        TeacherConfig(family="gpt")
    with pytest.raises(ConfigError, match="TeacherConfig: lr: expected > 0, got 0"):
        TeacherConfig(lr=0)
    saved = preset("ek100-cpu", multi_history=[3, 5]).to_dict()
    assert TeacherConfig.from_dict(json.loads(json.dumps(saved))) == preset("ek100-cpu", multi_history=(3, 5))
    with pytest.raises(ConfigError, match="TeacherConfig: lrr: unknown option"):
        TeacherConfig.from_dict({**saved, "lrr": 1.0})


def test_teacher_and_pretrain_configs_name_every_problem_at_once():
    with pytest.raises(ConfigProblems) as e:
        preset("tiny", learning_rate=1.0, hist_len=0, multi_history=[5, 0], max_len=4, history_dropout=1.0, mask_prob=0.0,
               prior_correction=-0.5, colon="sideways", history="full", family="gpt", size="huge", pooling="max",
               device="tpu", recent_first="yes")
    assert "\n" not in str(e.value) and str(e.value).startswith("TeacherConfig: learning_rate: unknown option (known: ")
    assert e.value.problems[1:] == [
        "recent_first: expected bool, got 'yes'",
        "family: expected one of bert, roberta, distilbert, albert, deberta, electra, got 'gpt'",
        "size: expected one of tiny, mini, small, base, got 'huge'",
        "pooling: expected one of cls, mean, got 'max'",
        "history: expected one of gappy, complete, got 'full'",
        "colon: expected one of keep, reverse, got 'sideways'",
        "device: expected one of auto, cpu, cuda, got 'tpu'",
        "hist_len: expected > 0, got 0",
        "multi_history: expected > 0 each, got (5, 0)",
        "prior_correction: expected >= 0, got -0.5",
        "history_dropout: expected in [0, 1), got 1.0",
        "mask_prob: expected in (0, 1), got 0.0",
        "max_len: expected >= 8, got 4",
    ]
    with pytest.raises(ConfigProblems) as e:
        make(PretrainConfig, {"mask_prob": 1.0, "device": "tpu", "max_len": 4, "epochs": 0, "window": 3, "warmup": 1})
    assert e.value.problems[0].startswith("window: unknown option (known: batch_size, device, dropout, epochs, family, ")
    assert e.value.problems[1:] == ["device: expected one of auto, cpu, cuda, got 'tpu'", "epochs: expected > 0, got 0",
                                    "warmup: expected in [0, 1), got 1", "mask_prob: expected in (0, 1), got 1.0",
                                    "max_len: expected >= 8, got 4"]
    with pytest.raises(ConfigProblems, match=r"PretrainConfig: size: expected one of tiny, mini, small, base, got 'xl'"):
        PretrainConfig(size="xl")
    # the one --set parser, typed by the teacher's fields
    assert parse_set(TeacherConfig, ["multi_history=5,10", "recent_first=true", "init_from=none", "lr=2e-4"]) == \
        {"multi_history": (5, 10), "recent_first": True, "init_from": None, "lr": 2e-4}
    with pytest.raises(ConfigProblems) as e:
        parse_set(TeacherConfig, ["lr=abc", "nope=1", "folds=2.5"])
    assert [p.split(" (")[0] for p in e.value.problems] == ["lr: expected float, got 'abc'", "nope: unknown option",
                                                            "folds: expected int, got '2.5'"]


def test_tokenizer_keeps_action_tokens_and_recent_history(tmp_path):
    tok = train_tokenizer(["take <v> eating utensil <a> cut <v> tomato", "open <v> fridge <a> wash <v> hand"], 200)
    toks = tok.convert_ids_to_tokens(tok("cut <v> tomato <a> open <v> fridge")["input_ids"])
    assert toks == ["[CLS]", "cut", "<v>", "tomato", "<a>", "open", "<v>", "fridge", "[SEP]"]
    ids = encode(tok, ["take <v> tomato <a> cut <v> tomato <a> open <v> fridge", ""], 6, chunk=1)
    assert tok.convert_ids_to_tokens(ids.row(0)) == ["[CLS]", "<a>", "open", "<v>", "fridge", "[SEP]"]  # oldest dropped
    assert tok.convert_ids_to_tokens(ids.row(1)) == ["[CLS]", "[SEP]"]  # empty history: specials only
    assert ids.ids.shape == (2, 6) and ids.lens.tolist() == [6, 2] and (ids.ids[1, 2:] == tok.pad_token_id).all()
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again("cut <v> tomato")["input_ids"] == tok("cut <v> tomato")["input_ids"]
    assert again.truncation_side == "left"


def test_tokenizer_vocabulary_is_deterministic_and_capped():
    """Same texts -> same ids in a fresh process (hash seeds differ); words beyond the cap
    and unseen words fall back to characters, never to [UNK]."""
    code = ("from trainers.teacher.tokenizer import train_tokenizer; "
            "t = train_tokenizer(['take <v> eating utensil <a> cut <v> tomato', 'cut <v> bread <a> cut <v> onion'] * 3, 40); "
            "print(sorted(t.get_vocab().items()))")
    runs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}) for seed in (1, 2)]
    assert runs[0].returncode == 0, runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout
    # 7 specials + 10 letters x 2 + room for the 2 commonest words (ties alphabetical)
    tok = train_tokenizer(["cut <v> tomato <a> cut <v> tomato <a> take <v> onion"], 29)
    assert len(tok) == 29 and {"cut", "tomato"} <= set(tok.get_vocab()) and "onion" not in tok.get_vocab()
    assert tok.tokenize("take <v> onion") == ["t", "##a", "##k", "##e", "<v>", "o", "##n", "##i", "##o", "##n"]


def test_corpus_files(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("Take <v> eating_utensil <a> cut <v> tomato\n\nopen <v> fridge\n")
    assert read_corpus(text) == ["take <v> eating utensil <a> cut <v> tomato", "open <v> fridge"]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text('[["chop", "onion"], ["is", "ready"], ["heat", "pan"]]\n{"actions": [["get", "x"], ["stir", "soup"]]}\n')
    assert read_corpus(jsonl) == ["chop <v> onion <a> heat <v> pan", "stir <v> soup"]
    assert {"is", "get", "have"} <= STOP_VERBS
    bad = tmp_path / "bad.txt"
    bad.write_text("cut <v> tomato\n<a>  <a>\n")
    with pytest.raises(DataError, match=r"bad.txt, line 2: no actions"):
        read_corpus(bad)
    bad.write_text('[["was", "done"]]\n')
    with pytest.raises(DataError, match=r"line 1: no actions"):
        read_corpus(bad)
    bad.write_text("cut tomato <a> open <v> fridge\n")
    with pytest.raises(DataError, match="action 1"):
        read_corpus(bad)


def test_histories_and_history_corpus(teacher_ann):
    classes, seg = load_annotations(teacher_ann, fps=24.0)
    rows = seg.rows_in("training1")
    texts = history_texts(classes, seg, rows, 3, split="training1")
    first = [r for r in rows if not any(  # first training segment of its video
        seg.video[o] == seg.video[r] and seg.start_frame[o] < seg.start_frame[r] for o in rows)]
    assert all(texts[list(rows).index(r)] == "" for r in first)
    assert all(t.count("<a>") <= 2 and (not t or t.count("<v>") == t.count("<a>") + 1) for t in texts)
    newest = history_texts(classes, seg, rows, 3, split="training1", recent_first=True)
    assert [" <a> ".join(t.split(" <a> ")[::-1]) for t in newest] == texts and newest != texts
    lines = history_corpus(classes, seg, "training1", window=4)
    assert all(1 <= line.count("<v>") <= 4 for line in lines)
    assert sum(line.count("<v>") for line in lines) >= len(rows)  # overlapping windows cover every action


# -- models, pretraining, fine-tuning ----------------------------------------------------------


@pytest.mark.parametrize("family", sorted(MODEL_TYPES))
def test_every_family_builds_and_reads_position_zero(family):
    tok = train_tokenizer(["take <v> cup <a> open <v> fridge"], 200)
    model = scratch_teacher(family, "tiny", tok, 16, (5, 3, 4), 0.0)
    ids, mask = encode(tok, ["take <v> cup", "open <v> fridge <a> take <v> cup"], 16).batch([0, 1])
    assert ids.shape == mask.shape == (2, 9) and mask.sum(1).tolist() == [5, 9]  # cut to the longest
    out = model(ids, mask)
    assert out["action"].shape == (2, 5) and out["verb"].shape == (2, 3) and out["noun"].shape == (2, 4)
    assert out["features"].shape == (2, 64)


def test_pretrain_lm_writes_hf_checkpoint_and_init_from(tmp_path):
    lines = ["take <v> cup <a> pour <v> water <a> drink <v> water", "open <v> fridge <a> take <v> milk <a> close <v> fridge"] * 8
    cfg = PretrainConfig(size="tiny", max_len=16, epochs=4, lr=3e-3, batch_size=4, dropout=0.0)
    summary = pretrain_mlm(lines, tmp_path / "mlm", cfg)
    assert summary["log"][-1]["mlm_loss"] < summary["log"][0]["mlm_loss"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "pretrain.json"):
        assert (tmp_path / "mlm" / f).exists()
    assert check_checkpoint(tmp_path / "mlm") == tmp_path / "mlm"
    again = pretrain_mlm(lines, tmp_path / "mlm2", PretrainConfig(init_from=str(tmp_path / "mlm"), max_len=16, epochs=1, batch_size=4))
    assert again["vocab"] == summary["vocab"]  # the checkpoint's tokenizer, not a new one
    (tmp_path / "notackpt").mkdir()
    (tmp_path / "notackpt" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"notackpt: not a Hugging Face checkpoint directory \(missing model.safetensors, tokenizer.json\)"):
        pretrain_mlm(lines, tmp_path / "x", PretrainConfig(init_from=str(tmp_path / "notackpt")))
    assert not (tmp_path / "x").exists()


def test_init_from_foreign_checkpoint_adds_action_tokens(tmp_path):
    """A BERT checkpoint with a plain WordPiece vocab gains <v>/<a> and resized embeddings."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "take", "cup", "open", "fridge"]) + "\n")
    ckpt = tmp_path / "bert"
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(ckpt)
    BertForMaskedLM(BertConfig(vocab_size=9, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=32)).save_pretrained(ckpt)
    tok = load_tokenizer(ckpt)
    assert tok.convert_ids_to_tokens(tok("take <v> cup", add_special_tokens=False)["input_ids"]) == ["take", "<v>", "cup"]
    model = make_model(preset("tiny"), tok, ckpt, (3, 2, 2), 0)
    assert model.encoder.get_input_embeddings().num_embeddings == len(tok) == 11


def test_class_weights_balanced_and_absent_classes_zero():
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])
    assert class_weights(np.array([0, 0, 0, 1]), 3, 0.5).tolist() == pytest.approx([2 / 3, (4 / 3) ** 0.5, 0.0])


def rows(t: Tokens) -> list[list[int]]:
    return [t.row(i) for i in range(len(t))]


def thinned_texts(actions, lens, words, rate, seed, epoch, recent_first=False) -> list[str]:
    """History dropout's rule written out row by row: the same draws, then each row's kept actions."""
    rng = np.random.default_rng([seed, epoch])
    drop = rng.uniform(0, rate, len(actions))[:, None]
    keep = (actions >= 0) & (rng.random(actions.shape) >= drop)
    out = []
    for row, k, L in zip(actions, keep, lens):
        acts = row[k][-L:] if k.any() else row[row >= 0][-L:]
        out.append(" <a> ".join(words[a] for a in (acts[::-1] if recent_first else acts)))
    return out


def random_histories(n=60, width=12, actions=6, seed=0):
    rng = np.random.default_rng(seed)
    acts = rng.integers(0, actions, (n, width))
    acts[np.arange(width)[None, :] < rng.integers(0, width, n)[:, None]] = -1  # left padding
    return acts, rng.integers(1, 6, n)


def test_history_dropout_joins_token_ids_like_the_tokenizer():
    words = ["take <v> cup", "open <v> fridge drawer", "cut <v> tomato", "wash <v> eating utensil",
             "put <v> pan", "inspect read <v> recipe"]
    # a capped vocabulary splits most words into ##pieces; max_len 12 cuts histories mid-action
    tok = train_tokenizer([" <a> ".join(words)], 40)
    acts, lens = random_histories()
    dense = encode(tok, thinned_texts(acts, lens, words, 0.0, 0, 0), 12)
    thin = Thinning(acts, lens, words, 0.9, 12).prepare(tok, dense)
    assert thin.table is not None  # WordPiece: the joined ids are the tokenizer's
    assert rows(Thinning(acts, lens, words, 0.0, 12).prepare(tok, dense).draw(tok, 0, 0)) == rows(dense)
    for epoch in range(3):
        want = encode(tok, thinned_texts(acts, lens, words, 0.9, 7, epoch), 12)
        assert rows(thin.draw(tok, 7, epoch, chunk=16)) == rows(want), epoch
    assert rows(thin.draw(tok, 0, 1)) == rows(thin.draw(tok, 0, 1)) != rows(thin.draw(tok, 0, 2))
    assert all(n > 2 for e in range(5) for n in thin.draw(tok, 0, e).lens)  # never empty


def test_history_dropout_retokenizes_when_joining_differs():
    """A byte-level BPE marks a word's leading space, so an action's ids depend on its place:
    the joined ids differ from the tokenizer's and every epoch is tokenized again."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    words = ["take <v> cup", "open <v> fridge", "cut <v> tomato"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" <a> ".join(words)] * 4, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<mask>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  mask_token="<mask>", cls_token="<s>", sep_token="</s>", extra_special_tokens=["<v>", "<a>"])
    from tokenizers import processors
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.cls_token_id), ("</s>", tok.sep_token_id)])
    tok.truncation_side = "left"
    acts, lens = random_histories(actions=3)
    dense = encode(tok, thinned_texts(acts, lens, words, 0.0, 0, 0), 32)
    thin = Thinning(acts, lens, words, 0.9, 32).prepare(tok, dense)
    assert thin.table is None
    assert rows(thin.draw(tok, 3, 1)) == rows(encode(tok, thinned_texts(acts, lens, words, 0.9, 3, 1), 32))


def test_history_dropout_joins_newest_first_like_the_tokenizer():
    words = ["take <v> cup", "open <v> fridge drawer", "cut <v> tomato", "wash <v> eating utensil"]
    tok = train_tokenizer([" <a> ".join(words)], 40)
    acts, lens = random_histories(actions=4, seed=1)
    dense = encode(tok, thinned_texts(acts, lens, words, 0.0, 0, 0, recent_first=True), 12, recent_first=True)
    thin = Thinning(acts, lens, words, 0.9, 12, recent_first=True).prepare(tok, dense)
    assert thin.table is not None
    for epoch in range(3):
        want = encode(tok, thinned_texts(acts, lens, words, 0.9, 5, epoch, recent_first=True), 12, recent_first=True)
        assert rows(thin.draw(tok, 5, epoch, chunk=16)) == rows(want), epoch
    small = np.array([[-1, 0, 1, 2, 0, 1, 2, 0], [-1, -1, -1, -1, -1, -1, -1, 2]])
    newest = Thinning(small, np.array([3, 3]), words[:3], 0.0, 64, recent_first=True)
    assert rows(newest.draw(tok, 0, 0)) == rows(encode(tok, [" <a> ".join(words[a] for a in (0, 2, 1)), words[2]], 64,
                                                          recent_first=True))


def test_truncation_drops_the_oldest_actions():
    tok = train_tokenizer(["a <v> x <a> b <v> y <a> c <v> z"], 200)
    short = lambda ids: tok.convert_ids_to_tokens(ids.row(0))[1:-1]  # noqa: E731
    assert short(encode(tok, ["a <v> x <a> b <v> y"], 5)) == ["b", "<v>", "y"]  # oldest first: cut on the left
    assert short(encode(tok, ["b <v> y <a> a <v> x"], 5, recent_first=True)) == ["b", "<v>", "y"]  # newest first: right
    assert short(encode(tok, ["a <v> x <a> b <v> y"], 5)) == ["b", "<v>", "y"]  # the tokenizer's own side is left as it was


def test_assign_folds_keeps_videos_together():
    videos = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4])
    folds = assign_folds(videos, 2, seed=0)
    for v in np.unique(videos):
        assert len(set(folds[videos == v])) == 1
    assert sorted(np.bincount(folds)) == [4, 5]
    with pytest.raises(ConfigError, match="at least 6 videos"):
        assign_folds(videos, 6, seed=0)


# -- the end-to-end build -------------------------------------------------------------------------


def test_build_end_to_end(built):
    store, cfg, r = built
    seg = store.segments
    train, val = seg.rows_in("training1"), seg.rows_in("validation1")
    group = store.group("t")
    assert group.kind == "teacher" and group.present.all()  # every UID of both splits, first-in-video included
    assert sorted(group.uids.tolist()) == sorted(seg.uid[np.concatenate([train, val])].tolist())
    assert group.topk == cfg.topk and group.features.shape == (len(seg), 64)
    assert group.verb_logits.shape == (len(seg), store.classes.num_verbs)
    for stage in ("full", "fold0", "fold1"):
        losses = [row["loss"] for row in r.log if row["stage"] == stage]
        assert len(losses) == cfg.epochs and losses[-1] < losses[0], stage
    mlm = [row["mlm_loss"] for row in r.log if row["stage"] == "pretrain"]
    assert len(mlm) == 2
    assert set(group.metrics) == {"validation1", "training1 (out-of-fold)"}
    assert group.metrics["validation1"]["n"] == len(val) and 0 <= group.metrics["validation1"]["top5"] <= 100
    assert group.config["folds"] == 2 and group.attrs["log"] == r.log
    assert (r.work_dir / "teacher" / "model.safetensors").exists() and (r.work_dir / "teacher" / "heads.safetensors").exists()


def test_stored_metrics_are_those_evaluate_prints(built):
    """A teacher's stored metrics are ``evaluate_group``'s on the same split, verb/noun heads included."""
    from kdstore.evaluation import evaluate_group

    store, _, r = built
    group = store.group("t")
    assert group.verb_logits is not None and "verb_top1" in group.metrics["validation1"]
    assert group.metrics == {"validation1": evaluate_group(store, "t", "validation1"),
                             "training1 (out-of-fold)": evaluate_group(store, "t", "training1")}
    assert r.metrics == group.metrics


def test_out_of_fold_predictions_come_from_other_models(built):
    """Training UIDs get fold models' predictions (not the full model's); eval UIDs the full model's."""
    store, cfg, r = built
    seg = store.segments
    tok = load_tokenizer(r.work_dir / "teacher")
    full = make_model(cfg, tok, r.work_dir / "teacher", (store.classes.num_actions, store.classes.num_verbs, store.classes.num_nouns), 0)
    group = store.group("t")
    for split, same in (("training1", False), ("validation1", True)):
        rows = seg.rows_in(split)
        texts = history_texts(store.classes, seg, rows, cfg.hist_len, split=split)
        ours = predict(full, encode(tok, texts, cfg.max_len))["action"]
        stored = np.asarray(group.logits[group.row_of_segment[rows]], np.float32)
        assert np.allclose(ours, stored, atol=2e-2) == same, split


def shared_start(work: Path, dest: Path) -> Path:
    """A work dir holding ``work``'s tokenizer and pretrained encoder but no fine-tuning stage.

    (WordPiece training breaks frequency ties in hash order, so two fresh builds may get
    different vocabularies; builds that share these two are identical.)
    """
    dest.mkdir(parents=True)
    for part in ("tokenizer", "pretrained"):
        shutil.copytree(work / part, dest / part)
    shutil.copy(work / "build.json", dest / "build.json")
    return dest


def test_prior_correction_reuses_the_stages_and_shifts_every_head(built):
    """prior_correction subtracts tau * log(add-one class frequency on the training labels) from the
    stored action, verb and noun logits of every row; a rebuild with it reuses the finished stages."""
    store, cfg, result = built
    stamps = {p: p.stat().st_mtime_ns for p in result.work_dir.glob("*/predictions.safetensors")}
    pc = preset("tiny", **{**BUILD, "prior_correction": 0.5})
    build_teacher(store, "pc", pc, train_split="training1", eval_splits=("validation1",), work_dir=result.work_dir,
                  show_progress=False)
    assert stamps and {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no stage ran again
    seg, classes = store.segments, store.classes
    plain, shifted = store.group("t"), store.group("pc")
    assert (plain.uids == shifted.uids).all() and shifted.config["prior_correction"] == 0.5
    train = seg.rows_in("training1", labelled=True)
    for key, labels, n in (("logits", seg.action, classes.num_actions), ("verb_logits", seg.verb, classes.num_verbs),
                           ("noun_logits", seg.noun, classes.num_nouns)):
        counts = np.bincount(labels[train], minlength=n) + 1.0
        want = getattr(plain, key).astype(np.float64) - 0.5 * np.log(counts / counts.sum())  # [P, C]
        np.testing.assert_allclose(getattr(shifted, key), want, atol=0.02, rtol=2e-3)  # both stored as float16
    store.delete_predictions("pc")  # the shared store keeps only the build's own group


def test_lse_temperatures_reach_the_group_and_reuse_the_stages(built):
    """The config's lse_temperatures are the group's log-sum-exp columns; a rebuild with others
    reuses the finished stages (they are taken from the stored logits afterwards)."""
    store, cfg, result = built
    assert cfg.lse_temperatures == (1.0, 2.0, 4.0, 10.0) and store.group("t").lse_temperatures == [1.0, 2.0, 4.0, 10.0]
    stamps = {p: p.stat().st_mtime_ns for p in result.work_dir.glob("*/predictions.safetensors")}
    build_teacher(store, "lse", preset("tiny", **{**BUILD, "lse_temperatures": (3.0, 5.0)}), train_split="training1",
                  eval_splits=("validation1",), work_dir=result.work_dir, show_progress=False)
    assert stamps and {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no stage ran again
    group = store.group("lse")
    assert group.lse_temperatures == [3.0, 5.0] and group.config["lse_temperatures"] == [3.0, 5.0]
    x = np.asarray(group.logits) / np.float32(5.0)  # [P, A] float32, as the writer reduces it
    m = x.max(1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(group.lse)[:, 1], (m + np.log(np.exp(x - m).sum(1, keepdims=True)))[:, 0])
    store.delete_predictions("lse")  # the shared store keeps only the build's own group


def test_resume_after_interruption_matches_uninterrupted(built, tmp_path, teacher_ann):
    store, cfg, r = built
    other = new_store(tmp_path / "s.zarr", teacher_ann)
    work = shared_start(r.work_dir, tmp_path / "work")

    def stop(stage, epoch, row):
        if stage == "fold0" and epoch == 2:
            raise KeyboardInterrupt

    args = dict(train_split="training1", eval_splits=("validation1",), work_dir=work, show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_teacher(other, "t", cfg, on_epoch=stop, **args)
    assert "t" not in other.groups()
    assert json.loads((work / "fold0" / "state.json").read_text())["epoch"] == 2
    assert (work / "full" / "predictions.safetensors").exists() and not (work / "fold1").exists()
    seen = []
    build_teacher(other, "t", cfg, on_epoch=lambda s, e, row: seen.append((s, e)), **args)
    assert seen == [("fold0", 3), ("fold1", 1), ("fold1", 2), ("fold1", 3)]  # finished stages and epochs skipped
    a, b = store.group("t"), other.group("t")
    assert np.allclose(np.asarray(a.logits, np.float32), np.asarray(b.logits, np.float32), atol=1e-2)
    with pytest.raises(ConfigError, match="other settings \\(config.lr: saved"):
        build_teacher(other, "t2", preset("tiny", **{**BUILD, "lr": 1e-3}), **args)


def test_parallel_workers_give_the_same_predictions(built, tmp_path, teacher_ann):
    store, cfg, r = built
    other = new_store(tmp_path / "s.zarr", teacher_ann)
    par = preset("tiny", workers=2, **BUILD)
    build_teacher(other, "t", par, train_split="training1", eval_splits=("validation1",), show_progress=False,
                  work_dir=shared_start(r.work_dir, tmp_path / "work"))
    a, b = store.group("t"), other.group("t")
    assert np.allclose(np.asarray(a.logits, np.float32), np.asarray(b.logits, np.float32), atol=1e-2)


def test_eval_split_predictions_do_not_depend_on_the_folds(built, tmp_path, teacher_ann):
    """The full model alone predicts the eval splits, so a build without folds gives them the same
    logits and metrics; only the training split's predictions (in-sample instead of out-of-fold) differ."""
    store, cfg, r = built
    other = new_store(tmp_path / "s.zarr", teacher_ann)
    work = shared_start(r.work_dir, tmp_path / "work")
    (work / "build.json").unlink()  # a build of other settings (folds) on the same tokenizer and encoder
    result = build_teacher(other, "t", preset("tiny", **{**BUILD, "folds": 1}), train_split="training1",
                           eval_splits=("validation1",), show_progress=False, work_dir=work)
    a, b = store.group("t"), other.group("t")
    for split, same in (("validation1", True), ("training1", False)):
        rows = store.segments.rows_in(split)
        la, lb = (np.asarray(g.logits[g.row_of_segment[rows]], np.float32) for g in (a, b))
        assert np.allclose(la, lb, atol=1e-2) == same, split
    assert result.metrics["validation1"] == pytest.approx(r.metrics["validation1"])


# -- bad input: one-line KDStoreError, nothing written ------------------------------------------


def _nothing_written(store: Store, name: str) -> None:
    assert name not in store.groups()
    assert not (Path(f"{store.path}.teacher-work") / name).exists()


def test_build_errors(built, tmp_path, teacher_ann):
    store, cfg, r = built
    quick = preset("tiny", epochs=1, folds=1, **TINY)
    with pytest.raises(MissingError, match="split 'test9'"):
        build_teacher(store, "e1", quick, train_split="training1", eval_splits=("test9",), show_progress=False)
    with pytest.raises(DataError, match="already exist"):
        build_teacher(store, "t", quick, train_split="training1", show_progress=False)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match=r"plain: not a Hugging Face checkpoint directory \(missing config.json"):
        build_teacher(store, "e2", quick, train_split="training1", pretrained=tmp_path / "plain", show_progress=False)
    _nothing_written(store, "e2")
    # a teacher export whose heads have another class count
    fewer = tmp_path / "fewer"
    shutil.copytree(r.work_dir / "teacher", fewer)
    meta = json.loads((fewer / "teacher.json").read_text())
    (fewer / "teacher.json").write_text(json.dumps({**meta, "num_actions": meta["num_actions"] + 1}))
    with pytest.raises(ConfigError, match="teacher heads have .* actions.*the store has"):
        build_teacher(store, "e3", quick, train_split="training1", pretrained=fewer, show_progress=False)
    _nothing_written(store, "e3")
    # a resume checkpoint whose heads have another class count
    work = tmp_path / "work"
    shutil.copytree(r.work_dir, work)
    (work / "build.json").unlink()
    (work / "full" / "predictions.safetensors").unlink()
    head = next((work / "full").glob("model-e*.safetensors"))
    from safetensors.torch import load_file, save_file
    weights = load_file(head)
    weights["action.weight"] = torch.zeros(weights["action.weight"].shape[0] + 2, weights["action.weight"].shape[1])
    save_file(weights, head)
    with pytest.raises(ConfigError, match=r"action.weight has shape .* another class count"):
        build_teacher(store, "e4", preset("tiny", **BUILD), train_split="training1",
                      eval_splits=("validation1",), work_dir=work, show_progress=False)
    assert "e4" not in store.groups()


def test_all_unknown_histories(built, tmp_path):
    store, cfg, r = built
    foreign = tmp_path / "foreign"
    pretrain_mlm(["zzz <v> qqq <a> zzz <v> www"] * 4, foreign, PretrainConfig(size="tiny", max_len=16, epochs=1, batch_size=4))
    with pytest.raises(DataError, match="histories: every token is empty or unknown"):
        build_teacher(store, "e5", preset("tiny", **TINY), train_split="training1", pretrained=foreign, show_progress=False)
    _nothing_written(store, "e5")


def test_empty_split_and_empty_histories(tmp_path, teacher_ann):
    classes, seg = load_annotations(teacher_ann, fps=24.0)
    # keep one training segment per video (so every training history is empty) and add an empty split
    rows = seg.rows_in("training1")
    first = np.array([rows[seg.video[rows] == v][0] for v in np.unique(seg.video[rows])] + list(seg.rows_in("validation1")))
    cols = {c: getattr(seg, c)[first] for c in SegmentTable.COLUMNS}
    cols["split_mask"] = np.pad(cols["split_mask"], ((0, 0), (0, 1)))  # and an empty split
    sparse = SegmentTable(**cols, videos=seg.videos, splits=[*seg.splits, "test1"], fps=seg.fps)
    store = Store.create(tmp_path / "s.zarr", classes, sparse)
    quick = preset("tiny", epochs=1, folds=1, **TINY)
    with pytest.raises(DataError, match="no labelled segments in split 'test1'"):
        build_teacher(store, "e", quick, train_split="training1", eval_splits=("test1",), show_progress=False)
    with pytest.raises(DataError, match="every history is empty"):
        build_teacher(store, "e", quick, train_split="training1", show_progress=False)
    _nothing_written(store, "e")


# -- n-gram ---------------------------------------------------------------------------------


def test_ngram_sanity():
    # 0 -> 1 -> 2 -> 0 ... deterministic chain, plus action 3 only after (2, 0)
    ctx = np.array([[-1, -1], [-1, 0], [0, 1], [1, 2], [2, 0], [0, 1], [1, 2], [2, 0]])
    nxt = np.array([0, 1, 2, 0, 3, 2, 0, 1])
    m = NGram(4, order=3).fit(ctx, nxt)
    p = m.predict(np.array([[0, 1], [1, 2], [2, 0], [3, 3], [-1, -1]]))
    assert p.sum(axis=1) == pytest.approx(1.0)
    assert p[0].argmax() == 2 and p[1].argmax() == 0
    # (2, 0) was followed by 1 and by 3 once each; the bigram "0 ->" adds weight to 1 (seen twice)
    assert p[2][1] > p[2][3] > p[2][2] and p[2][[1, 3]].sum() > 0.5
    uni = NGram(4, order=1).fit(ctx, nxt).predict(np.array([[3, 3]]))[0]
    assert uni == pytest.approx((np.bincount(nxt, minlength=4) + 1) / (len(nxt) + 4))  # add-1 unigram
    assert p[3] == pytest.approx(uni)  # unseen context backs off to the unigram
    with pytest.raises(DataError, match="no training examples"):
        NGram(4).fit(np.zeros((0, 2)), np.zeros(0))


def test_ngram_learns_synthetic_sequences(teacher_ann):
    classes, seg = load_annotations(teacher_ann, fps=24.0)
    val = seg.rows_in("validation1")
    p = ngram_baseline(seg, classes.num_actions, "training1", val, order=2, mode="complete")
    assert (p.argmax(1) == seg.action[val]).mean() > 0.3  # far above chance (1/21)
    assert action_histories(seg, val, 2, split="validation1").min() >= -1


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_evaluate_pretrain_and_errors(built, tmp_path, teacher_ann):
    from cli import app

    store, cfg, r = built
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(store.path), "--baseline", "ngram", "--write", "ngram", "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    again = runner.invoke(app, ["evaluate", str(store.path), "--predictions", "ngram", "--json"])
    assert json.loads(again.stdout)["top1"] == pytest.approx(m["top1"]) and store.group("ngram").kind == "baseline"
    res = runner.invoke(app, ["evaluate", str(store.path), "-p", "t"])
    assert res.exit_code == 0 and "validation1" in res.stdout  # a rich table
    res = runner.invoke(app, ["evaluate", str(store.path), "-p", "t", "--json"])
    stored = store.group("t").metrics["validation1"]
    assert json.loads(res.stdout)["top1"] == pytest.approx(stored["top1"], abs=2.5)  # fp16 logits in the store
    res = runner.invoke(app, ["pretrain-lm", "--from-annotations", str(teacher_ann), "--out", str(tmp_path / "lm"),
                              "--size", "tiny", "--epochs", "1", "--max-len", "32", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "lm" / "model.safetensors").exists()
    bad = tmp_path / "bad.txt"
    bad.write_text("cut <v> tomato\n\n<a>\n")
    res = runner.invoke(app, ["pretrain-lm", str(bad), "--out", str(tmp_path / "lm2")])
    assert isinstance(res.exception, KDStoreError) and "line 3: no actions" in str(res.exception)
    assert not (tmp_path / "lm2").exists()


def test_cli_build_teacher_tiny(tmp_path, teacher_ann):
    from cli import app

    store = new_store(tmp_path / "s.zarr", teacher_ann)
    # --set reaches fields that also have a named option (folds, epochs); a given named option wins (topk)
    res = CliRunner().invoke(app, ["build-teacher", str(store.path), "--name", "cli", "--preset", "tiny", "--set", "folds=1",
                                   "--set", "epochs=1", "--single-task", "--set", "threads=1", "--set", "topk=7", "--topk", "5"])
    assert res.exit_code == 0, res.output
    g = Store.open(store.path).group("cli")
    assert g.present.all() and g.topk == 5 and g.config["multi_task"] is False
    assert g.config["folds"] == 1 and g.config["epochs"] == 1
    assert set(g.metrics) == {"validation1", "training1 (in-sample)"}
    # an external corpus: pretraining text plus (history, next action) fine-tuning examples
    classes, seg = load_annotations(teacher_ann, fps=24.0)
    corpus = tmp_path / "recipes.txt"
    corpus.write_text("\n".join(history_corpus(classes, seg, "training1") + ["fly <v> kite <a> cut <v> tomato"]) + "\n")
    args = ["build-teacher", str(store.path), "--preset", "tiny", "--folds", "1", "--epochs", "1", "--pretrain-epochs",
            "1", "--set", "threads=1"]
    res = CliRunner().invoke(app, [*args, "--name", "c", "--corpus", str(corpus), "--set", "corpus_examples=20"])
    assert res.exit_code == 0, res.output
    build = json.loads((Path(f"{store.path}.teacher-work") / "c" / "build.json").read_text())
    assert len(build["corpus_sha256"]) == 64 and Store.open(store.path).group("c").present.all()
    res = CliRunner().invoke(app, [*args, "--name", "e", "--set", "corpus_examples=20"])
    assert isinstance(res.exception, ConfigError) and "corpus_examples needs a corpus" in str(res.exception)
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("fly <v> kite <a> sail <v> boat\n")
    res = CliRunner().invoke(app, [*args, "--name", "f", "--corpus", str(foreign), "--set", "corpus_examples=20"])
    assert isinstance(res.exception, DataError) and "no line of two or more actions that are all store classes" in str(res.exception)
    assert "f" not in Store.open(store.path).groups()


FLAGS = {"multi_task": ("--multi-task", "--single-task"), "freeze_embeddings": ("--freeze-embeddings", "--train-embeddings")}


def _options(values: dict) -> list[str]:
    """``values`` as the generated command-line options of their fields."""
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(FLAGS.get(key, (flag, "--no-" + flag[2:]))[0 if value else 1])
        else:
            out += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return out


def test_cli_config_options_are_generated_for_every_field(tmp_path, teacher_ann):
    """Every PretrainConfig and TeacherConfig field is an option of pretrain-lm / build-teacher
    (listed with its help) that reaches the config, each option at a value neither the field's
    default nor the preset's."""
    from cli import app

    runner = CliRunner()
    for command, cls in (("pretrain-lm", PretrainConfig), ("build-teacher", TeacherConfig)):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"}).output
        helps = field_help(cls)
        for name in field_names(cls):
            assert "--" + name.replace("_", "-") in text or name in FLAGS, (command, name)
            assert helps.get(name, "") in text, (command, name)
        assert all(flag in text for name in FLAGS for flag in FLAGS[name]) == (cls is TeacherConfig)
    base = tmp_path / "lm0"
    res = runner.invoke(app, ["pretrain-lm", "--from-annotations", str(teacher_ann), "--out", str(base), "--size", "tiny",
                              "--epochs", "1", "--max-len", "32"])
    assert res.exit_code == 0, res.output
    mlm = dict(family="roberta", size="mini", init_from=str(base), vocab_size=300, max_len=24, epochs=1, lr=1e-3,
               batch_size=8, weight_decay=0.02, warmup=0.2, mask_prob=0.2, dropout=0.05, seed=3, threads=2, device="cpu")
    assert sorted(mlm) == sorted(field_names(PretrainConfig))
    assert all(v != getattr(PretrainConfig(), k) for k, v in mlm.items())
    res = runner.invoke(app, ["pretrain-lm", "--from-annotations", str(teacher_ann), "--out", str(tmp_path / "lm1"),
                              "--window", "6", *_options(mlm)])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "lm1" / "pretrain.json").read_text())["config"] == mlm

    teacher = dict(family="roberta", size="mini", init_from=str(tmp_path / "lm1"), vocab_size=300, dropout=0.05,
                   pooling="mean", freeze_embeddings=True, hist_len=3, multi_history=(2, 3), history="complete", max_len=24,
                   history_dropout=0.2, recent_first=True, colon="reverse", multi_task=False, class_weighted=0.5,
                   label_smoothing=0.1, prior_correction=0.3, lr=2e-3, weight_decay=0.02, warmup=0.2, epochs=1, batch_size=8,
                   grad_clip=0.5, folds=1, topk=5, lse_temperatures=(3.0, 5.0), pretrain_epochs=1, pretrain_lr=1e-3,
                   pretrain_batch_size=8, pretrain_window=6, mask_prob=0.2, corpus_examples=5, seed=3, threads=2, workers=2,
                   device="cpu")
    assert sorted(teacher) == sorted(field_names(TeacherConfig))
    assert all(v not in (getattr(TeacherConfig(), k), PRESETS["tiny"].get(k)) for k, v in teacher.items())
    classes, seg = load_annotations(teacher_ann, fps=24.0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(history_corpus(classes, seg, "training1")) + "\n")
    store = new_store(tmp_path / "s.zarr", teacher_ann)
    res = runner.invoke(app, ["build-teacher", str(store.path), "--name", "all", "--preset", "tiny", "--corpus", str(corpus),
                              *_options(teacher)])
    assert res.exit_code == 0, res.output
    config = Store.open(store.path).group("all").config
    assert {k: config[k] for k in teacher} == {**teacher, "multi_history": [2, 3], "lse_temperatures": [3.0, 5.0]}
    # bad options and --set pairs: one line naming each, before any work
    res = runner.invoke(app, ["build-teacher", str(tmp_path / "none.zarr"), "--name", "x", "--preset", "tiny",
                              "--hist-len", "0", "--set", "colon=sideways", "--set", "bogus=1"])
    assert isinstance(res.exception, ConfigError) and "bogus: unknown option" in str(res.exception)
    res = runner.invoke(app, ["build-teacher", str(tmp_path / "none.zarr"), "--name", "x", "--preset", "tiny",
                              "--hist-len", "0", "--set", "colon=sideways"])
    assert isinstance(res.exception, ConfigProblems)
    assert res.exception.problems == ["colon: expected one of keep, reverse, got 'sideways'", "hist_len: expected > 0, got 0"]
    res = runner.invoke(app, ["pretrain-lm", str(corpus), "--out", str(tmp_path / "x"), "--set", "mask_prob=1", "--lr", "-1"])
    assert isinstance(res.exception, ConfigProblems) and not (tmp_path / "x").exists()
    assert res.exception.problems == ["lr: expected > 0, got -1.0", "mask_prob: expected in (0, 1), got 1.0"]


# -- real EGTEA (skipped when the data is absent) ------------------------------------------------


@pytest.mark.skipif(not EGTEA_DIR.exists(), reason=f"real EGTEA annotations not found at {EGTEA_DIR}")
def test_real_egtea_histories_corpus_and_ngram():
    classes, seg = load_annotations(EGTEA_DIR, ["training1", "validation1"])
    assert classes.num_actions == 106
    val = seg.rows_in("validation1")
    texts = history_texts(classes, seg, val, 15, split="validation1")
    assert sum(t == "" for t in texts) < 0.05 * len(texts)
    tok = train_tokenizer(history_corpus(classes, seg, "training1"), 512)
    ids = encode(tok, texts, 96)
    assert tok.unk_token_id not in ids.ids  # class words are all in the vocabulary
    from kdstore.metrics import compute_metrics

    m = compute_metrics(ngram_baseline(seg, 106, "training1", val, order=2, split="validation1"), seg.action[val], classes)
    assert m["top1"] > 20 and m["mean_top1_recall"] > 15


def test_bench_teacher_build_refuses_bad_overrides_in_one_line(capsys):
    from bench.teacher_build import main

    with pytest.raises(SystemExit) as e:
        main(["--tiny", "--set", "nope=1", "--set", "epochs=abc"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "nope: unknown option" in err and "epochs: expected int, got 'abc'" in err


def test_bench_teacher_build_tiny(tmp_path):
    from bench.teacher_build import run

    [row] = run(tiny=True, out_dir=tmp_path, threads=1)
    assert float(row["seconds"]) > 0 and float(row["peak_rss_mib"]) > 0 and int(row["uids"]) > 100
    assert 0 <= float(row["teacher_top1"]) <= 100 and float(row["ngram2_top1"]) > 0
    assert (tmp_path / "teacher_build.csv").read_text().count("\n") == 2
    # a pretrained-checkpoint build (a stand-in of MiniLM's kind, tiny), on the device option
    [row] = run(tiny=True, out_dir=tmp_path, init_from="standin", preset_name="egtea", device="cpu", fps=30.0, folds=2,
                epochs=1, max_len=64, batch_size=16, lr=1e-3, threads=1)
    config = json.loads(row["config"])
    assert config["fps"] == 30.0  # the annotations' rate, as given
    assert config["checkpoint"].startswith("standin") and config["teacher"]["hist_len"] == 15
    assert row["devices"] == "cpu" and float(row["full_seconds"]) > 0 and float(row["fold_seconds_max"]) > 0
