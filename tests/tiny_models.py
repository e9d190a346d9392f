"""Tiny random-weight Hugging Face models written to disk, the reference our outputs must match."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

VOCAB = 260  # 256 byte tokens + 4 specials in the tiny tokenizer below
KINDS = ("llama", "llama3", "qwen2", "qwen3", "granite", "mistral", "phi3", "gemma2", "gemma3", "qwen2-yarn")
WINDOW = 8  # the sliding window of the tiny Gemmas' local layers: prompts of the parity tests outgrow it


def save_tiny_tokenizer(path: Path) -> None:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from pagoda.engine.tokenization.gguf_vocab import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True) for t in ("<s>", "</s>", "<|im_start|>", "<|im_end|>")]
    )
    backend.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ messages[0]['content'] }}"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_config(num_layers: int = 2) -> dict[str, Any]:
    """The sizes every tiny decoder shares (the tiny tokenizer's vocabulary and special ids)."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=256,
        eos_token_id=257,
    )


def make_tiny_model(
    kind: str, path: Path, dtype: torch.dtype = torch.float32, num_layers: int = 2
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Build, randomize and save a tiny model of `kind` with `num_layers` decoder layers; returns
    (hf_model, state_dict without a tied lm_head)."""
    import transformers as tf

    common = tiny_config(num_layers)
    torch.manual_seed(0)
    model: Any
    if kind == "llama":
        rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False))
    elif kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        }
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(
            tf.Qwen2Config(
                **common,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                tie_word_embeddings=True,
            )
        )
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True))
    elif kind == "granite":
        model = tf.GraniteForCausalLM(
            tf.GraniteConfig(
                **common,
                embedding_multiplier=12.0,
                residual_multiplier=0.22,
                attention_multiplier=0.0078125,
                logits_scaling=8.0,
                tie_word_embeddings=True,
            )
        )
    elif kind == "mistral":
        model = tf.MistralForCausalLM(
            tf.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
        )
    elif kind in ("phi3", "gemma2", "gemma3", "qwen2-yarn"):
        model = _newer_kind(kind, common)
    else:
        raise ValueError(kind)
    model = model.to(dtype)
    with torch.no_grad():  # norms start at 1.0 and biases at 0: randomize so a mixup would show
        for tensor in model.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    model.save_pretrained(str(path))
    save_tiny_tokenizer(path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return model.eval(), state


def save_noisy_draft(model: Any, path: Path, scale: float = 0.01, seed: int = 1) -> None:
    """Write `model` with Gaussian noise of `scale` on every weight to `path` (with the tiny
    tokenizer): a speculative "draft_model" of the same vocabulary whose greedy drafts the target
    mostly accepts and sometimes rejects. Changes `model` in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    save_tiny_tokenizer(path)


def _newer_kind(kind: str, common: dict[str, Any]) -> Any:
    """phi3: Phi-4-mini's partial rotary (3/4 of each head) with LongRoPE (its short factors:
    the parity tests' max_model_len 256 is the original context); gemma2: local layers (even ones)
    of WINDOW tokens, attention and final soft-caps small enough to bite, a softmax scale that is
    not head_dim's; gemma3: q/k norms, a linear-scaled RoPE on the full layers and another base on
    the local ones; qwen2-yarn: YaRN x8 over an original 64 positions."""
    import transformers as tf

    n = common["num_hidden_layers"]
    if kind == "phi3":
        rope = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0],
            "partial_rotary_factor": 0.75,
        }
        config = tf.Phi3Config(
            **common,
            rope_parameters=rope,
            original_max_position_embeddings=256,
            tie_word_embeddings=True,
            pad_token_id=None,
        )
        return tf.Phi3ForCausalLM(config)
    if kind == "gemma2":
        config = tf.Gemma2Config(
            **common,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        )
        return tf.Gemma2ForCausalLM(config)
    if kind == "gemma3":
        rope = {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        config = tf.Gemma3TextConfig(
            **common,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            layer_types=types,
            rope_parameters=rope,
        )
        return tf.Gemma3ForCausalLM(config)
    assert kind == "qwen2-yarn", kind
    rope = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, rope_parameters=rope, tie_word_embeddings=True))


def hf_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """An engine model's weights (pagoda.engine.models.llama) under HF names, in float32: the fused
    qkv and gate/up matrices split back into their parts (the inverse of `load_weights`), and
    quantized linears replaced by their `dequantized_weight()`. Untied heads only: a quantized head
    is not the embedding matrix any more."""
    assert not model.cfg.tie_word_embeddings, "a tied model's head and embedding would collide"
    tensors = {n: p.detach().float() for n, p in model.named_parameters()}
    for name, module in model.named_modules():
        if hasattr(module, "dequantized_weight"):
            tensors[f"{name}.weight"] = module.dequantized_weight()
    cfg = model.cfg
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    fused = {
        "qkv_proj": {"q_proj": q, "k_proj": kv, "v_proj": kv},
        "gate_up_proj": {"gate_proj": inter, "up_proj": inter},
    }
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        fused_name = next((f for f in fused if f".{f}." in name), None)
        if fused_name is None:
            state[name] = tensor
            continue
        sizes = fused[fused_name]
        for part, piece in zip(sizes, tensor.split(list(sizes.values())), strict=True):
            state[name.replace(fused_name, part)] = piece
    return {(n if n.startswith("lm_head.") else f"model.{n}"): t for n, t in state.items()}


def save_tiny_wordpiece(path: Path) -> int:
    """A BERT-style tokenizer (lowercased words of letters, [CLS] text [SEP]); returns its vocab size."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, normalizers, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz.,!?"]
    words += ["the", "cat", "sat", "on", "mat", "dog", "runs", "##s", "##ed"]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Backend(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    backend.save(str(path / "tokenizer.json"))
    config = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def make_tiny_embedder(kind: str, path: Path) -> Any:
    """A tiny random embedding model saved as its bare architecture (what embedding checkpoints
    ship): `qwen3` (Qwen3Model, a decoder) or `bert` (BertModel, an encoder). Returns the HF model."""
    import transformers as tf

    torch.manual_seed(0)
    model: Any
    if kind == "qwen3":
        model = tf.Qwen3Model(tf.Qwen3Config(**tiny_config(), head_dim=32))
        save_tiny_tokenizer(path)
    elif kind == "bert":
        vocab = save_tiny_wordpiece(path)
        config = tf.BertConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
        model = tf.BertModel(config, add_pooling_layer=True)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # norms start at 1.0 and biases at 0: randomize so a mixup would show
        for tensor in model.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    model.save_pretrained(str(path))
    return model.eval()
