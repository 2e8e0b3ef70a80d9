"""Tests for cft_jax.models.vit and the LoRA / adapter / prefix PEFT modules (aEPG paper setup;
docs/methods.md#peft).

All on the ``tiny`` variant (D=32, 2 blocks, 2 heads, MLP 128, patch 4) at 32 px, a few images.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from cft_jax import peft
from cft_jax.errors import ConfigError
from cft_jax.models import build_model, vit
from cft_jax.peft.adapter import Adapter, adapter_param_count
from cft_jax.peft.prefix import dot_product_attention, prefix_attention
from cft_jax.peft.spec import PeftSpec

D, DEPTH, H, MLP, P = 32, 2, 2, 128, 4   # VARIANTS["tiny"]
DH = D // H
S = 32                                   # image side -> 8x8 = 64 patches
N = (S // P) ** 2
C = 6                                    # classes of the fresh head
B = 2
L = 10                                   # prefix length
BLOCKS = (0, 1)
PEFT_WORDS = ("lora", "adapter", "prefix")

# RBG keys: XLA compiles their random-number kernels much faster than threefry's (test speed).
KEY = lambda seed: jax.random.key(seed, impl="rbg")

PEFT_CONFIGS = {
    "lora_kv": dict(peft="lora", lora_rank=4, lora_targets=("k", "v")),
    "lora_qkvo": dict(peft="lora", lora_rank=4, lora_targets=("q", "k", "v", "o")),
    "adapter_attn": dict(peft="adapter", adapter_hidden=5, adapter_position="attn"),
    "adapter_mlp": dict(peft="adapter", adapter_hidden=5, adapter_position="mlp"),
    "prefix": dict(peft="prefix", prefix_length=L),
}


def _spec(cfg, blocks=BLOCKS) -> PeftSpec:
  """The :class:`PeftSpec` of a ``PEFT_CONFIGS`` entry on ``blocks``."""
  names = {"peft": "name", "lora_rank": "rank"}
  return PeftSpec(blocks=blocks, **{names.get(k, k): v for k, v in cfg.items()})


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def augreg_arrays(grid=S // P, head_classes=7, seed=0):
  """A checkpoint dict with the real augreg key names and shapes of the tiny variant."""
  rng = np.random.default_rng(seed)
  shapes = {
      "embedding/kernel": (P, P, 3, D), "embedding/bias": (D,), "cls": (1, 1, D),
      "Transformer/posembed_input/pos_embedding": (1, grid * grid + 1, D),
      "Transformer/encoder_norm/scale": (D,), "Transformer/encoder_norm/bias": (D,),
      "head/kernel": (D, head_classes), "head/bias": (head_classes,),
  }
  for i in range(DEPTH):
    b = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      shapes[b + ln + "/scale"] = (D,)
      shapes[b + ln + "/bias"] = (D,)
    for proj in ("query", "key", "value"):
      shapes[b + f"MultiHeadDotProductAttention_1/{proj}/kernel"] = (D, H, DH)
      shapes[b + f"MultiHeadDotProductAttention_1/{proj}/bias"] = (H, DH)
    shapes[b + "MultiHeadDotProductAttention_1/out/kernel"] = (H, DH, D)
    shapes[b + "MultiHeadDotProductAttention_1/out/bias"] = (D,)
    shapes[b + "MlpBlock_3/Dense_0/kernel"] = (D, MLP)
    shapes[b + "MlpBlock_3/Dense_0/bias"] = (MLP,)
    shapes[b + "MlpBlock_3/Dense_1/kernel"] = (MLP, D)
    shapes[b + "MlpBlock_3/Dense_1/bias"] = (D,)
  return {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.PRNGKey(1), (B, S, S, 3), jnp.float32)


@pytest.fixture(scope="module")
def base():
  """The peft='none' model and its variables (the shared frozen backbone)."""
  module = vit.VisionTransformer("tiny", C)
  variables = jax.jit(module.init)(KEY(0), jnp.zeros((1, S, S, 3)))
  return module, variables, jax.jit(module.apply)


def peft_variables(base_variables, **cfg):
  """A PEFT model whose non-PEFT leaves are the base model's (zero-initialised PEFT)."""
  module = vit.VisionTransformer("tiny", C, peft=_spec(cfg))
  flat = dict(_flat(base_variables["params"]))
  new = vit.init_leaves(module, KEY(2), S, lambda k: any(w in k for w in PEFT_WORDS))
  assert new and not set(new) & set(flat)
  flat.update(new)
  shapes = jax.eval_shape(module.init, KEY(2), jax.ShapeDtypeStruct((1, S, S, 3), jnp.float32))
  assert set(_flat(shapes["params"])) == set(flat)
  return module, {"params": traverse_util.unflatten_dict(flat, sep="/")}


