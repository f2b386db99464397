"""The shape of a decoder: parameter counts and training FLOPs, from an HF config (dict or ModelConfig).

Used by the trainer (MFU), the memory planner (witscale/planner.py) and the GPU benchmark; tested against
transformers' parameter counts and measured ZeRO partitions (tests/test_planner.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False
    head_dim: int = 0
    attention_bias: bool = False

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        model_type = get("model_type", "llama")
        return cls(vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                   intermediate_size=get("intermediate_size"), num_hidden_layers=get("num_hidden_layers"),
                   num_attention_heads=get("num_attention_heads"),
                   num_key_value_heads=get("num_key_value_heads") or get("num_attention_heads"),
                   tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                   head_dim=get("head_dim") or 0,
                   attention_bias=bool(get("attention_bias", model_type == "qwen2")))

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def layer_params(self) -> tuple[int, int]:
        """(parameters sharded by tp, replicated parameters) of one decoder layer."""
        h, hd = self.hidden_size, self.hd
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        sharded = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size
        if self.attention_bias:
            sharded += q + 2 * kv
        return sharded, 2 * h

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        sharded, replicated = self.layer_params()
        heads = 1 if self.tie_word_embeddings else 2
        return self.num_hidden_layers * (sharded + replicated) + heads * self.embedding_params() + self.hidden_size

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: every projection and the LM head (tied or not);
        the embedding lookup is no matmul."""
        return self.num_hidden_layers * self.layer_params()[0] + self.embedding_params()

    def training_flops(self, tokens: float, sum_sq_doc_lengths: float) -> float:
        """Model FLOPs of forward + backward over packed documents: 6·N_matmul per token, plus causal
        attention's 6·n_layers·d_attn·L² per document of length L (QKᵀ and P·V each L²·d_attn under the
        causal mask forward, twice that backward; recomputation not counted). ``sum_sq_doc_lengths`` = Σ L²."""
        d_attn = self.num_attention_heads * self.hd
        return 6.0 * self.matmul_params() * tokens + 6.0 * self.num_hidden_layers * d_attn * sum_sq_doc_lengths
