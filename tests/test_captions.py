"""The caption-embeddings file (text/captions.py): round trip, and one clear error for each kind of bad file."""
import numpy as np
import pytest

from terdit_jax.text import captions


def _captions(p=3, n=5, c=4):
    rng = np.random.default_rng(0)
    mask = (np.arange(n)[None] < np.array([2, 5, 1])[:p, None]).astype(np.int32)
    return captions.make([f"prompt {i}" for i in range(p)], rng.standard_normal((p, n, c)) * mask[..., None], mask,
                         rng.standard_normal((n, c)), np.eye(n, dtype=np.int32)[0])


def test_round_trip_and_condition(tmp_path):
    want = _captions()
    captions.write(str(tmp_path / "e.npz"), want)
    got = captions.read(str(tmp_path / "e.npz")).check(4, 5)
    assert got.prompts == want.prompts and len(got) == 3
    caption, mask = got.condition([2, 0])
    np.testing.assert_array_equal(caption, want.caption[[2, 0]])
    np.testing.assert_array_equal(mask, want.mask[[2, 0]])
    assert caption.dtype == np.float32 and mask.dtype == np.int32
    np.testing.assert_array_equal(got.null()[0], want.null_caption)
    assert not list(tmp_path.glob("*.tmp*"))


def test_bad_files_say_what_is_wrong(tmp_path):
    with pytest.raises(captions.CaptionError, match="takes 6 tokens of width 4"):
        _captions().check(4, 6)
    with pytest.raises(captions.CaptionError, match="width 8"):
        _captions().check(8, 5)
    np.savez(tmp_path / "x.npz", caption=np.zeros((1, 2, 3)))
    with pytest.raises(captions.CaptionError, match="lacks prompts, mask, null_caption, null_mask"):
        captions.read(str(tmp_path / "x.npz"))
    (tmp_path / "t.npz").write_text("not an npz")
    with pytest.raises(captions.CaptionError, match="cannot read"):
        captions.read(str(tmp_path / "t.npz"))
    with pytest.raises(captions.CaptionError, match="empty prompt"):
        captions.make(["a"], np.zeros((1, 2, 3)), np.ones((1, 2)), np.zeros((3, 3)), np.ones(2))
