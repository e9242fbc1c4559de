"""The demo model's world: a generated scene world (one flat shape on a flat background), its reader, the
training command (`train-demo`) and the quality benchmark (`eval-demo`). Nothing here runs at import."""
