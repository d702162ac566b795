"""proxim's objectives inside trainers people already run (docs/integrations.md).

- `proxim.integrations.verl`: every installed trust region as a verl policy loss ``proxim:<region>``
  and every advantage as a verl advantage estimator ``proxim:<advantage>``. verl loads it through the
  ``verl.plugins`` entry point when ``verl`` is imported; it imports no verl module itself until verl
  imports ``verl.trainer.ppo.core_algos``. Install with ``pip install 'proxim[verl]'``.
- `proxim.integrations.trl`: ``ProximGRPOTrainer``, TRL's ``GRPOTrainer`` with a proxim objective for
  its advantages and loss. Importing it imports TRL. Install with ``pip install 'proxim[trl]'``.
- `proxim.integrations.common`: what both share (whether stage 1 reads the old log-probs).

Importing ``proxim`` or this package imports neither verl nor TRL.
"""
