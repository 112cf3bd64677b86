"""Training (paper §4.3): three stages on a frozen base, plus the single-LoRA baselines.

=============  =====================================================================================
``config``     :class:`TrainConfig` / :class:`StageConfig`: one YAML per run, the paper's Appendix A
``records``    training records: load, validate (file, line, id), encode with the prompt masked
``losses``     contrastive, trait-consistency and router losses (eqs. 3, 5, 6), the LM loss sums
``stages``     warm-up, router, joint and SFT on one accelerate loop: plans, objectives, resume
``engine``     accelerate underneath: one process, DDP, FSDP2 (sharded copy, whole checkpoints)
``cli``        ``personafuse train`` and ``personafuse train baseline``
=============  =====================================================================================

Nothing is imported here; import from the modules.
"""
