"""Host-side input pipeline: media decoding and feature extraction (numpy only, runs in data workers)."""
