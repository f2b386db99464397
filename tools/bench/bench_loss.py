"""Peak memory and time of forward+backward: fused chunked weighted CE vs the naive path, on the CPU.

    python tools/bench/bench_loss.py [--tokens 4096] [--hidden 1024] [--vocab 32000 128256] [--repeats 2]

naive = full fp32 logits ``hidden @ Wᵀ`` + ``F.cross_entropy(reduction='none') · w``, summed, autograd.
fused = ``witscale.parallel.cross_entropy.fused_weighted_cross_entropy`` (default chunk_size; the logits
block's default CPU budget, 128 MiB, or ``WITSCALE_LOSS_BLOCK_MIB`` if set: the chunk column shows the rows).
capped = fused with Gemma-2's final-logit soft-capping (``--softcap``, default 30; 0 skips it): the cap
costs a tanh, a second logits block and a multiply per chunk, and halves the automatic chunk.
Both: fp32, T tokens with random targets (5% ignored, 30% weight 0), gradients wrt hidden and W.

Each (vocab, method) runs in a fresh subprocess, so one case's allocator state cannot flatter another.
Memory, measured honestly from the OS side: the child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc
then serves every large tensor by mmap and returns it to the OS on free, so the resident set follows the
live tensors instead of a heap high-water mark). After one warm-up step the inputs exist and the grads
are reset to None; the peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5) and the step runs; the
figure is ``VmHWM − VmRSS_before`` minus the bytes of the gradients every implementation must return
(W.grad [V, H] and hidden.grad [T, H], fp32), i.e. the working memory of the loss beyond inputs and
parameter/input grads. Time: the best of ``--repeats`` timed steps after the warm-up, over ``--rounds``
rounds that alternate naive and fused children, with ``--threads`` threads (default 1). Both the process CPU
time and the wall time are reported; the ratio uses CPU time: on a shared machine (other jobs running) wall
time of either path varies by 2-4x from run to run, while the CPU time of a single-threaded run stays put.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _case(method: str, tokens: int, hidden: int, vocab: int, repeats: int, softcap: float) -> dict:
    sys.path.insert(0, ROOT)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from witscale.parallel.cross_entropy import chunk_rows, fused_weighted_cross_entropy

    torch.manual_seed(0)
    h = (torch.randn(tokens, hidden) * 0.5).requires_grad_()
    w_lm = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    targets[torch.rand(tokens) < 0.05] = -100
    weights = torch.rand(tokens)
    weights[torch.rand(tokens) < 0.3] = 0.0

    def step():
        if method == "naive":
            logits = (h @ w_lm.t()).float()
            loss = (F.cross_entropy(logits, targets, reduction="none") * weights).sum()
        else:
            cap = softcap if method == "capped" else None
            loss = fused_weighted_cross_entropy(h, w_lm, targets, weights, logit_softcap=cap).weighted_sum
        loss.backward()
        return float(loss)

    step()                                            # warm-up (allocator, oneDNN/MKL buffers)
    h.grad = w_lm.grad = None
    with open("/proc/self/clear_refs", "w") as f:    # reset VmHWM to the current RSS
        f.write("5")
    before = _status("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    times, cpu = [time.perf_counter() - t0], [time.process_time() - c0]
    peak = _status("VmHWM") - before
    grads = (h.numel() + w_lm.numel()) * 4
    for _ in range(repeats - 1):
        h.grad = w_lm.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"method": method, "vocab": vocab, "loss": loss, "time_s": min(times), "cpu_s": min(cpu),
            "peak_bytes": peak, "extra_bytes": peak - grads,
            "chunk": tokens if method == "naive" else chunk_rows(tokens, vocab, 4096, device=h.device,
                                                                 blocks=2 if method == "capped" else 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--softcap", type=float, default=30.0, help="final-logit cap of the 'capped' case (0: skip it)")
    ap.add_argument("--_child", nargs=2, metavar=("METHOD", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        out = _case(args._child[0], args.tokens, args.hidden, int(args._child[1]), args.repeats, args.softcap)
        print("RESULT " + json.dumps(out))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    env["OMP_NUM_THREADS"] = str(args.threads)
    mib = 2 ** 20
    print(f"T={args.tokens} H={args.hidden}, fp32, forward+backward, {args.threads} threads, "
          f"best of {args.repeats} steps x {args.rounds} rounds")
    methods = ("naive", "fused", "capped") if args.softcap > 0 else ("naive", "fused")
    for vocab in args.vocab:
        res = {}
        for rnd in range(args.rounds):
            for method in methods:
                cmd = [sys.executable, os.path.abspath(__file__), "--tokens", str(args.tokens), "--hidden",
                       str(args.hidden), "--repeats", str(args.repeats), "--softcap", str(args.softcap),
                       "--_child", method, str(vocab)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                r = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
                if method in res:      # memory from the first round; time: the best over all rounds
                    res[method]["time_s"] = min(res[method]["time_s"], r["time_s"])
                    res[method]["cpu_s"] = min(res[method]["cpu_s"], r["cpu_s"])
                else:
                    res[method] = r
        for method in methods:
            r = res[method]
            print(f"  V={vocab:>6} {method:>6}: cpu {r['cpu_s']:7.2f} s, wall {r['time_s']:7.2f} s, extra peak {r['extra_bytes'] / mib:8.1f} MiB "
                  f"(raw peak {r['peak_bytes'] / mib:8.1f} MiB, chunk {r['chunk']}, loss {r['loss']:.4f})")
        n, f = res["naive"], res["fused"]
        print(f"  V={vocab:>6} fused/naive: cpu time {f['cpu_s'] / n['cpu_s']:.3f}x "
              f"(wall {f['time_s'] / n['time_s']:.3f}x), "
              f"extra memory {f['extra_bytes'] / n['extra_bytes']:.4f}x, "
              f"loss rel. diff {abs(f['loss'] - n['loss']) / abs(n['loss']):.1e}")
        if "capped" in res:
            c = res["capped"]
            print(f"  V={vocab:>6} capped/fused: cpu time {c['cpu_s'] / f['cpu_s']:.3f}x "
                  f"(wall {c['time_s'] / f['time_s']:.3f}x), extra memory {c['extra_bytes'] / f['extra_bytes']:.3f}x, "
                  f"throughput {args.tokens / c['cpu_s']:,.0f} vs {args.tokens / f['cpu_s']:,.0f} tokens/cpu-s")


if __name__ == "__main__":
    main()
