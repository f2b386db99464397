"""Shared pieces for the training tests: an in-memory packed dataset and rank workers.

``InMemoryPacked`` has the read interface of ``witscale.data.format.PackedDataset`` (tokens, classes,
weights, doc_lengths, seq_len, manifest) over numpy arrays the test controls exactly; the trainer,
DeepSpeed and the process groups under test are all real.
"""
from __future__ import annotations

import numpy as np

from witscale.data.classes import TokenClass

TINY = dict(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.1)


class InMemoryPacked:
    def __init__(self, tokens, classes, doc_lengths, weights=None):
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.classes = np.asarray(classes, dtype=np.uint8)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float32)
        self._docs = [np.asarray(d, dtype=np.int32) for d in doc_lengths]
        self.seq_len = self.tokens.shape[1]
        self.manifest = {"tokenizer": {"vocab_size": int(self.tokens.max()) + 1}, "seq_len": self.seq_len,
                         "num_rows": len(self._docs)}

    def __len__(self):
        return self.tokens.shape[0]

    def doc_lengths(self, i):
        return self._docs[i]


def tiny_llama_config(tok, seq_len: int) -> dict:
    """A 2-layer Llama config.json matching a test tokenizer (vocabulary and BOS/EOS), for CLI runs."""
    return {"model_type": "llama", "vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": seq_len, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}


def random_packed(n_rows: int, seq_len: int, vocab: int, seed: int, with_weights: bool = False) -> InMemoryPacked:
    """Rows of 1-4 documents, each [TEMPLATE, PROMPT…, RESPONSE…, EOT], padded at the end."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n_rows, seq_len), dtype=np.int32)
    classes = np.zeros((n_rows, seq_len), dtype=np.uint8)
    weights = np.ones((n_rows, seq_len), dtype=np.float32) if with_weights else None
    docs = []
    for r in range(n_rows):
        pos, lens = 0, []
        for _ in range(rng.integers(1, 5)):
            length = int(rng.integers(4, seq_len // 2))
            if pos + length > seq_len:
                break
            n_prompt = int(rng.integers(1, length - 2))
            tokens[r, pos:pos + length] = rng.integers(3, vocab, size=length)
            cls = [TokenClass.TEMPLATE] + [TokenClass.PROMPT] * n_prompt
            cls += [TokenClass.RESPONSE] * (length - 2 - n_prompt) + [TokenClass.EOT]
            classes[r, pos:pos + length] = cls
            if with_weights:
                weights[r, pos:pos + length] = rng.choice([0.0, 0.5, 1.0, 2.0])
            lens.append(length)
            pos += length
        docs.append(lens)
    return InMemoryPacked(tokens, classes, docs, weights)


def ds_config(stage: int, micro: int, accum: int, dp: int, clip: float = 0.0) -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * dp, "gradient_clipping": clip, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": False}, "steps_per_print": 10 ** 9}


def probe(module, loader, topo):
    """Logits, loss statistics and dense gradients of one micro-batch at the current weights (no ZeRO-3)."""
    from witscale.parallel.layers import gather_dense

    from witscale.training.trainer import sequence_shard_micro_batch

    mb = sequence_shard_micro_batch(loader.make_micro_batch(loader.global_batch_rows(0, 0)[:2]), topo)
    group = topo.tp_group_or_none()
    with __import__("torch").no_grad():
        logits = module.compute_logits(module(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen))
    stats = module(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.labels, mb.weights,
                   mb.target_classes)
    module.zero_grad()
    stats.weighted_sum.backward()
    vocab = module.config.vocab_size
    if topo.sp > 1:        # each sp rank holds its shard's part of every gradient (DeepSpeed sums them)
        for p in module.parameters():
            __import__("torch").distributed.all_reduce(p.grad, group=topo.sp_group)
    grads = {n: gather_dense(p, p.grad, group, vocab if getattr(p, "padded_dense_rows", None) else None).numpy()
             for n, p in module.named_parameters()}
    module.zero_grad()
    return {"logits": logits.numpy(), "loss_sum": float(stats.weighted_sum), "grads": grads,
            "class_nll": stats.class_nll_sum.numpy()}


def train_worker(rank, world, *, tp=1, sp=1, do_probe=False, stage=0, micro=1, accum=1, steps=1, normalization="nonzero", lp=0.2, lr_w=1.0,
                 lr=1e-3, clip=0.0, eps=1e-8, seed=0, rows=8, seq_len=48, with_weights=False, model=None, data_seed=1,
                 shard_loader=False, evaluate=False, tp_sequence_parallel=False, activation_checkpointing=False):
    """Train ``steps`` optimizer steps on a world of ``world`` data-parallel ranks; return losses and params.
    ``shard_loader``: under sp, each rank's loader reads only its part of the rows (what train.py runs);
    ``evaluate``: then one evaluation over the whole data set."""
    import torch

    from witscale.data.loader import PackedLoader
    from witscale.data.weighting import build_weight_table
    from witscale.model import ModelConfig
    from witscale.training.build import build_module
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.trainer import Trainer

    from witscale.training.distributed import init_distributed
    init_distributed()
    cfg = ModelConfig.from_dict(dict(TINY, **(model or {})))
    dims = ParallelDims(world, tp, 1, stage, cfg, sp=sp)
    topo = Topology(dims)
    config = ds_config(stage, micro, accum, topo.dp, clip)
    torch.manual_seed(seed)
    module = build_module(cfg, topo, config, model_dir=None, seed=seed, tp_sequence_parallel=tp_sequence_parallel,
                          activation_checkpointing=activation_checkpointing)
    data = random_packed(rows, seq_len, cfg.vocab_size, data_seed, with_weights)
    loader = PackedLoader(data, build_weight_table(lp, lr_w), micro_batch_size=micro, grad_accum=accum,
                          dp_size=topo.dp, dp_rank=topo.dp_rank, seed=seed,
                          **(dict(sp_size=topo.sp, sp_rank=topo.sp_rank) if shard_loader else {}))
    probed = probe(module, loader, topo) if do_probe else None
    trainer = Trainer(module=module, ds_config=config, loader=loader, topo=topo, normalization=normalization,
                      lr=lr, weight_decay=0.0, betas=(0.9, 0.999), eps=eps, total_steps=steps, warmup_ratio=0.0)
    results = [trainer.train_step(loader.next_step()) for _ in range(steps)]
    params = trainer.full_dense_state_dict()
    evaluation = None
    if evaluate:                 # the whole data set as the evaluation set, read as the training loader reads it
        evaluation = trainer.evaluate(PackedLoader(data, build_weight_table(lp, lr_w), micro_batch_size=micro,
                                                   grad_accum=1, shuffle=False,
                                                   **(dict(sp_size=topo.sp, sp_rank=topo.sp_rank)
                                                      if shard_loader else {})))
    return {"losses": [r.loss for r in results], "results": [r.as_dict() for r in results],
            "params": {k: v.numpy() for k, v in params.items()}, "probe": probed, "eval": evaluation}
