"""The text teacher: a language model reading action histories as text.

Modules, in pipeline order:

- ``config``    TeacherConfig and its presets (egtea, ek55, egtea-scratch, egtea-cpu, ek100-cpu, demo, tiny), PretrainConfig
- ``device``    where stages run: CPU or CUDA (bf16 autocast), one process per device slot
- ``corpus``    action-sequence corpora (text, JSONL recipes, a split's histories)
- ``tokenizer`` WordPiece on the action language, or a checkpoint's tokenizer + <v>, <a>; token arrays
- ``models``    transformers encoders of six families with action/verb/noun heads
- ``optim``     AdamW, lr schedule, safetensors+JSON epoch checkpoints and their checked reads
- ``pretrain``  masked-LM pretraining (``kdstore pretrain-lm``)
- ``finetune``  the multi-task fine-tuning loop and batched prediction
- ``build``     ``kdstore build-teacher``: K-fold out-of-fold predictions into the store
- ``ngram``     the interpolated n-gram baseline
- ``evaluate``  ``kdstore evaluate`` on any prediction group or the n-gram baseline
"""
