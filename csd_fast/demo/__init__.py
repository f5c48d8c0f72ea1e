"""Built-in demo: a tiny Llama-style model, a local tokenizer and a bilingual preference set."""
