"""Tiny random-weight Qwen text encoders and a Qwen tokenizer built in memory, for the tiny pipelines of
the LLM-conditioned families (Qwen2.5-VL for Qwen-Image, Qwen3 for the others).

The tokenizer is Qwen2's byte-level BPE with no merges (every byte one token, as
:func:`lorafit.families.tiny.build_clip_tokenizer` does for CLIP), the chat-template special tokens
the pipelines use, and a chat template with the structure of Qwen3's (``enable_thinking=False`` adds
the empty think block, as the real template does). The real tokenizers differ in their merges.
"""

from __future__ import annotations

# Qwen3's chat template reduced to what the image pipelines use: one user turn, the generation prompt,
# and the empty think block it inserts when thinking is switched off.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
_SPECIAL = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")


def build_qwen_tokenizer():
    """A byte-level Qwen2 tokenizer (pad ``<|endoftext|>``, end ``<|im_end|>``) with a chat template."""
    from transformers import Qwen2Tokenizer

    from lorafit.families.tiny import _byte_alphabet

    vocab = {token: index for index, token in enumerate(_byte_alphabet())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIAL)})
    tokenizer.add_tokens(["<|endoftext|>"], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _text_settings(tokenizer, hidden: int, layers: int) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_qwen25_vl(tokenizer, hidden: int = 32, layers: int = 2):
    """Qwen-Image's text encoder class (``Qwen2_5_VLForConditionalGeneration``) with a one-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = _text_settings(tokenizer, hidden, layers)
    # Multimodal RoPE splits each head's 8 dims into (temporal, height, width) sections, as 128 into (16, 24, 24).
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]}
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden)
    config = Qwen2_5_VLConfig(text_config=text, vision_config={**vision, "fullatt_block_indexes": [0]})
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen3(tokenizer, hidden: int = 32, layers: int = 2, causal_lm: bool = False):
    """Qwen3 bare (``Qwen3Model``, as Z-Image loads it) or with its language-model head (``Qwen3ForCausalLM``)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(**_text_settings(tokenizer, hidden, layers), head_dim=8, tie_word_embeddings=True)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()
