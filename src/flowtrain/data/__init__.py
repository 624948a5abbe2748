"""Text → token ids → batches.

tokenizers (char, byte, BPE) · corpora (sources → documents) · prepare (→ dataset directory, cached) ·
dataset (TokenDataset.open) · loader (BatchLoader, Batch, eval_batches). Import the submodules directly;
this package stays import-light because config loading imports data.config.
"""
