"""rayvid's release simulator: the official iQIYI-VID-2019 layout from a generative model.

`simulate_release(out_dir, ids, seed, **params)` writes the files; `build_world`,
`clip_latent` and `iter_clips` expose the ground truth behind them (who is in each clip,
which faces are false detections) for tests. The model is documented in
docs/simulator.md; its constants are `SimParams`. Run it with `jobs/simulate.py`.
"""

from rayvid.release.simulator.latent import clip_latent
from rayvid.release.simulator.params import GENERATOR_VERSION, MODALITIES, SPLITS, SimParams
from rayvid.release.simulator.release import clip_name, iter_clips, pickle_name, simulate_release
from rayvid.release.simulator.world import World, build_world

__all__ = ["GENERATOR_VERSION", "MODALITIES", "SPLITS", "SimParams", "World", "build_world",
           "clip_latent", "clip_name", "iter_clips", "pickle_name", "simulate_release"]
