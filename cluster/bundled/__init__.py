"""The bundled model's tooling: checkpoint generation, presets, tokenizer, chat corpus, training
and its model card."""