@pytest.fixture(scope="module")
def zoo(base):
  """Lazily built ``name -> (module, variables, jitted apply)`` (one compile per config)."""
  cache = {}

  def get(name):
    if name not in cache:
      module, variables = peft_variables(base[1], **PEFT_CONFIGS[name])
      cache[name] = (module, variables, jax.jit(module.apply))
    return cache[name]
  return get


# ------------------------------------------------------------------------------- loader


def test_loader_round_trip(tmp_path, images):
  arrays = augreg_arrays()
  path = tmp_path / "augreg_tiny.npz"
  np.savez(path, **arrays)
  v = vit.load_npz(path, "tiny", C, image_size=S, rng=KEY(3))
  flat = _flat(v["params"])
  # Every backbone array lands on the leaf of the same name, unchanged.
  for k, a in arrays.items():
    if not k.startswith("head/"):
      np.testing.assert_array_equal(np.asarray(flat[k]), a, err_msg=k)
  # The 7-way head is replaced by a fresh C-way one: N(0, 1e-3) kernel, zero bias.
  assert flat["head/kernel"].shape == (D, C) and flat["head/bias"].shape == (C,)
  np.testing.assert_array_equal(np.asarray(flat["head/bias"]), 0.0)
  std = float(np.std(np.asarray(flat["head/kernel"])))
  assert 3e-4 < std < 3e-3
  assert set(flat) == set(arrays)

  module = vit.VisionTransformer("tiny", C)
  logits = jax.jit(module.apply)(v, images)
  assert logits.shape == (B, C) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  feats = jax.eval_shape(lambda v, x: module.apply(v, x, return_features=True), v, images)
  assert feats.shape == (B, D)

  # save_npz -> load_npz (head kept) is the identity; a vit_jax "opt/target/" prefix is stripped.
  out = tmp_path / "saved.npz"
  vit.save_npz(v, out)
  v2 = vit.load_npz(out, "tiny", C, image_size=S, keep_head=True)
  for k, a in _flat(v2["params"]).items():
    np.testing.assert_array_equal(np.asarray(a), np.asarray(flat[k]), err_msg=k)
  # Same weights under a vit_jax "opt/target/" prefix, and in big_vision's scanned layout
  # (names MultiHeadDotProductAttention_0 / LayerNorm_1 / MlpBlock_0, blocks stacked on axis 0).
  prefixed = tmp_path / "opt.npz"
  np.savez(prefixed, **{"opt/target/" + k: a for k, a in arrays.items()})
  bv = {}
  for k, a in arrays.items():
    k = k.replace("Transformer/posembed_input/pos_embedding", "pos_embedding")
    for old, new in (("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"),
                     ("LayerNorm_2", "LayerNorm_1"), ("MlpBlock_3", "MlpBlock_0")):
      k = k.replace(old, new)
    if k.startswith("Transformer/encoderblock_"):
      i, rest = k[len("Transformer/encoderblock_"):].split("/", 1)
      bv.setdefault("params/Transformer/encoderblock/" + rest, [None] * DEPTH)[int(i)] = a
    else:
      bv["params/" + k] = a
  bigv = tmp_path / "big_vision.npz"
  np.savez(bigv, **{k: np.stack(a) if isinstance(a, list) else a for k, a in bv.items()})
  for other in (prefixed, bigv):
    v3 = vit.load_npz(other, "tiny", C, image_size=S, rng=KEY(3))
    for k, a in _flat(v3["params"]).items():
      np.testing.assert_array_equal(np.asarray(a), np.asarray(flat[k]), err_msg=f"{other}: {k}")


