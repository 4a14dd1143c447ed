"""rayvid: video person recognition at platform scale on Ray.

The pure core (no Ray, no torch): `pickle_reader` (safe reading of the official pickles),
`fusion` (gate, W(q), qFF, qFDA), `metrics` (the official mAP and submission).
Ray adapters: `data` (Ray Data), `training` (Ray Train), `search` (Ray Tune),
`serving` (Ray Serve). Entry points live in `jobs/`.
"""

__version__ = "0.1.0"
