"""Adapters: wrappers that stand where a layer's original modules stood, keep them as ``base``, and meter what
they spend.

- ``base``: the wrapper kinds (a unit serving stacked linears through slots, whole-MLP and whole-attention
  wrappers), the Meter, and injection/unload by the model family's module paths;
- ``thresholds``: the score histogram and the mixin that sets a mask's threshold for a target count;
- ``low_rank``: static low rank (SVD) and RaNA's rank adapter with per-token rank masks;
- ``mlp``: RaNA's neuron adapter for down, RaNA's whole MLP, and CATS;
- ``a3``: A3's narrower attention and MLP;
- ``artifacts``: a run's adapters on disk (safetensors), each adapter describing its own state.
"""
