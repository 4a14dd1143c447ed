"""Benchmark: per-frame voting against qFF (issue 13): mAP, clips/s and model cost, one run.

The 4th place reported qFF (one quality-weighted feature per clip, one forward pass)
about 1% mAP better than per-frame voting (a forward pass per face, the clip's face scores
averaged) and "hundreds of times" cheaper. On one prepared dataset and one trained run:

- Ray: `predict_split(fusion="qff")` then `predict_split(fusion="vote")` of the split on a
  local Ray (read -> scoring actors -> running top-100 -> submission), each with its
  official mAP (val: the release's val_gt.txt, found through the dataset meta) and
  clips/s (the whole prediction, actor start-up included);
- bare: the scoring alone, no Ray, one torch thread (an actor's share), on the same
  batches read and parsed once up front: qFF fusion + forward (`inputs.build` +
  `Ensemble.scores`) vs per-face forward + mean (`rayvid.infer.vote.VotingEnsemble`);
  clips per second of this process's CPU time;
- model cost of the voting (clip-vector) members: forward passes per clip (qFF 1, vote
  the faces per clip) and FLOPs per clip (torch's FlopCounterMode on one forward); the
  other members cost the same in both modes.

    python bench/bench_vote.py --run /work/data/mm1000/runs/M5 \
        --dataset /work/data/mm1000/dataset --out /tmp/bench-vote

Writes OUT/bench_vote.json, OUT/bench_vote.md (the table) and the two submissions.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from _common import ratio_line, ray_env, timed

ray_env()
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from rayvid.core import inputs  # noqa: E402
from rayvid.core.atomic import write_json, write_text  # noqa: E402
from rayvid.data.pipeline import ClipTransform, split_paths  # noqa: E402
from rayvid.infer.predict import predict_split, read_run  # noqa: E402
from rayvid.infer.vote import VOTING_KIND, VotingEnsemble  # noqa: E402
from rayvid.model.ensemble import Ensemble  # noqa: E402


def read_batches(dataset: str, split: str, transform: ClipTransform,
                 batch_size: int, max_clips: int | None) -> list[inputs.ClipParts]:
    """The split's clips as `ClipParts` batches (prediction's rows and columns)."""
    out, n = [], 0
    for path in split_paths(dataset, [split]):
        for rb in pq.ParquetFile(path).iter_batches(batch_size, columns=transform.columns()):
            table = transform.select_rows(pa.Table.from_batches([rb]))
            if max_clips is not None:
                table = table.slice(0, max_clips - n)
            if table.num_rows:
                out.append(transform.parts(table))
                n += table.num_rows
            if max_clips is not None and n >= max_clips:
                return out
    return out


def bare(run: str, batches: list[inputs.ClipParts], spec: inputs.InputSpec) -> dict:
    """Scoring alone, no Ray: qFF + forward vs per-face forward + mean, on one thread."""
    torch.set_num_threads(1)
    ens = Ensemble.from_run(run)
    voting = VotingEnsemble(ens)
    others = [k for k in ens.kinds if k != VOTING_KIND]

    def qff() -> None:
        for parts in batches:
            ens.scores(inputs.build(parts, spec))

    def vote() -> None:  # the other members' inputs only when there are other members
        for parts in batches:
            voting.scores(inputs.build(parts, spec) if others else {}, parts.faces)

    clips = sum(p.n for p in batches)
    t_qff, t_vote = timed(qff, 1, warmup=1), timed(vote, 1)
    return {"clips": clips, "faces": int(sum(int(p.faces.offsets[-1]) for p in batches)),
            "qff_cpu_s": round(t_qff.best_cpu, 2), "vote_cpu_s": round(t_vote.best_cpu, 2),
            "qff_clips_per_s": round(clips / t_qff.best_cpu, 1),
            "vote_clips_per_s": round(clips / t_vote.best_cpu, 1)}


def flops_per_forward(run: str) -> dict[str, int]:
    """FLOPs of one forward pass (one clip vector) of each voting member, by arch."""
    from torch.utils.flop_counter import FlopCounterMode

    ens = Ensemble.from_run(run)
    out = {}
    for i, (m, kind) in enumerate(zip(ens.members, ens.kinds)):
        if kind == VOTING_KIND:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                m(torch.zeros(1, int(m.model_config()["in_dim"])))
            out[f"{i}:{getattr(m, 'arch', type(m).__name__)}"] = int(counter.get_total_flops())
    return out


def predict(args, out: Path, fusion: str) -> dict:
    t0 = time.perf_counter()
    summary = predict_split(args.run, args.dataset, args.split, out / f"submission_{fusion}.txt",
                            batch_size=args.batch_size, num_actors=args.num_actors, fusion=fusion)
    print(f"[bench_vote] {fusion}: {summary['clips']} clips in {time.perf_counter() - t0:.1f} s, "
          f"{summary['clips_per_s']:.0f} clips/s, mAP {_map(summary)}",
          flush=True)
    return summary


def _map(summary: dict) -> str:
    return f"{summary['map']:.4f}" if "map" in summary else "n/a (no gt)"


def table(r: dict) -> str:
    q, v, b, c = r["ray"]["qff"], r["ray"]["vote"], r["bare"], r["cost"]
    passes = b["faces"] / b["clips"]
    gflops = sum(c["flops_per_forward"].values()) / 1e9
    rows = [
        ("", "qFF", "vote", "vote / qFF"),
        ("---", "---:", "---:", "---:"),
        (f"{r['split']} mAP", _map(q), _map(v),
         "n/a" if "map" not in q else f"{v['map'] - q['map']:+.4f} (difference)"),
        (f"clips/s, Ray prediction ({q['num_actors']} actor(s), start-up included)",
         f"{q['clips_per_s']:,.0f}", f"{v['clips_per_s']:,.0f}",
         f"{v['clips_per_s'] / q['clips_per_s']:.4f}"),
        ("clips/s, bare scoring (no Ray, 1 thread, CPU time)", f"{b['qff_clips_per_s']:,.0f}",
         f"{b['vote_clips_per_s']:,.0f}", f"{b['vote_clips_per_s'] / b['qff_clips_per_s']:.4f}"),
        ("forward passes per clip, each voting member", "1", f"{passes:.2f}", f"{passes:.2f}"),
        ("model GFLOPs per clip, voting members", f"{gflops:.4f}", f"{gflops * passes:.4f}",
         f"{passes:.2f}"),
    ]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    members = ", ".join(f"{k} {f / 1e6:.2f} MFLOPs" for k, f in c["flops_per_forward"].items())
    return "\n".join(lines) + (
        f"\n\n{b['clips']:,} clips, {b['faces']:,} faces ({passes:.2f} per clip); run "
        f"`{r['run']}` (members: {r['members']}; voting members, FLOPs per forward: "
        f"{members}).")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="trained run folder (ensemble.json)")
    p.add_argument("--dataset", required=True, help="prepared dataset")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--out", required=True, help="folder for the tables and submissions")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--num-actors", type=int, default=None, help="scoring actors (default: predict's)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray")
    p.add_argument("--bare-clips", type=int, default=None, help="bare timing on the first N clips")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = read_run(args.run)

    import ray

    address = os.environ.get("RAY_ADDRESS") or "local"  # a fresh local Ray unless told
    ray.init(address=address, num_cpus=args.num_cpus if address == "local" else None,
             logging_level="WARNING", log_to_driver=False)
    try:
        ray_rows = {f: predict(args, out, f) for f in ("qff", "vote")}
    finally:
        ray.shutdown()

    input_spec = spec.ensemble.input_spec()
    transform = ClipTransform(mode="qff", weighting=spec.weighting, with_clip=True,
                              kinds=input_spec.kinds, face_set_size=input_spec.face_set_size,
                              modalities=input_spec.modalities, dims=input_spec.dims)
    batches = read_batches(args.dataset, args.split, transform, args.batch_size, args.bare_clips)
    b = bare(args.run, batches, transform.spec)
    result = {"run": args.run, "dataset": args.dataset, "split": args.split,
              "members": [f"{m.arch} x{m.weight:g}" for m in spec.ensemble.members],
              "ray": ray_rows, "bare": b, "cost": {"flops_per_forward": flops_per_forward(args.run)}}
    md = table(result)
    write_json(out / "bench_vote.json", result)
    write_text(out / "bench_vote.md", md + "\n")
    print("\n" + md + "\n")
    q, v = ray_rows["qff"], ray_rows["vote"]
    ratio_line("clips/s, Ray prediction", v["clips_per_s"], q["clips_per_s"], "clips/s",
               names=("vote", "qFF"))
    ratio_line("clips/s, bare scoring (1 thread)", b["vote_clips_per_s"], b["qff_clips_per_s"],
               "clips/s", names=("vote", "qFF"))
    if "map" in q:
        print(f"mAP vote - qFF: {v['map'] - q['map']:+.4f}")
    print(f"{out / 'bench_vote.json'}, {out / 'bench_vote.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
