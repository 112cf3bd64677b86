"""Training (paper §4.3): three stages on a frozen base, plus the single-LoRA baselines.

==============  =====================================================================================
``config``      :class:`TrainConfig` / :class:`StageConfig`: one YAML per run, the paper's Appendix A
``records``     training records: load, validate (file, line, id), encode with the prompt masked
``losses``      contrastive, trait-consistency and router losses (eqs. 3, 5, 6), the LM loss sums
``plans``       which records each step trains on: a pure function of (seed, step)
``objectives``  what each stage minimises, and the one normalisation rule (token-mean, row-mean)
``batching``    records to padded tensors; a step's rows to micro-batches
``loop``        the loop every stage runs: optimiser, clipping, logs, checkpoints, resume
``stages``      the recipes: warm-up, router, joint and SFT runners, the pipelines, the baselines
``engine``      accelerate underneath: one process, DDP, FSDP2 (sharded copy, whole checkpoints)
``cli``         ``personafuse train`` and ``personafuse train baseline``
==============  =====================================================================================

Nothing is imported here; import from the modules.
"""
