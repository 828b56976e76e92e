"""Training the embedded MoDA model: data shards, a synthetic corpus, the training loop.

* :mod:`~avatar_agent.train.shards` — utterance shards + JSON index, corpus statistics, random
  normalised N-frame segments with the previous-frame condition (:class:`ShardDataset`).
* :mod:`~avatar_agent.train.corpus` — espeak-ng speech (varied voices, rates, pitch, noise and
  reverb) animated by the procedural teacher on randomised template faces.
* :mod:`~avatar_agent.train.loop` — rectified-flow + velocity/acceleration losses, condition
  dropout, AdamW, EMA, resumable checkpoints, loss curves, export/load of trained models.
* :mod:`~avatar_agent.train.cli` — ``avatar-agent data-prep`` / ``avatar-agent train``.

Submodules import torch; this package module itself imports nothing heavy.
"""
