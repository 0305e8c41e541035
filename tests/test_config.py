"""Config loading: YAML numerics, -o overrides parsed as YAML, validation errors with key paths."""
import textwrap

import pytest

from ppcls_ft.config import apply_overrides, load_config, parse_override, to_number
from ppcls_ft.errors import ConfigError

MINIMAL = textwrap.dedent("""
    Global:
      epochs: 2
      device: cpu
    Arch:
      name: MobileNetV2
      class_num: 5
    Loss:
      Train:
        - CELoss: {weight: 1.0, epsilon: 0.1}
    Optimizer:
      name: Momentum
      momentum: 0.9
      lr: {name: Cosine, learning_rate: 1e-3, warmup_epoch: 1}
    DataLoader:
      Train:
        dataset:
          name: ImageNetDataset
          image_root: ./
          cls_label_path: ./train_list.txt
          transform_ops:
            - DecodeImage: {to_rgb: True}
            - RandCropImage: {size: 32}
            - NormalizeImage: {scale: 1.0/255.0, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5], order: ""}
        sampler: {name: DistributedBatchSampler, batch_size: 4, shuffle: True}
        loader: {num_workers: 0}
""")


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(MINIMAL)
    return path


def test_numeric_strings_become_numbers():
    assert to_number("1e-3") == pytest.approx(0.001)
    assert to_number("1.0/255.0") == pytest.approx(1 / 255)
    assert to_number("-2") == -2 and isinstance(to_number("-2"), int)
    assert to_number("rand-m9-mstd0.5-inc1") == "rand-m9-mstd0.5-inc1"
    assert to_number("images/1e3.jpg") == "images/1e3.jpg"


def test_loaded_config_converts_nested_numbers(cfg_file):
    cfg = load_config(cfg_file)
    assert cfg["Optimizer"]["lr"]["learning_rate"] == pytest.approx(1e-3)
    norm = cfg["DataLoader"]["Train"]["dataset"]["transform_ops"][2]["NormalizeImage"]
    assert norm["scale"] == pytest.approx(1 / 255)


def test_overrides_are_yaml_not_eval(cfg_file):
    cfg = load_config(cfg_file, ["Global.epochs=7", "DataLoader.Train.dataset.transform_ops.1.RandCropImage.size=48",
                                 "Arch.class_num=3", "Global.output_dir=__import__('os').getcwd()"])
    assert cfg["Global"]["epochs"] == 7
    assert cfg["DataLoader"]["Train"]["dataset"]["transform_ops"][1]["RandCropImage"]["size"] == 48
    assert cfg["Arch"]["class_num"] == 3
    assert cfg["Global"]["output_dir"] == "__import__('os').getcwd()"  # a string, never executed
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


def test_override_list_index_out_of_range(cfg_file):
    with pytest.raises(ConfigError, match=r"transform_ops.9.*out of range"):
        load_config(cfg_file, ["DataLoader.Train.dataset.transform_ops.9.X.size=1"])


@pytest.mark.parametrize("override, path, hint", [
    ("Global.epoch=3", "Global.epoch", "epochs"),
    ("Globl.epochs=3", "Globl", "Global"),
    ("Arch.clas_num=3", "Arch.clas_num", "class_num"),
    ("Optimizer.lr.warmup_epochs=2", "Optimizer.lr.warmup_epochs", "warmup_epoch"),
    ("DataLoader.Train.dataset.transform_ops.1.RandCropImage.sise=3",
     "DataLoader.Train.dataset.transform_ops.1.RandCropImage.sise", "size"),
    ("Optimizer.name=Momentun", "Optimizer", "Momentum"),
])
def test_typos_name_the_path_and_suggest(cfg_file, override, path, hint):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, [override])
    assert str(err.value).startswith(path)
    assert hint in str(err.value)


def test_wrong_type_and_missing_required(cfg_file):
    with pytest.raises(ConfigError, match=r"Global.epochs: expected int"):
        load_config(cfg_file, ["Global.epochs=many"])
    with pytest.raises(ConfigError, match=r"Optimizer.lr.*learning_rate"):
        load_config(cfg_file, ["Optimizer.lr={name: Cosine}"])
    with pytest.raises(ConfigError, match=r"Global.class_num.*Arch.class_num"):
        load_config(cfg_file, ["Global.class_num=9"])


