"""What every layer uses: user-facing errors, outputs written atomically, reading text and JSONL, file format
versions and the tokenizer loader. Torch-free."""