def test_loader_fills_peft_from_init(tmp_path):
  path = tmp_path / "augreg_tiny.npz"
  np.savez(path, **augreg_arrays())
  v = vit.load_npz(path, "tiny", C, image_size=S, peft=PeftSpec("lora", blocks=(1,)),
                   rng=KEY(0))
  flat = _flat(v["params"])
  lora = [k for k in flat if "lora" in k]
  assert len(lora) == 2 * 3 and all("encoderblock_1" in k for k in lora)
  np.testing.assert_array_equal(
      np.asarray(flat["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/lora_b"]), 0)


def test_loader_errors_name_keys(tmp_path):
  arrays = augreg_arrays()
  bad = dict(arrays)
  del bad["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
  bad["Transformer/encoderblock_7/LayerNorm_0/scale"] = np.ones(D, np.float32)
  bad["Transformer/encoder_norm/scale"] = np.ones(D + 1, np.float32)
  bad["pre_logits/kernel"] = np.ones((D, D), np.float32)
  path = tmp_path / "bad.npz"
  np.savez(path, **bad)
  with pytest.raises(ValueError) as e:
    vit.load_npz(path, "tiny", C, image_size=S)
  msg = str(e.value)
  assert "missing keys (1): Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias" in msg
  assert "Transformer/encoderblock_7/LayerNorm_0/scale" in msg
  assert "pre_logits/kernel" in msg and "representation_size" in msg
  assert "Transformer/encoder_norm/scale: file (33,) vs model (32,)" in msg


def test_truncated_or_foreign_npz_is_one_error_naming_the_file(tmp_path):
  """A truncated download (or a file of another format) is a BadDataError naming the file, from
  every reader of the checkpoint, not a zipfile traceback."""
  from cft_jax.errors import BadDataError  # pylint: disable=g-import-not-at-top
  good = tmp_path / "good.npz"
  np.savez(good, **augreg_arrays())
  truncated, text = tmp_path / "truncated.npz", tmp_path / "text.npz"
  truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  text.write_text("not a checkpoint")
  for path, kind in ((truncated, "BadZipFile"), (text, "ValueError")):
    for read in (vit.detect_checkpoint_format, lambda p: vit.load_npz(p, "tiny", C, image_size=S),
                 vit.read_npz):
      with pytest.raises(BadDataError) as e:
        read(path)
      assert str(e.value).startswith(f"model.checkpoint: {path} is not a readable .npz ({kind}: ")
      assert str(e.value).endswith("the download may be truncated: download it again")
      assert "\n" not in str(e.value)
  assert vit.detect_checkpoint_format(good) == "augreg"
  assert sorted(vit.read_npz(good, lambda k: k.startswith("cls"))) == ["cls"]


def test_posemb_resize_keeps_cls_and_resamples_grid(tmp_path, images):
  arrays = augreg_arrays()
  pe = arrays["Transformer/posembed_input/pos_embedding"]
  # A constant grid (per channel) must stay constant under bilinear resizing.
  pe[0, 1:] = np.linspace(-1, 1, D, dtype=np.float32)[None]
  path = tmp_path / "augreg_tiny.npz"
  np.savez(path, **arrays)
  loaded = {}
  for size in (48, 16):
    g = size // P
    v = loaded[size] = vit.load_npz(path, "tiny", C, image_size=size)
    new = np.asarray(v["params"]["Transformer"]["posembed_input"]["pos_embedding"])
    assert new.shape == (1, g * g + 1, D)
    np.testing.assert_array_equal(new[0, 0], pe[0, 0])                 # cls token kept
    np.testing.assert_allclose(new[0, 1:], np.broadcast_to(pe[0, 1:2], (g * g, D)), atol=1e-6)
  # A ramp along rows stays a monotone ramp when upsampled; same size is the identity.
  ramp = np.zeros((1, N + 1, D), np.float32)
  ramp[0, 1:] = np.repeat(np.arange(S // P, dtype=np.float32), S // P)[:, None]
  up = vit.resample_posemb(ramp, (12, 12))[0, 1:].reshape(12, 12, D)
  assert np.all(np.diff(up[:, 0, 0]) > 0) and np.allclose(up[:, :1], up)
  np.testing.assert_array_equal(vit.resample_posemb(ramp, (8, 8)), ramp)
  # The resized model runs at the new resolution.
  x = jax.image.resize(images, (B, 48, 48, 3), "bilinear")
  logits = jax.jit(vit.VisionTransformer("tiny", C).apply)(loaded[48], x)
  assert logits.shape == (B, C) and bool(jnp.all(jnp.isfinite(logits)))


# --------------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_zero_init_peft_leaves_output_unchanged(name, base, zoo, images):
  _, base_vars, base_apply = base
  ref = base_apply(base_vars, images)
  _, variables, apply = zoo(name)
  out = apply(variables, images)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-7)
  # Sanity: the PEFT module is wired in (non-zero PEFT parameters change the output).
  flat = _flat(variables["params"])
  rng = np.random.default_rng(5)
  for k in sorted(flat):
    if any(w in k for w in ("lora", "adapter", "prefix")):
      flat[k] = np.asarray(flat[k]) + 0.5 * rng.standard_normal(flat[k].shape).astype(np.float32)
  moved = apply({"params": traverse_util.unflatten_dict(flat, sep="/")}, images)
  assert float(jnp.max(jnp.abs(moved - ref))) > 1e-4


@pytest.mark.parametrize("name", ["lora_kv", "adapter_attn", "prefix"])
def test_only_trainable_leaves_change_after_adam(name, zoo, images):
  module, variables, _ = zoo(name)
  peft_name = PEFT_CONFIGS[name]["peft"]
  trainable, frozen = peft.split_params(variables["params"], peft_name)
  assert all("head" in k or peft_name in k for k in _flat(trainable))
  labels = jnp.arange(B) % C
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      logits = module.apply({"params": peft.merge_params(p, frozen)}, images, train=True,
                            rngs={"dropout": jax.random.PRNGKey(0)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = trainable, tx.init(trainable)
  # Two steps: the zero-init factors (lora_b, adapter up, prefix gate) unlock the rest at step 2.
  for _ in range(2):
    params, opt_state = step(params, opt_state)
  before, after = _flat(variables["params"]), _flat(peft.merge_params(params, frozen))
  assert set(before) == set(after)
  trained = set(_flat(trainable))
  for k in before:
    if k in trained:
      assert not np.array_equal(np.asarray(before[k]), np.asarray(after[k])), f"{k} did not train"
    else:
      np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(before[k]), err_msg=k)


def _closed_form(cfg) -> int:
  blocks = len(BLOCKS)
  if cfg["peft"] == "lora":  # per target per block: A [D, r] + B [r, H*Dh] + learnable scale
    r = cfg["lora_rank"]
    return blocks * len(cfg["lora_targets"]) * (r * (D + H * DH) + 1)
  if cfg["peft"] == "adapter":  # down W+b, up W+b (biases on), learnable scale
    h = cfg["adapter_hidden"]
    return blocks * (D * h + h + h * D + D + 1)
  # prefix: keys + values [L, H, Dh] each, key/value scales, gate
  return blocks * (2 * cfg["prefix_length"] * D + 2 + 1)


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_trainable_parameter_counts_closed_form(name):
  cfg = PEFT_CONFIGS[name]
  module = vit.VisionTransformer("tiny", C, peft=_spec(cfg))
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, S, S, 3), jnp.float32))
  trainable, _ = peft.split_params(shapes["params"], cfg["peft"])
  head = D * C + C
  assert peft.count_params(trainable) == _closed_form(cfg) + head
  assert vit.peft_param_count(module) == _closed_form(cfg)
  expected = {"lora_kv": 1028, "lora_qkvo": 2056, "adapter_attn": 716, "adapter_mlp": 716,
              "prefix": 1286}[name]  # the same numbers written out (D=32, H=2, r=4, h=5, L=10)
  assert _closed_form(cfg) == expected


