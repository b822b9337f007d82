"""Reproduce the paper's Pareto claim on a real LM: one HierarchicalTopK SAE vs TopK SAEs.

One command (from the repository root)::

    .venv/bin/python benchmarks/pareto.py --out runs/pareto          # Gemma-3 270M, ~1 h
    .venv/bin/python benchmarks/pareto.py --quick --out runs/quick   # tiny random LM, ~1 min

Stages, each resumable from what it left under ``--out`` (rerun the command to continue):

1. **split** the text into documents (WikiText's `` = Title = `` headings delimit articles;
   otherwise blank-line blocks) and hold out every ``--eval-every``-th document: the eval part
   is never trained on (``data/train.txt``, ``data/eval.txt``);
2. **cache** hookpoint activations of both parts once (``hsae_runtime.training.buffer``'s
   activation cache, float32, special tokens excluded);
3. **train** one HierarchicalTopK SAE (k_max) and TopK SAEs at ``--topk-ks`` with
   ``hsae_runtime.training.trainer.train`` on exactly the same cached activations, data order,
   initialisation, token count, width and hyper-parameters (``models/*.safetensors``). Every
   SAE has the same k_max, so a TopK SAE can be read at any budget, not just its own;
4. **time** training steps, interleaving the objectives so that a shared CPU slows all alike;
5. **eval**: FVU on the whole eval part and dead-latent % at every ``--eval-ks`` budget, and the
   next-token CE delta with the reconstruction spliced in on a subset of eval contexts (batched
   so the 262k-word LM head stays affordable, and cross-checked against
   ``hsae_runtime.lm.splice``; see ``evaluate.py``);
6. **report**: ``results.json``, ``table.md``, ``pareto.png``.

Modules: ``settings`` (the ``Settings`` dataclass and the flags), ``data`` (stages 1-2),
``train`` (3-4), ``evaluate`` (5), ``report`` (6) and ``run`` (all stages in order, ``main``).
The first paragraph of this docstring is the command's ``--help`` description.
"""
