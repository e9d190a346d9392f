"""The model runner and its execution paths: eager, compiled (torch.compile), CUDA graphs,
oneDNN-packed linears; the attention backends over the paged KV cache."""