def test_prefix_attention_weight_shapes_and_ungated_prefix(images):
  # Prefix on block 0 only, without gate (g = 1: LAE's compensated prefix verbatim).
  module = vit.VisionTransformer("tiny", C, peft=PeftSpec(
      "prefix", blocks=(0,), prefix_length=L, prefix_gate_init=None))
  assert vit.peft_param_count(module) == 2 * L * D + 2
  variables = jax.jit(module.init)(KEY(0), jnp.zeros((1, S, S, 3)))
  assert not any("prefix_gate" in k for k in _flat(variables["params"]))
  logits, state = jax.jit(lambda v, x: module.apply(v, x, mutable=["intermediates"]))(
      variables, images)
  assert logits.shape == (B, C)
  inter = state["intermediates"]["Transformer"]
  w0 = inter["encoderblock_0"]["MultiHeadDotProductAttention_1"]["attention_weights"][0]
  w1 = inter["encoderblock_1"]["MultiHeadDotProductAttention_1"]["attention_weights"][0]
  assert w0.shape == (B, H, N + 1, L + N + 1)   # keys: L prefixes, then cls + N patches
  assert w1.shape == (B, H, N + 1, N + 1)       # block 1 has no prefix
  # Compensated: the prefix part sums to 1, the tokens keep 1 - lambda of their mass.
  np.testing.assert_allclose(np.asarray(w0[..., :L].sum(-1)), 1.0, rtol=1e-5)
  lam = 1.0 - np.asarray(w0[..., L:].sum(-1))
  assert np.all(lam > 0) and np.all(lam < 1)
  np.testing.assert_allclose(np.asarray(w1.sum(-1)), 1.0, rtol=1e-5)


