"""Recovery after compression: LoRA fine-tuning of a stored run, with one LoRA rank per layer.

- ``config``: RecoverConfig and the strategies (torch-free: the CLI and the queue validate with it);
- ``lora``: placing peft LoRA layers on whatever computes each linear of an adapted layer;
- ``rank_search``: per-layer LoRA ranks under a parameter budget (uniform, error-proportional, RankAdaptor);
- ``recover``: the recovery run end to end.
"""
