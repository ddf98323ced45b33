"""The cost of the link: step 3 (PPO, ZeRO-3 actor and critic, hybrid generation, LoRA; fp32 on CPU) across two
hosts, one rank each, against one host with the same world size (2 ranks).

    sudo python benchmarks/multihost_link.py --out multihost_link.json   # root: the hosts are network namespaces

The hosts are tests/helpers/netns.py's: two network namespaces joined by veth pairs on a bridge, so the ranks of
the two-host run talk over a real (virtual) link and the one-host run's over loopback. Both run under `torchrun`
(per node for two hosts), on the built-in model and a reward model made from it. Each layout runs twice, for
`--steps` and for 2 x `--steps` PPO steps: the difference between the two is what the extra steps cost, free of
start-up and of the final save (for bytes; step times come from the steps themselves). A third layout, two hosts
with each link shaped by a `tc` qdisc (`--shaped`, default a token bucket at 1 Gbit/s), stands in for a real
network: a veth pair alone is as fast as the machine's memory. Reported per PPO step:
- the step time: the median of step 3's own per-step wall time (`perf/e2e_s`), each run's first step left out,
- the bytes each rank hands to torch.distributed's collectives (counted in every rank by wrapping them: a
  `sitecustomize` put first on PYTHONPATH),
- for two hosts, the bytes each host sent over its link (its eth0's tx_bytes counter: TCP/IP headers and gloo's
  own algorithm included, the cross-check of the collective count).
Written as JSON (`--out`) and printed as a Markdown table. Noisy on a shared machine: run it on a quiet one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import offline_env, read_metrics, tiny_model_folder, tiny_reward_folder  # noqa: E402
from tests.distributed.test_step3_two_ranks import ARGS as PPO_ARGS  # noqa: E402
from tests.helpers import netns  # noqa: E402
from tests.helpers.multinode import one_host, torchrun  # noqa: E402

# Wraps torch.distributed's collectives in every rank: calls and tensor bytes per collective, written at exit.
COUNTER = '''
import atexit, json, os
if os.environ.get("RANK") is not None and os.environ.get("LINK_COUNT_DIR"):
    import torch.distributed as dist
    counts = {}

    def _size(x):
        if hasattr(x, "numel"):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(_size(t) for t in x)
        return 0

    def _wrap(name):
        real = getattr(dist, name)

        def counted(*args, **kwargs):
            first = args[0] if args else next(iter(kwargs.values()), None)
            # the input of an all-gather / reduce-scatter into a tensor is the second argument
            data = args[1] if name in ("all_gather_into_tensor", "reduce_scatter_tensor") and len(args) > 1 else first
            entry = counts.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += _size(data)
            return real(*args, **kwargs)
        setattr(dist, name, counted)

    for _name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "all_gather",
                  "reduce", "reduce_scatter", "all_to_all_single", "send", "recv", "isend", "irecv"):
        if hasattr(dist, _name):
            _wrap(_name)

    @atexit.register
    def _write():
        path = os.path.join(os.environ["LINK_COUNT_DIR"], "rank%s.json" % os.environ["RANK"])
        with open(path, "w") as f:
            json.dump(counts, f)
'''


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="PPO steps of the short run; the long run has twice as many")
    p.add_argument("--out", default="multihost_link.json", help="JSON report")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--shaped", default="tbf rate 1gbit burst 512kb latency 20ms",
                   help="also run two hosts with `tc qdisc add dev eth0 root <this>` on each host's link ('' to skip): "
                        "a veth pair has no bandwidth limit of its own, a real network has")
    return p.parse_args(argv)


def run_layout(layout: str, steps: int, work: Path, cache: Path, roles: tuple[Path, Path], shaped: str = "") -> dict:
    """One run of `steps` PPO steps on `layout` ("one_host", "two_hosts", or "two_hosts_shaped" with the qdisc
    `shaped` on each link): wall time, collective calls and bytes per rank, link bytes per host, step times."""
    out, counts = work / f"{layout}_{steps}", work / f"{layout}_{steps}_counts"
    counts.mkdir(parents=True)
    (work / "counter").mkdir(exist_ok=True)
    (work / "counter" / "sitecustomize.py").write_text(COUNTER)
    env = offline_env(cache) | {"LINK_COUNT_DIR": str(counts), "PYTHONPATH": f"{work / 'counter'}:{ROOT}"}
    args = ["--actor_model_name_or_path", str(roles[0]), "--critic_model_name_or_path", str(roles[1]), *PPO_ARGS,
            "--eval_prompts", "0", "--save_interval", "0", "--test_stop_step", str(steps), "--output_dir", str(out)]
    with netns.Hosts(2, work / f"hosts_{layout}_{steps}") as hosts:
        if layout == "two_hosts_shaped":
            for h in hosts:
                h.run(["tc", "qdisc", "add", "dev", "eth0", "root", *shaped.split()], check=True)
        tx = [hosts.tx_bytes(h) for h in hosts]
        start = time.monotonic()
        if layout.startswith("two_hosts"):
            nodes = torchrun(hosts, "step3_rlhf/main.py", args, env, work / f"logs_{layout}_{steps}")
        else:
            nodes = [one_host(hosts, "step3_rlhf/main.py", args, env, work / f"logs_{layout}_{steps}")]
        wall = time.monotonic() - start
        sent = [hosts.tx_bytes(h) - before for h, before in zip(hosts, tx, strict=True)]
    if layout == "one_host":
        sent = None
    for node in nodes:
        if node.returncode != 0:
            raise SystemExit(f"{layout}: {node.host} failed ({node.returncode}):\n{node.output[-3000:]}")
    ranks = {p.stem: json.loads(p.read_text()) for p in sorted(counts.glob("rank*.json"))}
    step_times = [r["perf/e2e_s"] for r in read_metrics(out) if "perf/e2e_s" in r]
    return {"wall_s": wall, "collective_bytes": {k: sum(b for _, b in v.values()) for k, v in ranks.items()},
            "collective_calls": {k: sum(c for c, _ in v.values()) for k, v in ranks.items()},
            "by_collective_rank0": ranks.get("rank0", {}), "link_tx_bytes": sent, "step_time_s": step_times}


def per_step(short: dict, long: dict, steps: int) -> dict:
    """What the extra `steps` steps of the long run cost, per step."""
    def diff(key):
        return {k: (long[key][k] - short[key][k]) / steps for k in long[key]}

    # Step time: step 3's own per-step wall time (perf/e2e_s), the first step of each run left out (warm-up);
    # the difference of the runs' wall times is dominated by the variance of start-up on a shared machine.
    times = short["step_time_s"][1:] + long["step_time_s"][1:]
    by_op = {op: [(long["by_collective_rank0"][op][i] - short["by_collective_rank0"].get(op, [0, 0])[i]) / steps
                  for i in (0, 1)] for op in long["by_collective_rank0"]}
    row = {"step_time_s": statistics.median(times), "step_times_s": times,
           "collective_bytes_per_rank": diff("collective_bytes"), "collective_calls_per_rank": diff("collective_calls"),
           "rank0_calls_and_bytes_by_collective": by_op}
    if long["link_tx_bytes"] is not None:
        row["link_tx_bytes_per_host"] = [(b - a) / steps for a, b in zip(short["link_tx_bytes"], long["link_tx_bytes"],
                                                                       strict=True)]
    return row


def markdown(report: dict) -> str:
    two, one = report["two_hosts"], report["one_host"]
    mib = 2 ** 20
    lines = ["| per PPO step | one host, 2 ranks | two hosts, 1 rank each |", "|---|---|---|",
             f"| step time (median of perf/e2e_s) | {one['step_time_s']:.2f} s | {two['step_time_s']:.2f} s "
             f"(x{report['step_time_ratio']:.2f}) |",
             "| collective bytes per rank (rank0, rank1) | "
             + ", ".join(f"{v / mib:.2f} MiB" for v in one["collective_bytes_per_rank"].values()) + " | "
             + ", ".join(f"{v / mib:.2f} MiB" for v in two["collective_bytes_per_rank"].values()) + " |",
             "| collective calls per rank | " + ", ".join(f"{v:.0f}" for v in one["collective_calls_per_rank"].values())
             + " | " + ", ".join(f"{v:.0f}" for v in two["collective_calls_per_rank"].values()) + " |",
             "| bytes sent over the link per host (eth0 tx) | - | "
             + ", ".join(f"{v / mib:.2f} MiB" for v in two["link_tx_bytes_per_host"]) + " |"]
    if "two_hosts_shaped" in report:
        lines.append(f"| step time, two hosts with `tc qdisc ... {report['shaped']}` on each link | | "
                     f"{report['two_hosts_shaped']['step_time_s']:.2f} s (x{report['shaped_step_time_ratio']:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    reason = netns.unavailable()
    if reason:
        raise SystemExit(f"cannot make hosts here: {reason}")
    work = Path(args.work or tempfile.mkdtemp(prefix="multihost_link_"))
    cache = work / "engine_cache"
    roles = (tiny_model_folder(cache), tiny_reward_folder(cache, work / "tiny_rm"))
    report: dict = {"steps": [args.steps, 2 * args.steps], "ppo_args": PPO_ARGS, "date": time.strftime("%Y-%m-%d"),
                    "python": sys.version.split()[0], "versions": versions(), "cpus": os.cpu_count()}
    runs = {}
    layouts = ("one_host", "two_hosts") + (("two_hosts_shaped",) if args.shaped else ())
    for steps in (args.steps, 2 * args.steps):  # interleaved: a change in the machine's load hits every layout
        for layout in layouts:
            runs[layout, steps] = run_layout(layout, steps, work, cache, roles, args.shaped)
    for layout in layouts:
        report[layout] = per_step(runs[layout, args.steps], runs[layout, 2 * args.steps], args.steps)
        report[layout]["runs"] = {str(s): runs[layout, s] for s in (args.steps, 2 * args.steps)}
    report["step_time_ratio"] = report["two_hosts"]["step_time_s"] / report["one_host"]["step_time_s"]
    if args.shaped:
        report["shaped"] = args.shaped
        report["shaped_step_time_ratio"] = report["two_hosts_shaped"]["step_time_s"] / report["one_host"]["step_time_s"]
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))


def versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    main()
