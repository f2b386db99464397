"""The shape of a decoder: parameter counts and training FLOPs, from an HF config (dict or ModelConfig).

Used by the trainer (MFU), the memory planner (witscale/planner.py) and the GPU benchmark; tested against
transformers' parameter counts and measured ZeRO partitions (tests/test_planner.py) and, for every family,
against witscale's own model (tests/test_model_families.py, tests/test_family_record.py). What differs per
family comes from its record (witscale/model/family.py ``get_family``), never from testing ``model_type``
here: the defaults of absent keys (head_dim independent of hidden/heads: Gemma, Qwen3; key/value heads; tied
embeddings; Qwen2's q/k/v bias), q/k norms (Qwen3, Gemma-3), four norms per layer (Gemma), an o_proj bias
where attention_bias covers it (Llama, Qwen3, Gemma), Llama's mlp_bias. Sliding-window layers are counted as
full attention in the FLOPs (an upper bound: a window W makes a document's attention cost L·min(L, W), not L²).
"""
from __future__ import annotations

from dataclasses import dataclass

from witscale.model.family import get_family, unwrap


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
    o_bias: bool = False            # a bias on o_proj too (attention_bias in Llama, Qwen3, Gemma)
    qk_norm: bool = False           # per-head q/k norms (Qwen3, Gemma-3): 2·head_dim replicated per layer
    sandwich_norms: bool = False    # Gemma's pre/post feed-forward norms: 2·hidden more per layer
    mlp_bias: bool = False          # biases on gate/up (sharded) and down (replicated): Llama's mlp_bias

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        """From a ModelConfig, or a config.json dict (a wrapped text model's too: its text_config, with the
        defaults transformers fills in). A dict without model_type counts as Llama (the planner's named
        sizes); an unknown model_type is a ValueError naming the supported ones."""
        if isinstance(cfg, dict):
            cfg, _ = unwrap(cfg)
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        family = get_family(get("model_type", "llama"))
        heads = get("num_attention_heads")
        attention_bias = bool(get("attention_bias", family.qkv_bias == "always"))
        return cls(vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                   intermediate_size=get("intermediate_size"), num_hidden_layers=get("num_hidden_layers"),
                   num_attention_heads=heads,
                   # As ModelConfig: absent → the family's default; null → num_attention_heads.
                   num_key_value_heads=get("num_key_value_heads", family.default_kv_heads) or heads,
                   tie_word_embeddings=bool(get("tie_word_embeddings", family.default_tie_word_embeddings)),
                   head_dim=get("head_dim") or family.default_head_dim or 0,
                   attention_bias=attention_bias,
                   o_bias=bool(get("o_bias", attention_bias and family.o_bias)),
                   qk_norm=bool(get("qk_norm", family.qk_norm)),
                   sandwich_norms=bool(get("sandwich_norms", family.sandwich_norms)),
                   mlp_bias=bool(get("mlp_bias", False)) and family.mlp_bias)

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
        if self.mlp_bias:
            sharded += 2 * self.intermediate_size
        replicated = (4 if self.sandwich_norms else 2) * h + (2 * hd if self.qk_norm else 0) + (h if self.o_bias else 0)
        replicated += h if self.mlp_bias else 0
        return sharded, replicated

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
