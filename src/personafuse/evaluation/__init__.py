"""Evaluation suite: the paper's benchmarks, LLM judges, lm-eval integration, probing, routing
analysis and comparison reports (SPEC §5). Heavy imports stay inside the submodules."""
