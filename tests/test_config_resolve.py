"""One source of truth for configuration: resolved defaults, unknown keys, same_run, load_config,
--describe, and config errors that end in one ``cft_jax: error:`` line."""

import os
import subprocess
import sys

import ml_collections
import pytest

from cft_jax import config as config_lib
from cft_jax import methods, scenarios, train
from cft_jax.config import ConfigError

ROOT = os.path.join(os.path.dirname(__file__), "..")
HAS_FMNIST = os.path.isdir("/usr/share/datasets/fashion-mnist")


def _cfg(**sections):
  return ml_collections.ConfigDict(sections)


def test_resolved_config_has_every_default_and_the_method_fields():
  user = _cfg(model={"name": "tiny_cnn", "linearize": True}, method={"name": "ewc",
                                                                     "strength": 3})
  r = config_lib.validate_config(user)
  base = config_lib.base_config()
  # every base key is present, user values win, the rest are the library defaults
  for section, value in base.items():
    if isinstance(value, ml_collections.ConfigDict):
      assert set(value.keys()) <= set(r[section].keys()), section
  assert r.model.name == "tiny_cnn" and r.data.augment == "crop_flip" == base.data.augment
  assert r.train.log_every == 5 == base.train.log_every
  assert r.model.linearize == "full"  # True normalised in one place
  # the EWC dataclass's own fields at their defaults, the given one kept
  assert r.method.strength == 3
  assert r.method.fisher_type == methods.EWC().fisher_type == "mc"
  assert r.method.num_samples == 1 and "mse_alpha" not in r.method
  assert "strength" not in user.method or user.method.strength == 3  # the argument is untouched
  assert "augment" not in user.get("data", {})


def test_one_mse_alpha_reaches_the_method():
  c = config_lib.base_config()
  c.method.name = "dlcft"
  c.loss.name = "mse"
  r = config_lib.validate_config(c)
  assert r.loss.alpha == 15.0 == config_lib.mse_alpha(r)
  c.loss.alpha = 7.0
  r = config_lib.validate_config(c)
  assert methods.get_method(r.method, mse_alpha=config_lib.mse_alpha(r)).mse_alpha == 7.0
  c.method.mse_alpha = 7.0
  with pytest.raises(ConfigError, match="loss.alpha"):
    config_lib.validate_config(c)


@pytest.mark.parametrize("section,key,value,match", [
    ("method", "strenght", 1.0, "did you mean 'method.strength'"),
    ("method", "temprature", 2.0, "did you mean 'method.temperature'"),
    ("data", "augmnet", "none", "did you mean 'data.augment'"),
    ("optim", "learning_rte", 0.1, "did you mean 'optim.learning_rate'"),
])
def test_unknown_keys_are_errors_with_a_suggestion(section, key, value, match):
  c = config_lib.base_config()
  c.method.name = "lwf" if key == "temprature" else "ewc"
  c[section][key] = value
  with pytest.raises(ConfigError, match=match):
    config_lib.validate_config(c)
  if section == "method":  # the method registry applies the same check
    with pytest.raises(ConfigError, match=match):
      methods.get_method(c.method)


def test_method_keys_of_another_method_are_rejected():
  c = config_lib.base_config()
  c.method.name = "ewc"
  c.method.buffer_size = 500  # a replay key, not EWC's
  with pytest.raises(ConfigError) as e:
    config_lib.validate_config(c)
  assert str(e.value) == ("method.buffer_size=500 is not read by method.name='ewc' (read by: "
                          "der, derpp, dlcft, er); remove it or choose one of those")
  with pytest.raises(ConfigError, match=r"^method.buffer_size=500 is not read by method.name="):
    methods.get_method(c.method)  # the method registry says the same
  c.method.name = "er"
  assert config_lib.validate_config(c).method.buffer_size == 500


NOT_READ = "is not read by {} (read by: {}); remove it or choose one of those"


