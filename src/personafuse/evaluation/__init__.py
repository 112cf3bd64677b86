"""Evaluation suite: the paper's benchmarks, LLM judges, lm-eval integration, probing, routing
analysis, comparison reports (SPEC §5) and the pairwise human study (``annotation``). Heavy
imports stay inside the submodules."""
