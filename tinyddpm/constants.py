"""Names and limits that several modules share, defined once here. This module imports nothing from tinyddpm, so
every other module may import it (imports in tinyddpm point one way: towards this file and errors.py)."""

MODEL_KINDS = ("ddpm", "dcgan")  # what a run trains and a checkpoint holds
COND_KINDS = ("none", "class", "multilabel")  # what a model is conditioned on: nothing, a class, a set of labels
SAMPLERS = ("ddim", "ddpm", "dpmpp-2m", "dpmpp-2m-sde", "heun")  # tinyddpm/samplers.py
SPACINGS = ("uniform", "karras")  # the solvers' noise levels: evenly spaced in t, or Karras et al.'s σ spacing

# Far beyond any memory: a typo (an extra zero or six) gets one line instead of an out-of-memory traceback.
MAX_BATCH = 65_536
MAX_SEED = 2**63 - 1  # image i's seed, --seed + i, is an int64 (checks.check_values' rule for every int)
GRID_IMAGES = 64  # images in a written sample grid (8 × 8): the first ones, however many were made
