"""Recovery of the accuracy lost in the swap to FAVOR+: the reusable parts of ``examples/``' recipes.

- ``attention_transfer``: per-layer attention-output MSE against the softmax teacher (hooks),
  what trains (all / attention / learnable features ω) and the ``Trainer`` that minimises it;
- ``sentence_embeddings``: mean pooling, pair collator and cosine-regression ``Trainer``;
- ``diagnose``: per-layer relative error of FAVOR+ vs exact attention, table and plot;
- ``checkpoints``: teacher/student loading and saving a recovered model with its card;
- ``provenance``: the original model and the training stages a recovered checkpoint records;
- ``data``, ``arguments``, ``curves``, ``training``: datasets, ``--favor-*`` options, the recovery
  curve, resuming and the cross-process feature check.
"""
