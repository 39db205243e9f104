"""The tiny reference models' shapes and token ids (plain dicts, no torch): tests/hf_reference.py builds them in
transformers, and bench/bench_token2wav.py builds its tiny Token2Wav from them where torch is absent."""

# Token ids of the tiny configs: AUDIO=1, IMAGE=2, VIDEO=3, audio bos/eos 4/5, vision bos/eos 7/8.
IDS = dict(audio_token_index=1, image_token_index=2, video_token_index=3, audio_start_token_id=4,
           audio_end_token_id=5, vision_start_token_id=7, vision_end_token_id=8)

_VISION = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=24, num_heads=4, patch_size=14,
               spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
_AUDIO = dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=32, encoder_layers=2, num_mel_bins=128,
              n_window=100, output_dim=32)

# Three text decoders: GQA 2 / 4 / 1 (MHA), different head dims and mrope sections.
TEXT_VARIANTS = {
    "gqa2": dict(vocab_size=200, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_parameters={"mrope_section": [1, 1, 2], "rope_type": "default",
                                                         "rope_theta": 1e6}),
    "gqa4": dict(vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=16,
                 rope_parameters={"mrope_section": [2, 3, 3], "rope_type": "default", "rope_theta": 1e4}),
    "mha": dict(vocab_size=128, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, head_dim=12, rms_norm_eps=1e-5,
                rope_parameters={"mrope_section": [2, 2, 2], "rope_type": "default", "rope_theta": 1e6}),
}

# A tiny Talker over the "gqa2" Thinker (codec pad / bos / eos / mask ids 112, 113, 114, 116; tts text ids inside
# the Thinker's vocabulary of 200). `speaker` is spk_dict.pt's entry: the bos id opening the text track.
TALKER = dict(vocab_size=120, embedding_size=32, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8,
              rope_parameters={"mrope_section": [1, 1, 2], "rope_type": "default", "rope_theta": 1e6},
              tts_codec_start_token_id=113, tts_codec_end_token_id=114, tts_codec_pad_token_id=112,
              tts_codec_mask_token_id=116, tts_text_start_token_id=190, tts_text_end_token_id=191,
              tts_text_pad_token_id=189, spatial_merge_size=2, **IDS)
# A Token2Wav small enough to build in a test (no parity role: the Talker's codes are taken before it).
TOKEN2WAV = dict(
    dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, ff_mult=2, emb_dim=16,
                    block_size=4, look_ahead_layers=[1], look_backward_layers=[0], repeats=2, num_embeds=120,
                    mel_dim=80, enc_emb_dim=8, enc_dim=8, enc_channels=[16, 16, 16, 16, 48],
                    enc_kernel_sizes=[5, 3, 3, 3, 1], enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=8,
                    enc_res2net_scale=2, enc_se_channels=8, dropout=0.0),
    bigvgan_config=dict(upsample_initial_channel=64))
SPEAKERS = {"Chelsie": 150, "Ethan": 151}
