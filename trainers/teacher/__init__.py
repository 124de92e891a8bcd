"""The text teacher: a language model reading action histories as text.

Modules, in pipeline order:

- ``config``    TeacherConfig and its presets (egtea, ek55, egtea-scratch, ek100-cpu, demo, tiny)
- ``corpus``    action-sequence corpora (text, JSONL recipes, a split's histories)
- ``tokenizer`` WordPiece on the action language, or a checkpoint's tokenizer + <v>, <a>
- ``models``    transformers encoders of six families with action/verb/noun heads
- ``optim``     AdamW, lr schedule, padding, safetensors+JSON epoch checkpoints
- ``pretrain``  masked-LM pretraining (``kdstore pretrain-lm``)
- ``finetune``  the multi-task fine-tuning loop and batched prediction
- ``build``     ``kdstore build-teacher``: K-fold out-of-fold predictions into the store
- ``ngram``     the interpolated n-gram baseline
- ``evaluate``  ``kdstore evaluate`` on any prediction group or the n-gram baseline
"""
