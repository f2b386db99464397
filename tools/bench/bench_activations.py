"""The planner's activation estimate against the measured peak of one forward + backward, on the CPU.

    python tools/bench/bench_activations.py [--hidden 256 --layers 4 --intermediate 688 --heads 4 --kv-heads 2
                                             --vocab 1024 --rows 2 --seq-len 512]

How it is measured (witscale/memory_probe.py): the real witscale CausalLM runs one forward + backward under
a TorchDispatchMode that adds up the bytes of every storage an op allocates until it is freed (what
torch.cuda.max_memory_allocated reports above the parameters on a GPU), parameter gradients dropped as
accumulated (the planner counts them on their own), attention through torch's CPU flash kernel over
one-document rows (it saves what varlen/flash attention saves on a GPU). The estimate is
``planner.activation_memory`` for the same shape, tokens and element size (fp32: 4 bytes, bf16: 2).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("hidden", 256), ("layers", 4), ("intermediate", 688), ("heads", 4), ("kv-heads", 2),
                          ("vocab", 1024), ("rows", 2), ("seq-len", 512)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args(argv)

    import torch

    from witscale import planner
    from witscale.memory_probe import measure_activation_peak
    from witscale.model import CausalLM, ModelConfig, init_weights

    torch.set_num_threads(1)
    cfg_dict = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                    intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                    max_position_embeddings=args.seq_len)
    cfg = ModelConfig.from_dict(cfg_dict)
    shape = planner.ModelShape.from_config(cfg_dict)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.rows, args.seq_len), generator=g)
    labels = torch.randint(0, args.vocab, (args.rows, args.seq_len), generator=g)
    weights = torch.ones(args.rows, args.seq_len)
    tokens = args.rows * args.seq_len
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, intermediate "
          f"{args.intermediate}, vocab {args.vocab}; {args.rows} rows × {args.seq_len} tokens")
    print(f"{'dtype':6} {'checkpointing':14} {'measured MiB':>13} {'estimate MiB':>13} {'est/meas':>9}")
    mib = 2 ** 20
    for dtype in (torch.float32, torch.bfloat16):
        for ac in (False, True):
            model = CausalLM(cfg, activation_checkpointing=ac)
            init_weights(model, seed=0)
            model.to(dtype)
            measured = measure_activation_peak(model, ids, labels, weights)["peak"]
            est = planner.activation_memory(shape, tokens=tokens, element_size=torch.finfo(dtype).bits // 8,
                                            activation_checkpointing=ac).peak
            print(f"{str(dtype).split('.')[-1]:6} {'on' if ac else 'off':14} {measured / mib:13.2f} {est / mib:13.2f} "
                  f"{est / measured:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
