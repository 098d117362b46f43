"""The generated checkpoints' shapes and dtypes (synthetic.py writes them); no torch, so a
command can name a shape before it imports torch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ken_dist.checkpoints.dtypes import torch_dtype

DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}  # the generator's dtype names -> safetensors'


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    intermediate: int = 176
    layers: int = 2
    vocab: int = 256
    heads: int = 4
    kv_heads: int = 4

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, head_dim = self.hidden, self.intermediate, self.hidden // self.heads
        kv = self.kv_heads * head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def parameters(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.tensors())

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "torch_dtype": str(torch_dtype(DTYPES[dtype])).removeprefix("torch."),
        }


# Llama-2-7B's shape, and a 10.16B one (Llama-2-13B's width at 31 layers) that fits this
# machine's disk twice over with its store.
PRESETS = {
    "tiny": LlamaShape(),
    "7b": LlamaShape(hidden=4096, intermediate=11008, layers=32, vocab=32000, heads=32, kv_heads=32),
    "10b": LlamaShape(hidden=5120, intermediate=13824, layers=31, vocab=32000, heads=40, kv_heads=40),
}
