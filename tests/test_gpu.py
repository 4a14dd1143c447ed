"""GPU tests: the training step in bf16 autocast on CUDA, and CUDA prediction against CPU.

Both run the library's own code, not a copy: `rayvid.train.worker.train_step` (the step
`train_loop_per_worker` runs, with `use_bf16` deciding autocast as the worker does) and
`rayvid.infer.predict.EnsembleScorer` (the in-process scorer of batch prediction) on a
checkpointed run written by `rayvid.train.kfold.write_ensemble`. Skipped where
`torch.cuda.is_available()` is false (CI, the development machine); `bench/gpu_check.sh`
runs them on a GPU host.
"""

import copy

import numpy as np
import pytest
import torch

from rayvid.config import load_config
from rayvid.infer.predict import EnsembleScorer
from rayvid.model.architectures import build_model
from rayvid.model.checkpoints import save_checkpoint
from rayvid.train.config import TrainJobConfig
from rayvid.train.kfold import write_ensemble
from rayvid.train.worker import build_criterion, make_optimizer, model_kwargs, train_step, use_bf16

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs CUDA: torch.cuda.is_available() is False here "
                              "(bench/gpu_check.sh runs these on a GPU host)"),
]

C = 301  # classes, as the 300-id benchmark release (class 0 = other)
BATCH = 512


def test_train_step_bf16_on_cuda():
    """A few M5 steps with rayvid's default config on CUDA: bf16 logits, finite loss,
    weights move, the loss goes down on a fixed batch."""
    cfg = load_config(TrainJobConfig, None, [])
    device = torch.device("cuda")
    assert use_bf16(cfg, device), "the default config trains in bf16 on CUDA"
    torch.manual_seed(0)
    model = build_model("M5", num_classes=C, **model_kwargs(cfg, "M5")).to(device)
    opt = make_optimizer(cfg, model)
    criterion, schedule = build_criterion(cfg)
    criterion.set_weights(schedule.at(0.0))
    before = copy.deepcopy(model.state_dict())
    dtypes = []
    hook = model.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    x = torch.randn(BATCH, 512, device=device) * 5
    y = torch.randint(0, C, (BATCH,), device=device)
    losses = [train_step(model, opt, criterion, x, y, bf16=True) for _ in range(20)]
    hook.remove()
    assert set(dtypes) == {torch.bfloat16}, f"forward ran in {set(dtypes)}, not bf16 autocast"
    values = torch.stack(losses).float().cpu()
    assert losses[0].device.type == "cuda"
    assert torch.isfinite(values).all(), values
    assert values[-1] < values[0], f"loss did not fall on a fixed batch: {values.tolist()}"
    moved = [k for k, v in model.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(moved) >= 6, f"only {moved} changed"  # 3 layers' weights and biases at least


def _run_folder(root, cfg: TrainJobConfig):
    """A run of one random M5 and a prototype head, listed by the trainer's own writer."""
    torch.manual_seed(1)
    m5 = save_checkpoint(root / "folds" / "0" / "M5" / "best", build_model("M5", num_classes=C))
    means = torch.nn.functional.normalize(torch.randn(C, 512), dim=1).numpy()
    proto = save_checkpoint(root / "prototype", build_model("prototype", num_classes=C).set_means(means))
    write_ensemble(cfg, root, [{"best": str(m5), "fold": 0, "arch": "M5", "best_map": 0.0}], C,
                   proto.resolve())
    return root


def test_predict_on_cuda_matches_cpu(tmp_path):
    """The batch-prediction scorer gives the same scores and top classes on CUDA and CPU."""
    cfg = load_config(TrainJobConfig, None, [])
    run = _run_folder(tmp_path.resolve(), cfg)
    rng = np.random.default_rng(0)
    n = 3000  # more than one of the ensemble's forward batches
    batch = {"x": (rng.standard_normal((n, 512)) * 5).astype(np.float32),
             "ok": np.ones(n, bool), "clip": np.array([f"c{i}" for i in range(n)])}
    on_gpu = EnsembleScorer(str(run), 5, 100, use_gpu=True)
    on_cpu = EnsembleScorer(str(run), 5, 100, use_gpu=False)
    assert on_gpu.ensemble.device.type == "cuda" and on_cpu.ensemble.device.type == "cpu"
    assert len(on_gpu.ensemble) == 2
    gpu_scores, cpu_scores = on_gpu.ensemble.scores(batch["x"]), on_cpu.ensemble.scores(batch["x"])
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-4, atol=1e-5)
    gpu, cpu = on_gpu(batch).to_pydict(), on_cpu(batch).to_pydict()
    assert gpu["clip"] == cpu["clip"]
    np.testing.assert_allclose(np.array(gpu["top_scores"]), np.array(cpu["top_scores"]),
                               rtol=1e-4, atol=1e-5)
    top2 = np.sort(cpu_scores, axis=1)[:, -2:]  # top_ids rank every class, 0 included
    clear = np.flatnonzero(top2[:, 1] - top2[:, 0] > 1e-3)  # near-ties may swap on either device
    assert len(clear) > n // 2
    assert [gpu["top_ids"][i][0] for i in clear] == [cpu["top_ids"][i][0] for i in clear]