@pytest.mark.parametrize("sets,message", [
    # the cases: a loss / method key its component does not read
    ({"loss.beta": 0.1}, "loss.beta=0.1 " + NOT_READ.format(
        "loss.name='aepg'", "confidence_penalty, entropy_penalty")),
    ({"loss.gamma": 2.0}, "loss.gamma=2.0 " + NOT_READ.format(
        "loss.name='aepg'", "focal, label_smoothing")),
    ({"method.ema_decay": 0.5}, "method.ema_decay=0.5 " + NOT_READ.format(
        "method.name='sequential'", "lae")),
    ({"method.buffer_size": 500}, "method.buffer_size=500 " + NOT_READ.format(
        "method.name='sequential'", "der, derpp, dlcft, er")),
    # aEPG's keys under another objective, a schedule's under another schedule
    ({"loss.name": "ce", "loss.tau": 3.0}, "loss.tau=3.0 " + NOT_READ.format(
        "loss.name='ce'", "aepg")),
    ({"loss.name": "focal", "loss.schedule_scope": "global"},
     "loss.schedule_scope='global' " + NOT_READ.format("loss.name='focal'", "aepg")),
    ({"loss.schedule": "linear", "loss.tau": 3.0}, "loss.tau=3.0 " + NOT_READ.format(
        "loss.schedule='linear'", "sigmoid")),
    ({"loss.alpha": 0.3}, "loss.alpha=0.3 " + NOT_READ.format("loss.schedule='sigmoid'",
                                                               "constant")),
    ({"loss.name": "ce", "loss.num_samples": 4}, "loss.num_samples=4 " + NOT_READ.format(
        "loss.name='ce'", "reinforce")),
    # the robust components' keys
    ({"method.ftp_k": 2.0}, "method.ftp_k=2.0 " + NOT_READ.format("method.projection=''",
                                                                   "ftp")),
    ({"method.projection": "l2sp", "method.radius_lr": 0.1}, "method.radius_lr=0.1 "
     + NOT_READ.format("method.projection='l2sp'", "ftp, tpgm")),
    ({"method.projection": "ftp", "method.proj_freq": 5}, "method.proj_freq=5 "
     + NOT_READ.format("method.projection='ftp'", "tpgm")),
    # the PEFT modules' keys
    ({"peft.name": "full", "peft.rank": 8}, "peft.rank=8 " + NOT_READ.format(
        "peft.name='full'", "lora")),
    ({"peft.name": "linear_probe", "peft.blocks": (0, 1)}, "peft.blocks=(0, 1) "
     + NOT_READ.format("peft.name='linear_probe'", "adapter, lora, prefix")),
    ({"model.name": "vit_ti4", "peft.name": "prefix", "peft.adapter_hidden": 8},
     "peft.adapter_hidden=8 " + NOT_READ.format("peft.name='prefix'", "adapter")),
])
def test_a_set_key_its_component_does_not_read_is_an_error(sets, message):
  c = config_lib.base_config()
  for key, value in sets.items():
    section, k = key.split(".")
    c[section][k] = value
  with pytest.raises(ConfigError) as e:
    config_lib.validate_config(c)
  assert str(e.value) == message


@pytest.mark.parametrize("sets", [
    {"loss.name": "confidence_penalty", "loss.beta": 0.1},
    {"loss.name": "focal", "loss.gamma": 2.0},
    {"loss.schedule": "constant", "loss.alpha": 0.3},
    {"loss.name": "mse", "loss.alpha": 10.0},
    {"loss.schedule_scope": "global", "loss.tau": 2.0},
    {"method.name": "lae", "method.ema_decay": 0.5},
    {"method.projection": "ftp", "method.ftp_k": 2.0, "method.radius_lr": 0.1},
    {"method.projection": "l2sp", "method.l2sp_alpha": 0.1},
    {"peft.name": "lora", "peft.rank": 8, "peft.alpha": 16.0},
    # set to their defaults (a config file built on base_config() holds every key): not "set"
    {"loss.name": "ce", "loss.tau": 6.0, "loss.schedule": "sigmoid"},
    {"peft.name": "full", "peft.rank": 4, "peft.blocks": [0, 1, 2, 3, 4]},
    {"method.ema_decay": 0.999, "method.radius_lr": 1e-2},
])
def test_keys_their_component_reads_or_at_default_are_accepted(sets):
  c = config_lib.base_config()
  for key, value in sets.items():
    section, k = key.split(".")
    c[section][k] = value
  r = config_lib.validate_config(c)
  for key, value in sets.items():
    got = r[key.split(".")[0]][key.split(".")[1]]
    assert (list(got) if isinstance(got, tuple) else got) == value


def test_an_explicit_key_counts_as_set_even_at_its_default():
  c = config_lib.apply_overrides(config_lib.base_config(), ["loss.name=ce", "loss.tau=6.0"])
  assert config_lib.validate_config(c).loss.tau == 6.0  # at its default: not set
  with pytest.raises(ConfigError, match=r"^loss.tau=6.0 is not read by loss.name='ce'"):
    config_lib.validate_config(c, explicit=["loss.name", "loss.tau"])