def _np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_prefix_attention_matches_naive_formulas():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 5, 3, 4), (2, 7, 3, 4),
                                                                 (2, 7, 3, 4)))
  pk, pv = (rng.standard_normal((L, 3, 4)).astype(np.float32) for _ in range(2))

  @jax.jit
  def run(q, k, v, pk, pv):
    res = {"ref": dot_product_attention(q, k, v)[0]}
    for comp in (True, False):
      for g in (0.0, 0.5, 1.0):
        res[f"{comp}{g}"] = prefix_attention(q, k, v, pk, pv, g, compensatory=comp)
    return res

  res = run(q, k, v, pk, pv)
  kk = np.concatenate([np.broadcast_to(pk, (2,) + pk.shape), k], axis=1)
  vv = np.concatenate([np.broadcast_to(pv, (2,) + pv.shape), v], axis=1)
  joint = _np_softmax(np.einsum("bqhd,bkhd->bhqk", q, kk) / 2.0)  # sqrt(Dh) = 2
  # Plain prefix tuning (gate 1): softmax over [P_k; K] with values [P_v; V].
  out, w = res["False1.0"]
  np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", joint, vv), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(w, joint, rtol=1e-5, atol=1e-6)
  # LAE compensatory prefix (gate 1): the prefix part of the joint softmax renormalised to 1.
  lam = joint[..., :L].sum(-1, keepdims=True)
  lae = np.concatenate([joint[..., :L] / lam, joint[..., L:]], axis=-1)
  out, w = res["True1.0"]
  np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", lae, vv), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(w, lae, rtol=1e-5, atol=1e-6)
  # Gate 0: exactly the attention without prefix; gate 1/2 interpolates linearly.
  ref = np.asarray(res["ref"])
  for comp in (True, False):
    np.testing.assert_array_equal(res[f"{comp}0.0"][0], ref)
    np.testing.assert_allclose(res[f"{comp}0.5"][0], 0.5 * (ref + res[f"{comp}1.0"][0]), rtol=1e-5,
                               atol=1e-6)


