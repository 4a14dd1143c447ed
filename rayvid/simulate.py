"""rayvid.simulate: the release simulator's public entry point (see `rayvid.simulator`).

    from rayvid.simulate import simulate_release
    simulate_release("data/sim", ids=20, seed=0, faces_per_clip=5)
"""

from rayvid.simulator import (GENERATOR_VERSION, SimParams, build_world, clip_latent,
                              iter_clips, simulate_release)

__all__ = ["GENERATOR_VERSION", "SimParams", "build_world", "clip_latent", "iter_clips",
           "simulate_release"]
