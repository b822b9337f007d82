"""Latent dashboards: a code cache, per-latent statistics at every budget, an offline web report
and Neuronpedia / SAEDashboard exports.

One concept per module, in pipeline order: :mod:`.cache` (sorted codes at k_max in safetensors
shards), :mod:`.topn` and :mod:`.stats` (vectorised per-budget statistics read off ranks),
:mod:`.contexts` (token windows), :mod:`.lens` (logit lens, decoder neighbours),
:mod:`.records` (one JSON-ready record per latent), :mod:`.report` (``DIR/index.html``),
:mod:`.export` (Neuronpedia batches per budget), :mod:`.labels` (short latent labels for
``encode``) and :mod:`.build` (the whole ``hsae-runtime features`` pipeline).
:mod:`.absorption` measures first-letter feature absorption per budget (with the linear
probes of :mod:`.probes`).
"""
