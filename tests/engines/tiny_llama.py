"""Build a small Llama model and its tokenizer locally, for engine tests and benchmarks.

Runs in the test (or benchmark) process; needs torch, transformers and tokenizers, nothing from
kvbm_shm and nothing from any model hub.

Primitives:
  - ``SIZES``: named model shapes. ``"tiny"`` (hidden 128, 4 heads, 2 KV heads, head_dim 32,
    2 layers, vocab 512) is what the end-to-end tests use; ``"bench"`` is larger so that prefill
    dominates a request's time, for the time-to-first-token benchmark.
  - ``build_model_dir(path, size="tiny", seed=0)``: writes a LlamaForCausalLM (random weights from
    a fixed seed, ``initializer_range=0.2`` so a corrupted KV block moves the logits visibly,
    float32) and a byte-level BPE tokenizer trained on generated text into ``path`` with
    ``save_pretrained``. Both HF transformers and vLLM load the directory. Returns ``path``.
    Same ``size`` and ``seed`` give the same weights in any process.
  - ``build_lora_dir(path, model_dir, size="tiny", seed=0)``: writes a PEFT LoRA adapter (rank 8
    on every layer's q_proj and v_proj, random weights from ``seed``, large enough to change the
    output) by hand (``adapter_config.json`` + ``adapter_model.safetensors``), so no peft package
    is needed. Returns ``path``.
  - ``prompt_token_ids(num_tokens, seed)``: a reproducible prompt as token ids, avoiding the
    special tokens, so tests can place block boundaries exactly.

vLLM on CPU accepts head_dim 32 but not 16, hence the smallest shape here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
_MARKER = "kvbm_tiny_llama.json"


@dataclasses.dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    intermediate_size: int
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


SIZES = {
    "tiny": ModelSize(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, intermediate_size=256, max_position_embeddings=4096),
    "bench": ModelSize(hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                       num_hidden_layers=8, intermediate_size=1408, max_position_embeddings=8192),
}


def _training_text(seed: int) -> list[str]:
    """Deterministic pseudo-English lines for training the tokenizer."""
    rng = random.Random(seed)
    syllables = ["ka", "ve", "bo", "lu", "shi", "mem", "tor", "cache", "blo", "ck", "en", "gi",
                 "ne", "pre", "fix", "to", "ken", "the", "and", "of", "in", "a", "is", "it"]
    lines = []
    for _ in range(2000):
        words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
                 for _ in range(rng.randint(4, 16))]
        lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", ""]))
    return lines


def _build_tokenizer(seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(seed), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() <= VOCAB_SIZE, tok.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        model_max_length=8192)


def build_model_dir(path: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Write model + tokenizer into ``path`` (created if needed); reuse it if already built."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    shape = SIZES[size]
    marker = {"size": size, "seed": seed, **dataclasses.asdict(shape)}
    marker_path = path / _MARKER
    if marker_path.exists() and json.loads(marker_path.read_text()) == marker:
        return path
    path.mkdir(parents=True, exist_ok=True)

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(path, safe_serialization=True)
    _build_tokenizer(seed).save_pretrained(path)
    marker_path.write_text(json.dumps(marker))
    return path


LORA_RANK = 8


def build_lora_dir(path: str | os.PathLike, model_dir: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shape = SIZES[size]
    outputs = {"q_proj": shape.num_attention_heads * shape.head_dim, "v_proj": shape.num_key_value_heads * shape.head_dim}
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(shape.num_hidden_layers):
        for module, out in outputs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(LORA_RANK, shape.hidden_size, generator=g) * 0.2
            weights[f"{prefix}.lora_B.weight"] = torch.randn(out, LORA_RANK, generator=g) * 0.2
    save_file(weights, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir),
        "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(outputs), "fan_in_fan_out": False, "inference_mode": True}))
    return path


def prompt_token_ids(num_tokens: int, seed: int) -> list[int]:
    """``num_tokens`` ids drawn from the non-special vocabulary, reproducibly from ``seed``."""
    rng = random.Random(seed)
    return [rng.randrange(NUM_SPECIAL_TOKENS, VOCAB_SIZE) for _ in range(num_tokens)]
