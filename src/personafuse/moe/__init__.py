"""Persona-MoE, the model (paper §4.1): ten LoRA experts on a frozen base, mixed by a router.

==============  =====================================================================================
``config``      :class:`PersonaFuseConfig`: base, encoder, rank, alpha, tau, targets (paper defaults)
``mixture``     :class:`MixtureLinear`: the ten experts stacked into one adapter, the mixture forward
``packing``     the packed inference layout: sibling layers as one GEMM and one fused expand
``kernels``     Triton kernels of the packed layout (fused expand, gate/up with the activation)
``router``      the persona encoder and cosine/softmax routing (paper eq. 1)
``routing``     :class:`Routing`: router, fixed, blend, top-k, pole and random modes
``decoding``    the decoding loop: a static cache, no host sync per token (greedy, or the shared sampler)
``model``       :class:`PersonaFuseModel`: build and route; generate, save/load and export below
``generation``  replies and the weights arguments (``PersonaFuseModel.generate``)
``checkpoint``  the checkpoint format (``save_pretrained`` / ``from_pretrained``)
``export``      one fixed mixture, or the unweighted stack, as a standard peft LoRA
==============  =====================================================================================

Nothing is imported here, so that ``personafuse.moe.config`` (read by the CLI's ``--help``) loads
without torch; import from the modules, or the top level (``from personafuse import PersonaFuseModel``).
"""
