"""In-process check of the output-bias / lr finding: M5 trained with qFDA on the whole train split of a
   prepared dataset, val mAP of the MLP alone and + prototype head, beside the class-mean
   baseline scored in the same run. Arguments: DATASET then key=value (steps, lr, prior=0|1,
   norm, loss=staged|ce|focal|mix, arch, sched).

    python bench/bias_init.py DS steps=300                 # 4th-place init: zero bias, lr 1.5e-4
    python bench/bias_init.py DS steps=300 lr=1e-3 prior=1 # rayvid default
"""
import os, sys, time, numpy as np, torch, pyarrow.parquet as pq, glob
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rayvid.core import fusion
from rayvid.release import schema
from rayvid.model.architectures import build_model
from rayvid.model.losses import MixedLoss, LossSchedule
from rayvid.model.schedules import LRSchedule, apply
from rayvid.core.metrics import map_from_scores
from rayvid.train.baseline import _unit
torch.set_num_threads(1)
kw = dict(a.split("=") for a in sys.argv[2:])
ds = sys.argv[1]; steps = int(kw.get("steps", 300)); lr = float(kw.get("lr", 1.5e-4))
norm = float(kw.get("norm", 0)); loss = kw.get("loss", "staged"); prior = kw.get("prior", "0") == "1"
arch = kw.get("arch", "M5"); sched = kw.get("sched", "step"); wd = float(kw.get("wd", 0))
def load(split):
    t = pq.read_table(glob.glob(f"{ds}/{split}/*.parquet"))
    fa = schema.face_arrays(t)
    y = t.column("label").to_numpy(zero_copy_only=False)
    return fa, np.nan_to_num(y.astype(float), nan=-1).astype(np.int64)
(tr, ytr), (va, yva) = load("train"), load("val")
C = int(max(ytr.max(), yva.max())) + 1
keep = fusion.gate_mask(tr.det, tr.quality)
off = fusion.compress(keep, tr.offsets); f, d, q = tr.feat[keep], tr.det[keep], tr.quality[keep]
alive = np.diff(off) > 0
faces = np.repeat(alive, np.diff(off)); f, d, q = f[faces], d[faces], q[faces]; off = fusion.offsets_from_counts(np.diff(off)[alive]); ytr_g = ytr[alive]
xva, ok = fusion.qff(va.feat, va.det, va.quality, va.offsets)
xtr_q, _ = fusion.qff(tr.feat, tr.det, tr.quality, tr.offsets)
sums = np.zeros((C, 512)); np.add.at(sums, ytr, _unit(xtr_q)); sums[0] = 0; means = _unit(sums)
proto = _unit(xva) @ means.T
gt = np.maximum(yva, 0)
print(f"train {len(ytr_g)} C {C} val {len(yva)} | baseline {map_from_scores(proto, gt):.4f}", flush=True)
torch.manual_seed(0)
model = build_model(arch, num_classes=C)
if prior:
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.constant_(last.bias, -np.log(C - 1))
opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
stages = {"staged": [(0.0, {"ce": .25, "focal": .75}), (24/150, {"focal": 1.0}), (99/150, {"ce": .02, "focal": .98})],
          "ce": [(0.0, {"ce": 1.0})], "focal": [(0.0, {"focal": 1.0})],
          "mix": [(0.0, {"ce": .5, "focal": .5})]}[loss]
ls = LossSchedule(stages); crit = MixedLoss({n: 1.0 for n in ls.names})
lrs = LRSchedule(base_lr=lr, kind=sched, warmup_fraction=9/150, warmup_lr=2e-5, warmup="linear", step_fraction=50/150, min_lr=1e-6)
rng = np.random.default_rng(0)
def prep(x):
    x = torch.from_numpy(x)
    return torch.nn.functional.normalize(x, dim=1) * norm if norm else x
t0 = time.time(); B = 512
for step in range(steps):
    apply(opt, lrs.lr_at(step, steps)); crit.set_weights(ls.at(step / steps))
    idx = rng.integers(0, len(ytr_g), B)
    sub = np.concatenate([[0], np.cumsum(np.diff(off)[idx])])
    fi = np.concatenate([np.arange(off[i], off[i+1]) for i in idx])
    x = fusion.qfda(f[fi], d[fi], q[fi], sub, rng)
    model.train(); l = crit(model(prep(x)), torch.from_numpy(ytr_g[idx]))
    opt.zero_grad(); l.backward(); opt.step()
    if (step + 1) % max(1, steps // 4) == 0:
        model.eval()
        with torch.no_grad(): s = torch.sigmoid(model(prep(xva))).numpy()
        ps = torch.sigmoid(torch.from_numpy(10 * proto - 5)).numpy()
        print(f"step {step+1} loss {l.item():.4f} mlp {map_from_scores(s, gt):.4f} +proto {map_from_scores(s + ps, gt):.4f} "
              f"rank-avg {map_from_scores(s/ s.max(0, keepdims=True) + proto, gt):.4f} {time.time()-t0:.0f}s", flush=True)
