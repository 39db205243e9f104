"""Evaluation: the jitted eval step (loss, perplexity, token accuracy per modality) and the eval.py job.

Evaluators for generation-based benchmarks (WER, BLEU, multiple choice, TTS) join here later.
"""