def test_global_class_num_alias(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL.replace("  class_num: 5\n", "").replace("  epochs: 2\n", "  epochs: 2\n  class_num: 6\n"))
    assert load_config(path)["Arch"]["class_num"] == 6


def test_apply_overrides_does_not_mutate_input():
    base = {"Global": {"epochs": 1}}
    out = apply_overrides(base, ["Global.epochs=2"])
    assert base["Global"]["epochs"] == 1 and out["Global"]["epochs"] == 2


def _with(tmp_path, extra_yaml):
    path = tmp_path / "cfg.yaml"
    path.write_text(MINIMAL + textwrap.dedent(extra_yaml))
    return path


@pytest.mark.parametrize("override, key", [
    ("Global.use_multilabel=True", "Global.use_multilabel"),
    ("Loss.Train.0={MultiLabelLoss: {weight: 1.0}}", "Loss.Train.0.MultiLabelLoss"),
    ("DataLoader.Train.dataset.name=MultiLabelDataset", "DataLoader.Train.dataset.name"),
    ("Metric={Eval: [{ATTRMetric: null}]}", "Metric.Eval.0.ATTRMetric"),
    ("Infer={PostProcess: {name: MultiLabelThreshOutput}}", "Infer.PostProcess.name"),
])
def test_multilabel_config_is_refused_naming_the_key(cfg_file, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, [override])
    message = str(err.value)
    assert message.startswith(f"{key}: ") and "multi-label" in message and "\n" not in message


def test_mldecoder_section_is_refused_as_multilabel(tmp_path):
    path = _with(tmp_path, """
        MLDecoder:
          query_num: 80
    """)
    with pytest.raises(ConfigError, match=r"^MLDecoder: .*multi-label"):
        load_config(path)


def test_use_multilabel_false_is_accepted(cfg_file):
    assert load_config(cfg_file, ["Global.use_multilabel=False"])["Global"]["use_multilabel"] is False


def _captured_warnings(records, fn, *keys):
    """Run ``fn`` with the once-only memory of ``keys`` cleared; log messages go to ``records``."""
    import logging
    from ppcls_ft import config as C

    class ListHandler(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    for key in keys:
        C._warned.discard(key)
    logger, handler = logging.getLogger("ppcls_ft"), ListHandler()
    logger.addHandler(handler)  # the ppcls_ft logger may not propagate (utils/logger.py)
    try:
        return fn()
    finally:
        logger.removeHandler(handler)


def test_keys_without_effect_are_accepted_and_logged_once(tmp_path):
    path = _with(tmp_path, """
        Slim:
          quant:
            name: pact
        Infer:
          infer_imgs: ./x.jpg
          PostProcess:
            name: ThreshOutput
            threshold: 0.9
            label_0: nobody
            label_1: someone
    """)
    keys = ("Slim", "Global.image_channel", "Infer.PostProcess")
    records = []
    cfg = _captured_warnings(records, lambda: [load_config(path, ["Global.image_channel=4"]),
                                               load_config(path, ["Global.image_channel=4"])][0], *keys)
    assert cfg["Slim"] == {"quant": {"name": "pact"}}
    for key in keys:
        lines = [m for m in records if m.startswith(f"{key} ")]
        assert len(lines) == 1 and "no effect" in lines[0], (key, lines)


def test_postprocess_names_and_keys_are_checked(tmp_path):
    path = _with(tmp_path, """
        Infer:
          infer_imgs: ./x.jpg
          PostProcess: {name: ThreshOutput, threshold: 0.5}
    """)
    load_config(path)
    with pytest.raises(ConfigError, match=r"Infer\.PostProcess\.label_2"):
        load_config(path, ["Infer.PostProcess.label_2=x"])
    with pytest.raises(ConfigError, match=r"Infer\.PostProcess\.name.*Topk"):
        load_config(path, ["Infer.PostProcess.name=Top"])
    with pytest.raises(ConfigError, match=r"Infer\.PostProcess.*threshold"):
        load_config(path, ["Infer.PostProcess={name: ThreshOutput}"])


def test_use_sync_bn_is_accepted_and_kept_for_the_engine(cfg_file):
    cfg = load_config(cfg_file, ["Arch.use_sync_bn=True"])
    assert cfg["Arch"]["use_sync_bn"] is True
