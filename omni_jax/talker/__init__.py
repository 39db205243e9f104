"""The Talker tower: its registry entry (tower), its sequences laid out for training (layout, objective) and
decoding (inputs), its data targets (targets) and batch fields (data). The model module is omni_jax.models.talker."""
