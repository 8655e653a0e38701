"""Loaded checkpoints live in the process's own memory, not in a mapping of the file."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsedelta.models.memory import own_memory


def test_own_memory_copies_every_tensor_and_keeps_ties_and_outputs(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    params = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    assert own_memory(model) is model
    for name, p in model.named_parameters():
        assert p is params[name][0] and p.data_ptr() != params[name][1]  # the same Parameter, new storage
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