def test_every_gated_key_has_a_reader_and_the_tables_match_the_registries():
  from cft_jax import objectives, peft, robust  # pylint: disable=g-import-not-at-top
  from cft_jax import registry  # pylint: disable=g-import-not-at-top
  loss_names, schedules = objectives.LOSS_READS
  assert set(loss_names.reads) == set(objectives.OBJECTIVES)
  assert set(schedules.reads) == set(objectives.SCHEDULES)
  assert set(robust.PROJECTION_READS.reads) == set(robust.PROJECTIONS)
  assert set(peft.PEFT_READS.reads) == set(peft.PEFT_METHODS)
  assert set(methods.method_reads().reads) == set(methods.method_names())
  for by in registry.key_readers():
    section = by.section
    for key in by.gated:  # every gated key is a key of its section and read by someone
      assert by.readers(key)
      if section != "method" and f"{section}.{key}" not in config_lib.KEYS:
        assert section == "loss" and key in objectives.LOSS_HPARAMS, key


def test_cli_key_not_read_is_one_error_line(tmp_path):
  out = _cli("--config", "configs/default.py", "--workdir", str(tmp_path / "never"),
             "--config.method.ema_decay=0.999")
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
      "cft_jax: error: method.ema_decay=0.999 is not read by method.name='sequential' (read by: "
      "lae); remove it or choose one of those"]
  out = _cli("--config", "configs/default.py", "--describe", "--config.method.buffer_size=8")
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
      "cft_jax: error: method.buffer_size=8 is not read by method.name='sequential' (read by: "
      "der, derpp, dlcft, er); remove it or choose one of those"]


def test_builder_value_errors_become_config_errors():
  c = config_lib.base_config()
  c.method.name = "ewc"
  c.method.weighting = "foo"  # checked by the EWC dataclass
  with pytest.raises(ConfigError, match="weighting must be one of"):
    config_lib.validate_config(c)
  c = config_lib.base_config()
  c.loss.name = "label_smoothing"
  c.loss.gamma = 1.5  # checked by the objective
  with pytest.raises(ConfigError, match="gamma must be in"):
    config_lib.validate_config(c)
  c = config_lib.base_config()
  c.data.name = "fashion_mnis"
  with pytest.raises(ConfigError, match="did you mean 'fashion_mnist'"):
    config_lib.validate_config(c)


def test_num_tasks_not_dividing_the_classes_is_a_config_error():
  with pytest.raises(ConfigError, match="scenario.num_tasks=3 does not divide the 10 classes"):
    scenarios.make_scenario("class_il", 10, 3)
  assert scenarios.make_scenario("class_il", 10, 5).classes_per_task == 2


def test_same_run():
  a = config_lib.validate_config(config_lib.base_config())
  b = config_lib.validate_config(config_lib.base_config())
  assert config_lib.same_run(a, b) == []
  b.optim.learning_rate = 0.5
  b.train.log_every = 1  # logging keys do not change what is computed
  b.eval.batch_size = 10  # eval is not compared on resume ...
  assert config_lib.same_run(a, b) == ["optim.learning_rate"]
  # ... but is for a finished run's metrics
  assert config_lib.same_run(a, b, sections=config_lib.RESULT_SECTIONS) == [
      "eval.batch_size", "optim.learning_rate"]
  saved = a.to_dict()
  del saved["optim"]["momentum"]  # a key added to the library since the run was made
  assert config_lib.same_run(saved, a) == []
  assert "optim.learning_rate: saved 0.001, now 0.5" in config_lib.describe_diffs(
      a, b, ["optim.learning_rate"])


def test_load_config_by_path_suffix_and_module():
  by_path = config_lib.load_config(os.path.join(ROOT, "configs", "robust_ft.py"), "tpgm")
  by_suffix = config_lib.load_config(os.path.join(ROOT, "configs", "robust_ft.py:tpgm"))
  sys.path.insert(0, ROOT)
  try:
    by_module = config_lib.load_config("configs.robust_ft", "tpgm")
  finally:
    sys.path.remove(ROOT)
  assert by_path.to_dict() == by_suffix.to_dict() == by_module.to_dict()
  assert by_path.method.projection == "tpgm"
  with pytest.raises(ConfigError, match="not found"):
    config_lib.load_config("configs/nope.py")


