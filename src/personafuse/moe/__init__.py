"""Persona-MoE, the model (paper §4.1): ten LoRA experts on a frozen base, mixed by a router.

=============  =====================================================================================
``config``     :class:`PersonaFuseConfig`: base, encoder, rank, alpha, tau, targets (paper defaults)
``mixture``    :class:`MixtureLinear`: the ten experts stacked into one adapter, the mixture forward
``packing``    the packed inference layout: sibling layers as one GEMM and one fused expand
``kernels``    Triton kernels of the packed layout (fused expand, gate/up with the activation)
``router``     the persona encoder and cosine/softmax routing (paper eq. 1)
``routing``    :class:`Routing`: router, fixed, blend, top-k, pole and random modes
``decoding``   greedy decoding with a static cache and no host sync per token
``model``      :class:`PersonaFuseModel`: build, route, generate, save/load, export one LoRA
=============  =====================================================================================

Nothing is imported here, so that ``personafuse.moe.config`` (read by the CLI's ``--help``) loads
without torch; import from the modules, or the top level (``from personafuse import PersonaFuseModel``).
"""
