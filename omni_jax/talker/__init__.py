"""The Talker's sequences: how the two tracks are laid out for training (layout, objective) and decoding."""
