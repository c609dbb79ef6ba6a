"""Configuration of a structlm model exported for transformers (self-contained: transformers only).

The structlm ModelConfig travels whole as `structlm`; the usual transformers names are derived from
it so that tools that read them (generation, lm-evaluation-harness) find them.
"""

from transformers import PretrainedConfig


class StructlmConfig(PretrainedConfig):
    model_type = "structlm"

    def __init__(self, structlm=None, premerge_tokens=16, **kwargs):
        self.structlm = dict(structlm or {})  # the structlm ModelConfig, as to_dict writes it
        self.premerge_tokens = premerge_tokens  # calls with fewer tokens use merged matrices
        m = self.structlm
        if m:
            kwargs.setdefault("tie_word_embeddings", m["tie_embeddings"])
            self.vocab_size = m["vocab_size"]
            self.hidden_size = m["d_model"]
            self.num_hidden_layers = m["n_layer"]
            self.num_attention_heads = m["n_head"]
            self.num_key_value_heads = m["n_kv_head"] or m["n_head"]
            self.head_dim = (m["attn_dim"] or m["d_model"]) // m["n_head"]  # read by vLLM
            self.max_position_embeddings = m["block_size"]
        super().__init__(**kwargs)
