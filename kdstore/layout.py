"""Names of the store's logical layout that several modules share.

The groups (identical in both backends, see ``schemas/`` and docs/format.md)::

    /                   manifest (schema version, creation, provenance, segments_sha256)
    classes/            names (attrs), action_verb [A], action_noun [A], many-shot masks
    segments/           uid, video, start_frame, end_frame, verb, noun, action [S],
                        split_mask [S, P], id [S, W] (string-keyed datasets), subset_mask [S, Q]
    video/<name>/       features [F, D], timestamps [F], offsets [V+1]; attrs: videos, rate
    teacher/<name>/     uids [P], logits [P, A], topk_values/indices [P, K], lse [P, nT],
                        features [P, H], verb_logits, noun_logits; attrs: config, metrics

A feature build stages its videos in ``<staging>/video-<name>`` (locked by
``video-<name>.lock`` beside it) until it commits them as ``video/<name>``.
"""

from __future__ import annotations

from .errors import DataError

STAGED_VIDEO_PREFIX = "video-"  # + the feature set's name: a feature build's staging folder


def check_name(name: str) -> None:
    """Raise DataError unless ``name`` can name a ``video/`` or ``teacher/`` group."""
    if not name or name.startswith((".", "_")) or "/" in name or name != name.strip():
        raise DataError(f"group name {name!r}: must be non-empty, without '/', not starting with '.' or '_'")
