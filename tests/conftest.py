"""Shared fixtures: the offline assets and tiny random-init models of every supported architecture."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("OPTIMUM_PRUNE_ASSETS", REPO.parent / "shared" / "assets"))
STORIES_260K = ASSETS / "models" / "stories260K"
TINYSTORIES_656K = ASSETS / "models" / "TinyStories-656K"
C4_SAMPLE = ASSETS / "data" / "c4" / "c4_validation_2k.jsonl"
TINYSTORIES_VAL = ASSETS / "data" / "tinystories" / "tinystories_val.txt"
WIKITEXT_TEST = ASSETS / "data" / "wikitext-2-raw-v1" / "test.jsonl"
GPT2_TOKENIZER = ASSETS / "tokenizers" / "gpt2-bpe"

_COMMON = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_LLAMA_LIKE = {**_COMMON, "intermediate_size": 128, "num_key_value_heads": 2, "max_position_embeddings": 256}

# Tiny configs: widths divisible by 8 so that 2:4 and 4:8 apply to every linear layer.
ARCHITECTURES = {
    "llama": lambda: transformers.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=64),
    "qwen2": lambda: transformers.Qwen2Config(**_LLAMA_LIKE),
    "gemma": lambda: transformers.GemmaConfig(**_LLAMA_LIKE, head_dim=16),
    "phi": lambda: transformers.PhiConfig(**_COMMON, intermediate_size=128, max_position_embeddings=256),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        word_embed_proj_dim=64,
        max_position_embeddings=256,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_COMMON, intermediate_size=128, max_position_embeddings=256),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0
    ),
}

_MOE = {**_COMMON, "num_key_value_heads": 2, "num_experts_per_tok": 2}

# Mixtures of experts (transformers 5 fused 3-D experts), 4 experts each, every expert 32 channels wide.
MOE_ARCHITECTURES = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_MOE, intermediate_size=128, moe_intermediate_size=32, num_experts=4, head_dim=16
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_MOE, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4
    ),
    "mixtral": lambda: transformers.MixtralConfig(**_MOE, intermediate_size=32, num_local_experts=4),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **_MOE,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    ),  # fmt: skip
    "gpt_oss": lambda: transformers.GptOssConfig(
        **_MOE,
        intermediate_size=32,
        num_local_experts=4,
        head_dim=16,
        layer_types=["sliding_attention", "full_attention"],
    ),  # fmt: skip
    "olmoe": lambda: transformers.OlmoeConfig(
        **_MOE, intermediate_size=32, num_experts=4, pad_token_id=0, eos_token_id=1
    ),
    "granitemoe": lambda: transformers.GraniteMoeConfig(**_MOE, intermediate_size=32, num_local_experts=4),
}


_MROPE = {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
_QWEN_VISION = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
_QWEN_MERGER = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
# Vision-language models as AutoModelForImageTextToText builds them: a language model and a smaller vision tower.
VLM_ARCHITECTURES = {
    "qwen2_vl": lambda: transformers.Qwen2VLConfig(
        text_config={**_LLAMA_LIKE, **_MROPE},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, **_QWEN_VISION},
    ),
    "qwen2_5_vl": lambda: transformers.Qwen2_5_VLConfig(
        text_config={**_LLAMA_LIKE, **_MROPE},
        vision_config={**_QWEN_MERGER, "fullatt_block_indexes": [1], **_QWEN_VISION},
    ),
    "gemma3": lambda: transformers.Gemma3Config(
        text_config={**_LLAMA_LIKE, "head_dim": 16},
        vision_config={**_VISION, "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4,
    ),
    "llava": lambda: transformers.LlavaConfig(
        text_config={"model_type": "llama", **_LLAMA_LIKE},
        vision_config={"model_type": "clip_vision_model", **_VISION, "image_size": 28, "patch_size": 14},
    ),
    "qwen3_vl_moe": lambda: transformers.Qwen3VLMoeConfig(  # a mixture-of-experts language model
        text_config={
            **_LLAMA_LIKE,
            "moe_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": 16,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        },
        vision_config={**_QWEN_MERGER, "deepstack_visual_indexes": [1], **_QWEN_VISION},
    ),
    "mistral3": lambda: transformers.Mistral3Config(
        text_config={"model_type": "mistral", **_LLAMA_LIKE},
        vision_config={"model_type": "pixtral", **_VISION, "image_size": 28, "patch_size": 14},
    ),
}


def tiny_vlm(architecture: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random-init vision-language model of ``architecture`` (`VLM_ARCHITECTURES`), in eval mode."""
    torch.manual_seed(seed)
    return transformers.AutoModelForImageTextToText.from_config(VLM_ARCHITECTURES[architecture]()).eval()


def tiny_model(architecture: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random-init causal LM of ``architecture`` (dense or mixture of experts) with a 512-token vocabulary,
    in eval mode."""
    torch.manual_seed(seed)
    config = {**ARCHITECTURES, **MOE_ARCHITECTURES}[architecture]()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@contextmanager
def killed_at_block(owner: type, method: str, block: int) -> Iterator[None]:
    """A run killed when ``owner.method`` (called with a block index first) reaches ``block``."""
    original = getattr(owner, method)

    def killed(self, index, *args, **kwargs):
        if index == block:
            raise KeyboardInterrupt
        return original(self, index, *args, **kwargs)

    setattr(owner, method, killed)
    try:
        yield
    finally:
        setattr(owner, method, original)


def random_ids(num_samples: int = 8, seq_len: int = 32, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    """Calibration token ids for the tiny models."""
    return torch.randint(0, vocab, (num_samples, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def magnitude_stories():
    """stories260K pruned to 50% by magnitude (no calibration), once per test module."""
    from optimum_prune import Pruner, PruningConfig

    pruner = Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude", sparsity=0.5), device="cpu")
    pruner.progress = False
    pruner.prune()
    return pruner


@pytest.fixture(scope="session")
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.fail(f"The offline assets are missing at {ASSETS}; set OPTIMUM_PRUNE_ASSETS to their folder.")
    return ASSETS


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The test models are tiny: one torch thread is faster than two, and runs compare bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