def test_describe_lists_every_key_from_the_schema():
  c = config_lib.base_config()
  c.method.name = "ewc"
  text = config_lib.describe(c)
  keys = [row["key"] for row in config_lib.config_schema("ewc")]
  lines = {line.split()[0]: line for line in text.splitlines()[1:]}
  assert set(keys) == set(lines)
  for section, value in config_lib.base_config().items():
    for key in (value.keys() if isinstance(value, ml_collections.ConfigDict) else [None]):
      assert (section if key is None else f"{section}.{key}") in lines
  assert "'crop_flip'" in lines["data.augment"] and "'none' | 'crop_flip'" in lines["data.augment"]
  assert "method.strength" in lines and "lambda" in lines["method.strength"]
  assert all(row["meaning"] for row in config_lib.config_schema("ewc")), [
      row["key"] for row in config_lib.config_schema("ewc") if not row["meaning"]]


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "cft_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_describe_and_method_key_overrides():
  out = _cli("--config", "configs/default.py", "--describe", "--config.method.temperature=3",
             "--config.method.name=lwf", "--config.data.train_limit", "None")
  assert out.returncode == 0, out.stderr
  rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
  assert rows["method.name"][1:3] == ["'lwf'", "'sequential'"]
  assert rows["method.temperature"][1:3] == ["3.0", "2.0"]  # value, default
  assert rows["data.train_limit"][1:3] == ["-", "1000"]
  out = _cli("--config", "configs/default.py", "--describe", "--config.method.strenght=1")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "cft_jax: error: unknown config key 'method.strenght' (--config.method.strenght) "
      "('method.strength' is a key of dlcft, ewc, lwf, mas, osla, not of 'sequential': set "
      "method.name first) See --describe for every key.")


def test_apply_overrides_types_and_errors():
  c = config_lib.base_config()
  c.lock()
  out = config_lib.apply_overrides(c, ["peft.blocks=(1, 2)", "train.progress=false", "seed=4",
                                       "method.strength=3", "method.name=ewc"])
  assert out.peft.blocks == (1, 2) and out.train.progress is False and out.seed == 4
  assert out.method.strength == 3.0 and c.method.name == "sequential"  # a copy
  with pytest.raises(ConfigError, match="expected a int"):
    config_lib.apply_overrides(c, ["seed=abc"])
  with pytest.raises(ConfigError, match="did you mean 'optim.learning_rate'"):
    config_lib.apply_overrides(c, ["optim.learning_rte=0.1"])


@pytest.mark.skipif(not HAS_FMNIST, reason="needs Debian's dataset-fashion-mnist")
def test_cli_num_tasks_3_is_one_error_line(tmp_path):
  out = _cli("--config", "configs/default.py", "--workdir", str(tmp_path / "w"),
             "--config.scenario.num_tasks=3", "--config.model.name=tiny_cnn",
             "--config.model.pretrained=False")
  assert out.returncode == 1
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("cft_jax: error: scenario.num_tasks=3 does not divide the 10 classes")
  out = _cli("--config", "configs/default.py", "--workdir", str(tmp_path / "w"),
             "--config.method.name=ewc", "--config.method.ema_decay=2.0")
  assert out.stderr.strip().splitlines()[-1].startswith("cft_jax: error: config.method.ema_decay")
  assert "Traceback" not in out.stderr


def test_run_rejects_unknown_method_key(tmp_path):
  c = config_lib.base_config()
  c.method.name = "ewc"
  c.method.strenght = 5.0
  with pytest.raises(ConfigError, match="did you mean 'method.strength'"):
    train.run(c, str(tmp_path / "w"))


def test_registered_dataclass_fields_are_its_config_keys():
  import dataclasses  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass(frozen=True)
  class Anchor(methods.Method):
    name: str = "test_anchor"
    lam: float = 1.0

  methods.register("test_anchor", Anchor, overwrite=True)
  try:
    assert methods.method_config_fields("test_anchor") == {"lam": 1.0}
    c = config_lib.base_config()
    c.method.name = "test_anchor"
    assert config_lib.validate_config(c).method.lam == 1.0  # resolved default
    c.method.lam = 2.0
    assert methods.get_method(config_lib.validate_config(c).method) == Anchor(lam=2.0)
    c.method.lma = 3.0
    with pytest.raises(ConfigError, match="did you mean 'method.lam'"):
      config_lib.validate_config(c)
  finally:
    methods._FACTORIES.pop("test_anchor")  # pylint: disable=protected-access
