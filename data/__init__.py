"""Dataset recipes: the embedded demo corpus (python -m data.demo_corpus) and its helpers."""
