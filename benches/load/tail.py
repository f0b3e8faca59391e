#!/usr/bin/env python3
"""The tail benchmark: how the policies cope with requests of uneven length. Every request is on
its own connection and blocks its worker (`std::thread::sleep` on a current-thread runtime, or
`Atomics.wait` in Node: a busy worker without CPU use, so many workers fit on a small machine):
95 % for 1 ms and 5 % for 50 ms, arriving open-loop (Poisson) at a fraction of what the workers
can serve. Cells: `cluster` under round robin, least-outstanding and shared sockets, and Node's
cluster under its round robin, in one interleaved run.

    python3 benches/load/tail.py                          # 16 workers, 70 % load, 15 s a cell
    python3 benches/load/tail.py --workers 4 --load 0.85 --seconds 10 --reps 2

It builds what it needs (release), pins the load generator to CPU 1, restarts every server for
every repetition, waits until every worker listens, warms up for 2 s at the same load (untimed),
and prints p50, p99 and p99.9 of each cell (milliseconds, from when a request was due) and the
primary's CPU per connection. With --write it puts them in docs/benchmarks.md, in its own section
(which run.py keeps).
"""
import argparse, json, os, statistics, subprocess, sys, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, TARGET, TAIL_HEADING, cpu_ticks, free_port, launch, replace_section, stop, HZ  # noqa: E402

SERVER = os.path.join(TARGET, "release/tail")
CLIENT = os.path.join(TARGET, "release/openloop")
NODE = os.path.join(ROOT, "benches/node/tail.js")
FAST_MS, SLOW_MS, SLOW_PERCENT = 1, 50, 5


def cells(workers):
    def cluster(policy):
        def start(port, metrics):
            env = dict(os.environ, ADDR=f"127.0.0.1:{port}", CLUSTER_WORKERS=str(workers),
                       CLUSTER_SCHED_POLICY=policy, CLUSTER_METRICS_ADDR=f"127.0.0.1:{metrics}",
                       RUST_LOG="warn")
            return launch([SERVER], env, None)
        return start

    def node(policy):
        def start(port, _metrics):
            env = dict(os.environ, PORT=str(port), WORKERS=str(workers),
                       NODE_CLUSTER_SCHED_POLICY=policy)
            return launch(["node", NODE], env, None)
        return start

    found = [("cluster-rr", cluster("rr"), True), ("cluster-least-outstanding",
             cluster("least-outstanding"), True), ("cluster-shared", cluster("none"), True)]
    if subprocess.run(["which", "node"], capture_output=True).returncode == 0:
        found.append(("node-rr", node("rr"), False))
    return found


def wait_workers(metrics, workers, proc, timeout=60):
    """Until the primary's metrics show every worker listening."""
    deadline = time.monotonic() + timeout
    want = f'cluster_workers{{state="listening"}} {workers}'
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=1) as r:
                if want in r.read().decode():
                    return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit("the workers never all listened")


def load(port, rate, seconds, seed):
    env = dict(os.environ, PORT=str(port), RATE=str(rate), SECONDS=str(seconds), SEED=str(seed),
               SLOW_PERCENT=str(SLOW_PERCENT), SLOW_MS=str(SLOW_MS), FAST_MS=str(FAST_MS))
    out = subprocess.run(["taskset", "-c", "1", CLIENT], env=env, capture_output=True, text=True,
                         timeout=seconds + 90)
    return json.loads(out.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--load", type=float, default=0.7, help="fraction of the workers' capacity")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--only", help="comma-separated cell names")
    p.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    subprocess.run(["cargo", "build", "--release", "-p", "benches", "--bin", "tail", "--bin",
                    "openloop"], cwd=ROOT, check=True)
    mean_ms = (100 - SLOW_PERCENT) / 100 * FAST_MS + SLOW_PERCENT / 100 * SLOW_MS
    rate = args.load * args.workers * 1000 / mean_ms
    chosen = [c for c in cells(args.workers) if not args.only or c[0] in args.only.split(",")]
    print(f"{args.workers} workers, {rate:.0f} connections/s ({args.load:.0%} of "
          f"{args.workers * 1000 / mean_ms:.0f}), {args.seconds:g} s a cell, {args.reps} rep(s)",
          flush=True)
    results = {name: [] for name, _, _ in chosen}
    for rep in range(args.reps):
        for name, start, has_metrics in chosen:
            port, metrics = free_port(), free_port()
            proc = start(port, metrics)
            try:
                if has_metrics:
                    wait_workers(metrics, args.workers, proc)
                else:
                    time.sleep(3)  # Node's workers: no readiness to poll; they start in ~1 s.
                load(port, rate, 2, seed=rep + 1000)
                before = cpu_ticks(proc.pid)
                r = load(port, rate, args.seconds, seed=rep + 1)
                r["primary_us"] = (cpu_ticks(proc.pid) - before) / HZ * 1e6 / max(r["requests"], 1)
            finally:
                stop(proc)
            results[name].append(r)
            print(f"  {name:28} p50 {r['p50']:7.2f}  p99 {r['p99']:7.2f}  p99.9 {r['p999']:7.2f}"
                  f"  max {r['max']:7.2f} ms  {r['requests']} requests, {r['errors']} errors,"
                  f" primary {r['primary_us']:.1f} us/conn", flush=True)
    medians = {name: {k: statistics.median(r[k] for r in rs)
                      for k in ("p50", "p99", "p999", "primary_us", "errors")}
               for name, rs in results.items()}
    if args.reps > 1:
        print("medians:")
        for name, med in medians.items():
            print(f"  {name:28} p50 {med['p50']:7.2f}  p99 {med['p99']:7.2f}  p99.9 {med['p999']:7.2f}"
                  f"  primary {med['primary_us']:.1f} us/conn")
    if args.write:
        write(args, rate, medians, (load_before, os.getloadavg()[0]))


def write(args, rate, medians, loadavg):
    rows = "\n".join(
        f"| {name} | {m['p50']:.1f} | {m['p99']:.1f} | {m['p999']:.1f} | {m['primary_us']:.1f} |"
        f" {m['errors']:.0f} |" for name, m in medians.items())
    rr = medians.get("cluster-rr", {}).get("p99")
    lo = medians.get("cluster-least-outstanding", {}).get("p99")
    ratio = f" Least-outstanding's p99 is {lo / rr:.2f}× round robin's." if rr and lo else ""
    section = f"""
{TAIL_HEADING}

Generated by `python3 benches/load/tail.py --write` ({args.workers} workers, {args.load:.0%} load,
{args.seconds:g} s a cell, {args.reps} repetition(s), medians; {os.cpu_count()} CPUs, whose load average,
other processes included, was {loadavg[0]:.1f} before and {loadavg[1]:.1f} after). Every request is on its own
connection and blocks its worker: {100 - SLOW_PERCENT} % for {FAST_MS} ms, {SLOW_PERCENT} % for {SLOW_MS} ms
(`std::thread::sleep` on the worker's current-thread runtime, `Atomics.wait` in Node), arriving
open-loop (Poisson) at {rate:.0f} connections per second. Latency counts from when a request was due.
The load generator runs on CPU 1, the servers unpinned. Errors are requests not answered within
30 s.{ratio}

| config | p50 ms | p99 ms | p99.9 ms | primary CPU µs/conn | errors |
|---|---|---|---|---|---|
{rows}
"""
    path = os.path.join(ROOT, "docs/benchmarks.md")
    replace_section(path, TAIL_HEADING, section)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
