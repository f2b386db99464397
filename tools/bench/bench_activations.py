"""The planner's activation estimate against the measured peak of one forward + backward, on the CPU.

    python tools/bench/bench_activations.py [--hidden 256 --layers 4 --intermediate 688 --heads 4 --kv-heads 2
                                             --vocab 1024 --rows 2 --seq-len 512]

How it is measured (witscale/memory_probe.py): the real witscale CausalLM runs one forward + backward under
a TorchDispatchMode that adds up the bytes of every storage an op allocates until it is freed (what
torch.cuda.max_memory_allocated reports above the parameters on a GPU), parameter gradients dropped as
accumulated (the planner counts them on their own), attention through torch's CPU flash kernel over
one-document rows (it saves what varlen/flash attention saves on a GPU). The estimate is
``planner.activation_memory`` for the same shape, tokens and element size (fp32: 4 bytes, bf16: 2).

The second table measures the long-row options (witscale/model/memory.py), fp32, for a planner term to be
checked against: for each --activation-checkpointing off/on/offload and --tiled-mlp 1/4, the device peak,
the bytes still held when forward returns ("held"), their part per decoder block (a model with one more
layer, minus), and the host bytes offload copied out. The third: the peak of bytes autograd saves for one
block's MLP forward + backward (saved-tensor hooks) per tile count.
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
    memory_options(cfg_dict, ids, labels, weights)
    return 0


def memory_options(cfg_dict: dict, ids, labels, weights) -> None:
    import torch

    from witscale.memory_probe import SavedTensorBytes, measure_activation_peak
    from witscale.model import CausalLM, ModelConfig, init_weights
    from witscale.model.memory import tiled_mlp

    def measured(mode, tiles, layers):
        model = CausalLM(ModelConfig.from_dict(dict(cfg_dict, num_hidden_layers=layers)),
                         activation_checkpointing=mode, tiled_mlp=tiles)
        init_weights(model, seed=0)
        return measure_activation_peak(model, ids, labels, weights)

    layers, mib, kib = cfg_dict["num_hidden_layers"], 2 ** 20, 2 ** 10
    print(f"\nfp32, {layers} layers: {'checkpointing':14} {'tiled-mlp':>9} {'peak MiB':>9} {'held MiB':>9} "
          f"{'held/block KiB':>15} {'host MiB':>9}")
    for mode in ("off", "on", "offload"):
        for tiles in (1, 4):
            m, one_more = measured(mode, tiles, layers), measured(mode, tiles, layers + 1)
            per_block = one_more["held_after_forward"] - m["held_after_forward"]
            print(f"{'':20} {mode:14} {tiles:9} {m['peak'] / mib:9.2f} {m['held_after_forward'] / mib:9.2f} "
                  f"{per_block / kib:15.1f} {m['host_bytes'] / mib:9.2f}    bytes: peak {m['peak']} held "
                  f"{m['held_after_forward']} per block {per_block} host {m['host_bytes']}")
    model = CausalLM(ModelConfig.from_dict(cfg_dict))
    init_weights(model, seed=0)
    mlp = model.model.layers[0].mlp
    x = torch.randn(*ids.shape, cfg_dict["hidden_size"], requires_grad=True)
    print("\none block's MLP, bytes saved for backward at their peak (weights, input and output included):")
    for tiles in (1, 2, 4, 8, 16):
        with SavedTensorBytes() as saved:
            tiled_mlp(mlp, x, tiles).square().sum().backward()
        print(f"  --tiled-mlp {tiles:2}: {saved.peak} bytes ({saved.peak / mib:.2f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
