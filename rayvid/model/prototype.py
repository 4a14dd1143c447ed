"""The prototype (nearest class mean) head, as a registered, checkpointable model.

With ~6 training clips per identity a cosine nearest-class-mean classifier over qFF
features is strong without any training (the "no-training qFF class-mean baseline").
rayvid uses it twice: alone, as the baseline every run reports, and as one member of the
ensemble beside the MLPs (`model.prototype_weight`), which the issue allows and the small
data asks for: the MLPs add learned decision boundaries (noise, look-alikes), the
prototypes keep few-shot identities ranked. Its "training" is one streaming pass that sums
unit clip features per identity (`rayvid.train.baseline.class_means`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rayvid.model.registry import NUM_CLASSES, RayvidModel, register_model


@register_model("prototype")
class PrototypeHead(RayvidModel):
    """`(B, in_dim)` fused clip features -> `scale * cos(x, mean_c) + bias`, `(B, C)`.

    `means`: (C, in_dim) unit class means, a buffer (saved in model.pt, no gradient).
    Under the ensemble's sigmoid, cos = -bias/scale maps to 0.5.
    """

    def __init__(self, in_dim: int = 512, num_classes: int = NUM_CLASSES, scale: float = 10.0,
                 bias: float = -5.0) -> None:
        super().__init__("prototype", in_dim=in_dim, num_classes=num_classes, scale=scale,
                         bias=bias)
        self.scale, self.bias = float(scale), float(bias)
        self.register_buffer("means", torch.zeros(num_classes, in_dim))

    def set_means(self, means: np.ndarray) -> "PrototypeHead":
        """means: (C, in_dim) float, rows normalised here (zero rows stay zero)."""
        self.means.copy_(F.normalize(torch.as_tensor(means, dtype=torch.float32), dim=1))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x.float(), dim=1) @ self.means.T + self.bias
