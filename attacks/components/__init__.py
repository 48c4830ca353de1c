"""Shared machinery of the attacks: the pieces that published methods are built from.

The files at the top of :mod:`attacks` are the published methods, one per file (DLG, iDLG,
Inverting Gradients, GIAS, GIDM, GIDM+, ...). What several of them share lives here:

- :mod:`~attacks.components.gradients`: functional gradients of a task (what every
  gradient-matching attack recomputes), the record's target gradient.
- :mod:`~attacks.components.objectives`: matching losses and priors (cosine, L2, TV) as
  pure functions.
- :mod:`~attacks.components.second_order`: a leaner double back-propagation.
- :mod:`~attacks.components.inversion`: the optimisation loop of Inverting Gradients.
- :mod:`~attacks.components.restarts`: successive halving of batched restarts.
- :mod:`~attacks.components.label_recovery`: labels from the last layer's gradient.
- :mod:`~attacks.components.local_optimizers`: the client's optimiser, unrolled.
- :mod:`~attacks.components.ddim_sampler`: a differentiable DDIM sampler.
- :mod:`~attacks.components.diffusion_matching`, :mod:`~attacks.components.diffusion_timesteps`,
  :mod:`~attacks.components.relaxed_diffusion`, :mod:`~attacks.components.noise_solve`:
  gradient matching on diffusion-model updates (GIDM / GIDM+).
- :mod:`~attacks.components.inference`, :mod:`~attacks.components.shadow`: candidates,
  scores and shadow models of the inference attacks (membership, property).

Like the rest of :mod:`attacks`, nothing here imports flwr or ray.
"""
