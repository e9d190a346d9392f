"""The tokenizer role: chat template, tokenization and prompt checks, off the gateway's loop."""
