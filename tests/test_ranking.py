"""kdstore.ranking: one rule (decreasing score, exact ties to the lower class index), and
scores an export writes so that any sort, the official scorer's argsort included, ranks them by it."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kdstore.ranking import label_ranks, rank_order, ranked_scores, strictly_decreasing
from kdstore.store import Store

# small integer-valued scores: ties everywhere; rows of 1..40 classes
tied_scores = st.integers(1, 6).flatmap(
    lambda n: st.integers(1, 40).flatmap(lambda c: arrays(np.float64, (n, c), elements=st.integers(-3, 3).map(float))))


@settings(max_examples=150, deadline=None)
@given(tied_scores, st.integers(1, 45))
def test_rank_order_is_decreasing_score_then_lower_index(x, k):
    c = x.shape[1]
    want = np.array([sorted(range(c), key=lambda j: (-row[j], j)) for row in x])[:, :min(k, c)]  # [n, k]
    np.testing.assert_array_equal(rank_order(x, k), want)
    np.testing.assert_array_equal(rank_order(x), np.array([sorted(range(c), key=lambda j: (-row[j], j)) for row in x]))


@settings(max_examples=150, deadline=None)
@given(tied_scores, st.data())
def test_label_ranks_agree_with_rank_order(x, data):
    labels = np.array(data.draw(st.lists(st.integers(0, x.shape[1] - 1), min_size=len(x), max_size=len(x))))
    order = rank_order(x)
    np.testing.assert_array_equal(order[np.arange(len(x)), label_ranks(x, labels)], labels)


@settings(max_examples=150, deadline=None)
@given(tied_scores, st.integers(1, 45))
def test_ranked_scores_sort_the_same_way_in_every_sort(x, k):
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)  # probabilities with exact ties
    idx, vals = ranked_scores(p, k)
    assert (np.diff(vals, axis=1) < 0).all()
    np.testing.assert_allclose(vals, np.take_along_axis(p, idx, 1), rtol=1e-13, atol=0)
    for kind in ("quicksort", "heapsort", "stable"):
        # the official scorer's ranking of a dict in file order: class_ids[np.argsort(scores)[::-1]]
        np.testing.assert_array_equal(np.take_along_axis(idx, np.argsort(vals, axis=1, kind=kind)[:, ::-1], 1), idx)
        # ... and of a full array indexed by class: argsort(axis=-1)[:, ::-1]
        if k >= x.shape[1]:
            full = np.zeros_like(p)
            np.put_along_axis(full, idx, vals, 1)
            np.testing.assert_array_equal(np.argsort(full, axis=1, kind=kind)[:, ::-1], idx)


def test_strictly_decreasing_moves_only_ties():
    v = np.array([[3.0, 2.0, 2.0, 2.0, 0.0, 0.0]])
    w = strictly_decreasing(v)
    assert w[0, 0] == 3.0 and w[0, 5] == 0.0 and w[0, 3] == 2.0 and (np.diff(w) < 0).all()
    assert w[0, 1] == np.nextafter(np.nextafter(2.0, 3), 3) and w[0, 4] == np.nextafter(0.0, 1)


def test_stored_top_k_follows_the_rule(tmp_path):
    from kdstore.ingest import ingest
    from kdstore.synthetic import SyntheticConfig, generate_annotations

    s: Store = ingest(generate_annotations(tmp_path / "ann", SyntheticConfig(n_videos=6)), tmp_path / "s.zarr", dataset="egtea")
    seg, A = s.segments, s.classes.num_actions
    logits = np.random.default_rng(0).integers(-2, 2, size=(len(seg), A)).astype(np.float32)  # [S, A] ties
    g = s.write_predictions("t", seg.uid, logits, topk=7)
    stored = np.asarray(g.logits)
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(g.topk_indices, rank_order(stored, 7))
    np.testing.assert_array_equal(g.topk_values, np.take_along_axis(stored, rank_order(stored, 7), 1))
    row = int(seg.row_of([seg.uid[0]])[0])
    top = [t["action"] for t in g.predict(seg.uid[0], k=4)["top"]]
    assert top == rank_order(stored[g.row_of_segment[row]][None], 4)[0].tolist()
