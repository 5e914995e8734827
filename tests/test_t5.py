"""The Flax T5 v1.1 encoder (text/t5.py) through its importer equals transformers' T5EncoderModel with a tiny
random config (float32, padded batch)."""
import numpy as np
import pytest


from terdit_jax.text.t5 import T5Config, encode, from_hf


def test_t5_encoder_equals_transformers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import T5Config as T5Config_, T5EncoderModel
    cfg = T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, num_buckets=8,
                   max_distance=16)
    hf_cfg = T5Config_(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
    torch.manual_seed(0)
    ref = T5EncoderModel(hf_cfg).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (2, 20))
    mask = np.ones((2, 20), np.int64)
    mask[0, 13:] = 0
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    got = np.asarray(encode(from_hf({k: v.numpy() for k, v in ref.state_dict().items()}, cfg), cfg, ids, mask))
    keep = mask.astype(bool)  # padded positions are not used downstream (the caption mask hides them)
    err = np.abs(got[keep] - want[keep]).max() / np.abs(want[keep]).max()
    print("t5 rel err", err)
    assert err <= 1e-4, err
