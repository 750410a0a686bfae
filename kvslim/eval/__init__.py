"""Evaluation: real text corpora, tokenizers, the SmolLM2 reference checkpoint, perplexity."""

from kvslim.eval.data import cache_dir, fetch_documents, fetch_text, load_text, split_text
from kvslim.eval.perplexity import eval_ppl, hf_logits_fn, model_perplexity, perplexity
from kvslim.eval.smollm2 import load_smollm2, smollm2_dir
from kvslim.eval.tokenizer import load_tokenizer, tokenize

__all__ = [
    "cache_dir",
    "eval_ppl",
    "fetch_documents",
    "fetch_text",
    "hf_logits_fn",
    "load_smollm2",
    "load_text",
    "load_tokenizer",
    "model_perplexity",
    "perplexity",
    "smollm2_dir",
    "split_text",
    "tokenize",
]
