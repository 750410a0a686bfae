"""Evaluation: real text corpora, the SmolLM2 reference checkpoint, perplexity, calibration."""

from kvslim.eval.calib import calibration_batches
from kvslim.eval.data import cache_dir, fetch_documents, fetch_text, load_text, split_text
from kvslim.eval.perplexity import hf_logits_fn, load_tokenizer, perplexity, tokenize
from kvslim.eval.smollm2 import load_smollm2, smollm2_dir

__all__ = [
    "cache_dir",
    "calibration_batches",
    "fetch_documents",
    "fetch_text",
    "hf_logits_fn",
    "load_smollm2",
    "load_text",
    "load_tokenizer",
    "perplexity",
    "smollm2_dir",
    "split_text",
    "tokenize",
]