def test_adapter_generic_any_rank():
  x = np.random.default_rng(0).standard_normal((2, 3, 3, 8)).astype(np.float32)  # NHWC map
  ad, res, wide = Adapter(hidden=5), Adapter(hidden=5, residual=True), Adapter(5, out_features=4)

  @jax.jit
  def run(x):
    y, variables = ad.init_with_output(KEY(1), x)
    moved = jax.tree_util.tree_map(lambda a: a + 0.1, variables)
    return dict(y=y, variables=variables, res=res.apply(variables, x), moved=ad.apply(moved, x),
                wide=wide.init_with_output(KEY(1), x)[0])

  out = run(x)
  variables = out["variables"]
  np.testing.assert_array_equal(out["y"], 0.0)                 # zero up-projection
  np.testing.assert_array_equal(out["res"], x)                 # residual form: identity
  assert out["wide"].shape == (2, 3, 3, 4)
  assert float(np.abs(out["moved"]).max()) > 0
  assert peft.count_params(variables) == adapter_param_count(8, 5) == 8 * 5 + 5 + 5 * 8 + 8 + 1
  assert all("adapter" in k for k in _flat(variables["params"]))
  down = np.asarray(variables["params"]["adapter_down"]["kernel"])
  assert 0 < np.abs(down).max() <= 1 / np.sqrt(8)             # Kaiming-uniform(a=sqrt 5) bound
  np.testing.assert_array_equal(variables["params"]["adapter_up"]["kernel"], 0.0)


# ----------------------------------------------------------------------- sizes / registry


def test_vit_b16_parameter_count_without_allocation():
  def count(**kw):
    module = vit.VisionTransformer("b16", 1000, **kw)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    return shapes, peft.count_params(shapes)
  shapes, n = count()
  assert n == 86_567_656                                     # ViT-B/16, 1000 classes (~86M)
  assert shapes["params"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 197, 768)
  _, n_lora = count(peft=PeftSpec("lora"))                             # paper: r=4 on k, v of blocks 0-4
  assert n_lora - n == 5 * 2 * (4 * (768 + 768) + 1)


def test_build_model_registry(images):
  built = build_model("vit_tiny", C, peft=PeftSpec.lora(4, blocks=BLOCKS), pretrained=False,
                      image_size=S, rng=KEY(0))
  assert built.module.peft == PeftSpec("lora", rank=4, blocks=BLOCKS)
  assert (built.mean, built.std) == (127.5, 127.5)
  assert peft.count_params(peft.split_params(built.variables["params"], "lora")[0]) == (
      _closed_form(PEFT_CONFIGS["lora_kv"]) + D * C + C)
  logits = jax.eval_shape(lambda v, x: built.module.apply(
      v, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)}), built.variables, images)
  assert logits.shape == (B, C)
  with pytest.raises(ConfigError, match="no public augreg checkpoint"):
    build_model("vit_tiny", C, pretrained=True, image_size=S)
  with pytest.raises(ValueError, match="unknown ViT peft"):
    build_model("vit_tiny", C, pretrained=False, image_size=S, peft=PeftSpec("bitfit"))
  with pytest.raises(TypeError, match="must be a cft_jax.peft.PeftSpec"):
    build_model("vit_tiny", C, pretrained=False, image_size=S, peft="lora")
  with pytest.raises(TypeError, match="takes no extra arguments"):
    build_model("tiny_cnn", C, pretrained=False, image_size=S, remat=True)
  with pytest.raises(ValueError, match="implemented for the ViT"):
    build_model("tiny_cnn", C, pretrained=False, image_size=S, peft=PeftSpec("adapter"))


