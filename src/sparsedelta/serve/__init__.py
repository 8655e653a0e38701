"""`sparsedelta serve`: an OpenAI-compatible server for many deltas over one causal-LM base."""
