"""The released special token ids (the checkpoint's added_tokens.json), in one place.

Pure Python, no jax: the tokenizer and the packer run in data-pipeline worker processes and read these, as
do the config defaults (omni_jax.config.TokenIds, omni_jax.defaults.thinker_token_ids).
"""

NUM_RANKS = 151643  # regular byte-level BPE tokens (ids 0 .. NUM_RANKS - 1); specials start here

TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|AUDIO|>": 151646,
    "<|audio_bos|>": 151647,
    "<|audio_eos|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_bos|>": 151652,
    "<|vision_eos|>": 151653,
    "<|vision_pad|>": 151654,
    "<|IMAGE|>": 151655,
    "<|VIDEO|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}

ENDOFTEXT = TOKENS["<|endoftext|>"]
IM_START = TOKENS["<|im_start|>"]
IM_END = TOKENS["<|im_end|>"]
PAD = ENDOFTEXT  # left padding of batched prompts, packing filler, filler after a generated row stops
USER = 872  # the regular token "user" (transformers' user_token_id)
EOS = (IM_END, ENDOFTEXT)  # generation stops on either

# Rows of the thinker embedding table that drive the Talker's text stream; they have no surface form.
TTS_PAD, TTS_BOS, TTS_EOS = 151859, 151860, 151861

# The Thinker's ids under the names of omni_jax.config.TokenIds / config.model.thinker.
THINKER = {
    "audio_token_id": TOKENS["<|AUDIO|>"],
    "image_token_id": TOKENS["<|IMAGE|>"],
    "video_token_id": TOKENS["<|VIDEO|>"],
    "audio_start_token_id": TOKENS["<|audio_bos|>"],
    "audio_end_token_id": TOKENS["<|audio_eos|>"],
    "vision_start_token_id": TOKENS["<|vision_bos|>"],
    "vision_end_token_id": TOKENS["<|vision_eos|>"],
    "pad_token_id": PAD,
    "user_token_id": USER,
    "eos_token_ids": EOS,
}