def test_remat_from_config_same_values_and_gradients(images):
  """``model.remat=True`` reaches the ViT (``train._model_kwargs``) and changes nothing but the
  memory schedule: identical logits and LoRA/head gradients; non-ViT backbones refuse it."""
  from cft_jax import config as config_lib
  from cft_jax import train

  c = config_lib.base_config()
  c.model.name, c.peft.name, c.model.remat = "vit_tiny", "lora", True
  kw = train._model_kwargs(c)  # pylint: disable=protected-access
  assert kw["remat"] is True
  outs = []
  for remat in (False, True):
    built = build_model("vit_tiny", C, peft=PeftSpec.from_config(c.peft), pretrained=False,
                        image_size=S, rng=KEY(0), **dict(kw, remat=remat))
    assert built.module.remat is remat
    params = built.variables["params"]
    x = jnp.asarray(images)

    def loss(p):
      return jnp.sum(jax.nn.log_softmax(built.module.apply({"params": p}, x)) ** 2)

    trainable, frozen = peft.split_params(params, "lora")
    outs.append((built.module.apply({"params": params}, x),
                 jax.grad(lambda t: loss(peft.merge_params(t, frozen)))(trainable)))
  np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-6)
  bad = config_lib.base_config()
  bad.model.remat = True  # default backbone: EfficientNet-Lite0
  with pytest.raises(config_lib.ConfigError, match="model.remat"):
    config_lib.validate_config(bad)


def test_lora_alpha_scales_the_update(images):
  """``peft.alpha`` reaches the ViT's LoRA: the update is scaled by ``alpha / r`` (Hu et al.
  2021, eq. 3), so ``alpha = 2r`` gives exactly twice the LoRA delta of ``alpha = r``, and
  ``alpha = r`` equals the default (``alpha`` unset: today's scale 1)."""
  r = 4
  x = images.reshape(B, -1, 3)[:, :9, :].repeat(D // 3 + 1, axis=-1)[..., :D]  # [B, 9, D]

  def attn(alpha, targets=("o",)):
    spec = PeftSpec("lora", rank=r, alpha=alpha, lora_targets=targets)
    return vit.MultiHeadDotProductAttention(H, peft=spec)
  variables = jax.jit(attn(None).init)(KEY(0), x)
  # Non-zero lora_b so the update is not zero.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.3 if "lora_b" in jax.tree_util.keystr(p) else v, variables)
  base_vars = {"params": {k: ({kk: vv for kk, vv in v.items() if "lora" not in kk}
                               if isinstance(v, dict) else v)
                          for k, v in variables["params"].items()}}
  base = vit.MultiHeadDotProductAttention(H).apply(base_vars, x)
  out = {a: attn(a).apply(variables, x) for a in (None, r, 2 * r, 0.5 * r)}
  chex.assert_trees_all_close(out[r], out[None], rtol=0, atol=0)
  delta = out[r] - base
  assert float(jnp.max(jnp.abs(delta))) > 1e-3
  chex.assert_trees_all_close(out[2 * r] - base, 2.0 * delta, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(out[0.5 * r] - base, 0.5 * delta, rtol=1e-5, atol=1e-6)
  # From the config: peft.alpha is the PeftSpec's alpha (0: unset) and reaches the modules.
  assert PeftSpec.lora(r, alpha=2 * r).lora_scale == 2.0 and PeftSpec.lora(r).lora_scale == 1.0
  model = vit.VisionTransformer("tiny", C, peft=PeftSpec.lora(r, alpha=2 * r, blocks=(1,)))
  mods = {}
  model.apply(jax.jit(model.init)(KEY(0), jnp.zeros((1, S, S, 3))), images[:1],
              capture_intermediates=lambda m, _: (
                  isinstance(m, vit.LoRADenseGeneral) and m.lora_rank > 0
                  and mods.setdefault(m.name, m.lora_alpha) is None))
  assert mods == {"key": 8.0, "value": 8.0}
